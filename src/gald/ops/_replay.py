"""Replay a short chain of stateless layers and BatchNorms in backward instead of storing it.

A chain like ``norm -> act -> conv -> norm -> act -> ...`` normally keeps two tensors per stage
alive for backward (the norm input and the activation output). A caller that ran the chain
without autograd and kept only its input can get the gradients from :func:`replay_backward`:
it replays the chain with autograd on and differentiates it. The replay of a BatchNorm uses the
statistics the forward used (the batch statistics in train mode, the unchanged running
statistics in eval mode) and does not update the running statistics, so a train step updates
them exactly once.

Time: the chain's forward runs twice. Memory: one tensor (the chain's input) instead of two per
stage. Only chains whose layers replay exactly are accepted (:func:`replayable`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.dropout import _DropoutNd


def _stateless(m: nn.Module) -> bool:
    return next(m.buffers(), None) is None and not isinstance(m, _DropoutNd)


def replayable(modules: Sequence[nn.Module]) -> bool:
    """Whether every module is an exact ``nn.BatchNorm2d`` or stateless and deterministic."""
    return all(type(m) is nn.BatchNorm2d or _stateless(m) for m in modules)


def chain_parameters(modules: Sequence[nn.Module]) -> list[nn.Parameter]:
    """The parameters of ``modules``, each once."""
    return list({id(p): p for m in modules for p in m.parameters()}.values())


def _replay_bn(bn: nn.BatchNorm2d, z: torch.Tensor) -> torch.Tensor:
    batch_stats = bn.training or bn.running_mean is None or bn.running_var is None
    if batch_stats:
        return F.batch_norm(z, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    return F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def may_write_input(modules: Sequence[nn.Module]) -> bool:
    """Whether the first layer that is not an ``nn.Identity`` works in place (an ``inplace``
    activation, e.g. after :func:`gald.fuse` removed the norm), which would overwrite the chain's
    input that the caller keeps."""
    for m in modules:
        if not isinstance(m, nn.Identity):
            return bool(getattr(m, "inplace", False))
    return False


def run_chain(modules: Sequence[nn.Module], z: torch.Tensor, *, owns_input: bool) -> torch.Tensor:
    """``modules`` applied in order without autograd.

    ``nn.ReLU`` layers work in place on the intermediate tensors (they are this function's own),
    and on ``z`` itself only when ``owns_input`` (otherwise ``z`` is never modified).
    """
    if not owns_input and may_write_input(modules):
        z, owns_input = z.clone(), True
    with torch.no_grad():
        for m in modules:
            if type(m) is nn.ReLU and owns_input:
                z = z.relu_()
                continue
            out = m(z)
            owns_input = owns_input or out is not z
            z = out
    return z


def replay(modules: Sequence[nn.Module], z: torch.Tensor) -> torch.Tensor:
    """``modules`` applied in order, BatchNorms without a running-statistics update; ``z``
    itself is never modified."""
    if may_write_input(modules):
        z = z.clone()
    for m in modules:
        z = _replay_bn(m, z) if type(m) is nn.BatchNorm2d else m(z)
    return z


def replay_backward(
    z: torch.Tensor,
    modules: Sequence[nn.Module],
    params: Sequence[torch.Tensor],
    grad: torch.Tensor,
    need_z: bool,
    need_params: Sequence[bool],
) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """Gradients of ``modules(z)`` w.r.t. ``z`` and ``params`` for the upstream ``grad``."""
    with torch.enable_grad():
        zz = z.detach().requires_grad_(need_z)
        out = replay(modules, zz)
    wanted: list[torch.Tensor] = [zz] if need_z else []
    wanted += [p for p, n in zip(params, need_params) if n]
    if not wanted or not out.requires_grad:
        return None, [None] * len(params)
    grads = list(torch.autograd.grad(out, wanted, grad, allow_unused=True))
    gz = grads.pop(0) if need_z else None
    gparams = [grads.pop(0) if n else None for n in need_params]
    return gz, gparams
