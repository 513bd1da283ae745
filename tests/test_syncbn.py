"""SyncBatchNorm: conversion, single-process equivalence, state-dict round trip.

``nn.SyncBatchNorm`` only synchronises in train mode with an initialised process group of more
than one rank (and then needs GPU tensors; see ``test_distributed.py``). In eval mode, and in train
mode when no process group is initialised, it runs the plain ``F.batch_norm``: a converted model
must give the same values as the BatchNorm one. Every GA is checked inside ``GALDHead`` (which
contains GALD, the GA, the LD and the head's own norms).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import gald
from _helpers import randomise

SHAPE = (2, 16, 13, 15)


def _count(module: nn.Module, kind: type[nn.Module]) -> int:
    return sum(isinstance(m, kind) for m in module.modules())


def _input(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(7))


def _head(ga: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomise(gald.GALDHead(16, 5, channels=16, ga_module=ga), seed=seed).eval()


@pytest.mark.parametrize("ga", gald.list_ga())
def test_convert_sync_batchnorm_equals_batchnorm(ga: str) -> None:
    assert not (dist.is_available() and dist.is_initialized())
    module = _head(ga)
    n_bn = _count(module, _BatchNorm)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(module))
    assert _count(synced, nn.SyncBatchNorm) == n_bn, "some BatchNorm was not converted"
    x = _input(SHAPE)
    with torch.no_grad():
        assert torch.equal(synced(x), module(x)), f"{ga}: eval outputs differ"
    # train mode without a process group: batch statistics, running-stat updates, gradients
    module.train()
    synced.train()
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ys = []
    for m, xi in zip((module, synced), xs):
        torch.manual_seed(3)  # the same dropout masks
        ys.append(m(xi))
    torch.testing.assert_close(ys[1], ys[0], rtol=1e-6, atol=1e-6)
    for y in ys:
        y.square().mean().backward()
    assert xs[0].grad is not None and xs[1].grad is not None
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-6, atol=1e-8)
    stats = dict(synced.named_buffers())
    for name, buf in module.named_buffers():
        assert torch.equal(stats[name], buf), f"{ga}: buffer {name} differs"


def test_sync_state_dict_loads_into_batchnorm_model_and_back() -> None:
    module = _head("psp")
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(module))
    plain = gald.GALDHead(16, 5, channels=16, ga_module="psp").eval()  # other weights
    x = _input(SHAPE)
    with torch.no_grad():
        before = plain(x)
        result = plain.load_state_dict(synced.state_dict(), strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        after = plain(x)
        assert torch.equal(after, module(x))
    assert not torch.equal(before, after), "the loaded state dict changed nothing"
    back = gald.GALDHead(16, 5, channels=16, ga_module="psp", norm_layer=nn.SyncBatchNorm)
    back.eval().load_state_dict(module.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(back(x), module(x))


def test_official_constructors_take_norm_layer() -> None:
    with torch.device("meta"):
        net = gald.models.GALDNet.official(depth=50, num_classes=3, norm_layer=nn.SyncBatchNorm)
        plain = gald.models.GALDNet.official(depth=50, num_classes=3)
    assert _count(net, nn.SyncBatchNorm) == _count(plain, nn.BatchNorm2d) > 0
    assert not any(type(m) is nn.BatchNorm2d for m in net.modules())
    # the same keys and shapes: the authors' weights load either way
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    assert shapes == {k: v.shape for k, v in plain.state_dict().items()}
    head = gald.GALDHead.official(64, 3, channels=32, norm_layer=nn.SyncBatchNorm)
    assert not any(type(m) is nn.BatchNorm2d for m in head.modules())
