"""The public layers of the deployment matrix, built small, with randomised statistics.

Shared by ``test_deploy_matrix.py``, ``test_syncbn.py`` and ``test_distributed.py``. The list walks
``gald.list_ga()``, so a newly registered GA layer joins the matrix (alone and inside ``GALD``)
without any edit here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

import gald

C = 16
SHAPE = (2, C, 13, 15)  # the export / comparison shape: odd, non-square
SHAPE2 = (3, C, 17, 11)  # a second shape for dynamic ONNX graphs
NUM_CLASSES = 5


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], nn.Module]


def _ga(name: str) -> Callable[[], nn.Module]:
    return lambda: gald.create_ga(name, C)


def _gald(name: str) -> Callable[[], nn.Module]:
    return lambda: gald.GALD(C, name)


def public_cases() -> list[Case]:
    """LocalDistribution, AuxHead, GALDHead, every registered GA layer and GALD with each GA."""
    cases = [
        Case("LocalDistribution", lambda: gald.LocalDistribution(C)),
        Case("AuxHead", lambda: gald.AuxHead(C, NUM_CLASSES, channels=C)),
        Case("GALDHead", lambda: gald.GALDHead(C, NUM_CLASSES, channels=C)),
    ]
    for name in gald.list_ga():
        cases.append(Case(f"ga-{name}", _ga(name)))
        cases.append(Case(f"GALD-{name}", _gald(name)))
    return cases


CASES = public_cases()
CASE_IDS = [case.id for case in CASES]


@torch.no_grad()
def randomise(module: nn.Module, seed: int = 1) -> nn.Module:
    """Give every norm random running statistics and affine parameters, and every all-zero
    parameter (zero-initialised gates such as DANet's gamma) random values, so that a comparison
    between two paths cannot pass because a branch contributes nothing."""
    gen = torch.Generator().manual_seed(seed)
    for sub in module.modules():
        if isinstance(sub, _NormBase) and sub.track_running_stats:
            assert sub.running_mean is not None
            assert sub.running_var is not None
            sub.running_mean.copy_(torch.randn(sub.running_mean.shape, generator=gen) * 0.2)
            sub.running_var.copy_(torch.rand(sub.running_var.shape, generator=gen) + 0.5)
        if isinstance(sub, (_NormBase, nn.GroupNorm, nn.LayerNorm)):
            weight, bias = getattr(sub, "weight", None), getattr(sub, "bias", None)
            if isinstance(weight, torch.Tensor):
                weight.copy_(torch.rand(weight.shape, generator=gen) + 0.5)
            if isinstance(bias, torch.Tensor):
                bias.copy_(torch.randn(bias.shape, generator=gen) * 0.2)
    for param in module.parameters():
        if param.numel() and not bool(param.any()):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return module


def build(case: Case, *, train: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    module = randomise(case.build())
    return module.train(train)


def twin(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module)


def batch_for(module: nn.Module, shape: tuple[int, ...] = SHAPE) -> tuple[int, ...]:
    b = max(shape[0], int(getattr(module, "min_train_batch", 1)))
    return (b, *shape[1:])


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    rtol: float,
    what: str,
    scale: float | None = None,
) -> None:
    """Elementwise ``|a - e| <= rtol * (|e| + scale)``, ``scale`` defaulting to ``max|e|``: relative,
    with an absolute floor proportional to the size of the reference, so entries that are zero up
    to rounding (e.g. the gradient of a conv bias followed by a train-mode BatchNorm) do not make
    the comparison flaky. Pass ``scale`` to measure several tensors on one common scale."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    actual, expected = actual.detach().float(), expected.detach().float()
    if scale is None:
        scale = float(expected.abs().max().clamp_min(1e-12))
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}"
    )


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
