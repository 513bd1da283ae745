"""SyncBatchNorm on every public layer: conversion, single-process equivalence, state-dict round trip.

``nn.SyncBatchNorm`` only synchronises in train mode with an initialised process group of more
than one rank (and then needs GPU tensors; see ``test_distributed.py``). In eval mode, and in train
mode when no process group is initialised (torch 2.13 checks ``dist.is_initialized()``), it runs
the plain ``F.batch_norm``: a converted model must give the same values as the BatchNorm one.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import gald
from _deploy_cases import (
    CASE_IDS,
    CASES,
    NUM_CLASSES,
    SHAPE,
    Case,
    assert_close,
    batch_for,
    build,
    twin,
)


def _count(module: nn.Module, kind: type[nn.Module]) -> int:
    return sum(isinstance(m, kind) for m in module.modules())


def _input(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_convert_sync_batchnorm_equals_batchnorm(case: Case) -> None:
    assert not (dist.is_available() and dist.is_initialized())
    module = build(case, train=False)
    n_bn = _count(module, _BatchNorm)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(twin(module))
    assert _count(synced, nn.SyncBatchNorm) == n_bn, "some BatchNorm was not converted"
    assert _count(synced, _BatchNorm) == n_bn  # SyncBatchNorm is a _BatchNorm: none left over
    x = _input(batch_for(module, SHAPE))
    with torch.no_grad():
        assert torch.equal(synced(x), module(x)), f"{case.id}: eval outputs differ"
    # train mode without a process group: batch statistics, running-stat updates, gradients
    module.train()
    synced.train()
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ys = []
    for m, xi in zip((module, synced), xs):
        torch.manual_seed(3)  # the same dropout masks
        ys.append(m(xi))
    assert_close(ys[1], ys[0], rtol=1e-6, what=f"{case.id}: train output")
    for y in ys:
        y.square().mean().backward()
    assert xs[0].grad is not None
    assert xs[1].grad is not None
    assert_close(xs[1].grad, xs[0].grad, rtol=1e-6, what=f"{case.id}: input gradient")
    stats = dict(synced.named_buffers())
    for name, buf in module.named_buffers():
        assert torch.equal(stats[name], buf), f"{case.id}: buffer {name} differs"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_sync_state_dict_loads_into_batchnorm_model(case: Case) -> None:
    module = build(case, train=False)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(twin(module))
    torch.manual_seed(123)  # a fresh model with other weights
    plain = case.build().eval()
    x = _input(batch_for(module, SHAPE))
    with torch.no_grad():
        before = plain(x)
        result = plain.load_state_dict(synced.state_dict(), strict=True)
        assert not result.missing_keys
        assert not result.unexpected_keys
        after = plain(x)
        assert torch.equal(after, module(x))
    assert not torch.equal(before, after), "the loaded state dict changed nothing"
    # and back: a BatchNorm checkpoint loads into the converted model
    back = nn.SyncBatchNorm.convert_sync_batchnorm(case.build()).eval()
    back.load_state_dict(module.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(back(x), module(x))


@pytest.mark.parametrize(
    "make",
    [
        lambda norm: gald.GALDHead(16, NUM_CLASSES, channels=16, norm_layer=norm),
        lambda norm: gald.AuxHead(16, NUM_CLASSES, channels=16, norm_layer=norm),
        lambda norm: gald.LocalDistribution(16, norm_layer=norm),
    ],
    ids=["GALDHead", "AuxHead", "LocalDistribution"],
)
def test_norm_layer_syncbn_by_construction(make) -> None:
    torch.manual_seed(0)
    plain = make(nn.BatchNorm2d).eval()
    synced = make(nn.SyncBatchNorm).eval()
    assert _count(synced, nn.SyncBatchNorm) == _count(plain, nn.BatchNorm2d) > 0
    synced.load_state_dict(plain.state_dict(), strict=True)
    x = _input((2, 16, 13, 15))
    with torch.no_grad():
        assert torch.equal(synced(x), plain(x))
