"""channels_last: the LD and the GALD block give the values of NCHW and keep the memory format.

A user who wants CPU speed converts the model and its inputs once
(``model.to(memory_format=torch.channels_last)``); the branch then runs oneDNN's channels_last
depthwise convs and the fused op works on rows of ``W * C`` without any layout conversion.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gald
from gald import fuse

CL = torch.channels_last


def _randomise(m: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                n = mod.num_features
                mod.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                mod.bias.copy_(torch.randn(n, generator=gen) * 0.5)
                mod.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                mod.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return m


def _step(model: nn.Module, x: torch.Tensor, g: torch.Tensor):
    model.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_()
    out = model(xr)
    out.backward(g)
    return out, xr.grad, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("train", [False, True])
def test_ld_channels_last_gives_the_values_of_nchw(padding: int, train: bool) -> None:
    ld = _randomise(gald.LocalDistribution(12, padding=padding, offset=2.0)).train(train)
    x = torch.randn(2, 12, 23, 19)
    g = torch.randn_like(x)
    want = _step(ld, x, g)
    ld_cl = ld.to(memory_format=CL)
    got = _step(ld_cl, x.contiguous(memory_format=CL), g.contiguous(memory_format=CL))
    assert got[0].is_contiguous(memory_format=CL)
    assert got[1] is not None and got[1].is_contiguous(memory_format=CL)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    # a conv bias before a train-mode BatchNorm has a zero gradient up to the rounding of sums
    # of large terms: compare every gradient on the scale of the largest one
    scale = max(float(g.abs().max()) for g in want[2].values())
    for name, grad in want[2].items():
        torch.testing.assert_close(got[2][name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_fused_ld_in_channels_last() -> None:
    ld = _randomise(gald.LocalDistribution(8)).eval()
    x = torch.randn(1, 8, 21, 18)
    fused = fuse(ld).to(memory_format=CL)
    with torch.no_grad():
        got = fused(x.contiguous(memory_format=CL))
        want = ld(x)
    assert got.is_contiguous(memory_format=CL)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gald_channels_last_gives_the_values_of_nchw() -> None:
    block = _randomise(gald.GALD(8, "cgnl", ga_kwargs={"groups": 2})).eval()
    x = torch.randn(2, 8, 17, 15)
    with torch.no_grad():
        want = block(x)
        got = block.to(memory_format=CL)(x.contiguous(memory_format=CL))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
