"""CGNL: equality with an explicit per-group loop, structural properties, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gald.ga import CGNL


def _slow(m: CGNL, x: torch.Tensor) -> torch.Tensor:
    t, p, g = m.t(x), m.p(x), m.g(x)
    width = m.inter_channels // m.groups
    out = torch.zeros_like(t)
    for b in range(x.shape[0]):
        for k in range(m.groups):
            sl = slice(k * width, (k + 1) * width)
            a = 0.0
            for c in range(sl.start, sl.stop):  # explicit sum over (c, h, w)
                a = a + (p[b, c] * g[b, c]).sum()
            if m.use_scale:
                a = a / math.sqrt(width * x.shape[-2] * x.shape[-1])
            out[b, sl] = a * t[b, sl]
    return m.gn(m.z(out)) + x


def _randomise(m: CGNL) -> CGNL:
    with torch.no_grad():
        m.gn.weight.uniform_(0.5, 1.5)
        m.gn.bias.normal_(0, 0.5)
    return m


@pytest.mark.parametrize("use_scale", [False, True])
@pytest.mark.parametrize(
    ("c", "inter", "groups"), [(8, None, 2), (12, 6, 3), (8, 8, 1), (16, 8, 8)]
)
def test_matches_slow(use_scale: bool, c: int, inter: int | None, groups: int) -> None:
    m = _randomise(CGNL(c, inter_channels=inter, groups=groups, use_scale=use_scale)).double()
    x = torch.randn(2, c, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(m(x), _slow(m, x), rtol=1e-10, atol=1e-10)


def test_spatial_permutation_equivariance() -> None:
    m = _randomise(CGNL(8, groups=2)).double()
    x = torch.randn(2, 8, 4, 6, dtype=torch.float64)
    perm = torch.randperm(24)
    xp = x.flatten(2)[..., perm].reshape(2, 8, 4, 6)
    torch.testing.assert_close(m(xp), m(x).flatten(2)[..., perm].reshape(2, 8, 4, 6))


def test_batch_independence() -> None:
    m = _randomise(CGNL(8, groups=2)).eval()
    x = torch.randn(3, 8, 5, 5)
    y = m(x)
    x2 = x.clone()
    x2[1] = torch.randn(8, 5, 5)
    y2 = m(x2)
    torch.testing.assert_close(y2[0], y[0])
    torch.testing.assert_close(y2[2], y[2])


def test_gradcheck() -> None:
    m = _randomise(CGNL(4, groups=2)).double()
    x = torch.randn(2, 4, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_gradients_reach_every_parameter() -> None:
    m = CGNL(8, groups=2)
    m(torch.randn(2, 8, 5, 5)).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bf16_autocast_close() -> None:
    m = _randomise(CGNL(16, groups=4)).eval()
    x = torch.randn(2, 16, 9, 9)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.1)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        # with the default inter_channels the error names the caller's own argument
        (
            {"channels": 10, "groups": 4},
            r"^channels=10 must be a multiple of 2 \* groups = 8 .*use channels=8 or 16, or",
        ),
        ({"channels": 40}, r"^channels=40 must be a multiple of 2 \* groups = 16 .*32 or 48"),
        ({"channels": 8, "groups": 8}, r"^channels=8 .*: use channels=16, or pass"),
        ({"channels": 10, "inter_channels": 4, "groups": 4}, "channels=10 must be divisible by"),
        ({"channels": 8, "inter_channels": 4, "groups": 8}, "inter_channels=4 must be divisible"),
        ({"channels": 8, "inter_channels": 6, "groups": 4}, "inter_channels=6 must be divisible"),
        ({"channels": 8, "groups": 0}, "groups must be >= 1"),
    ],
)
def test_bad_constructor(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        CGNL(**kwargs)


def test_group_norm_used() -> None:
    assert isinstance(CGNL(16).gn, nn.GroupNorm)


def _large_input() -> torch.Tensor:
    # positive, nearly constant features: each group's sum over (c, h, w) adds ~1000 products
    # of the same sign and leaves the float16 range (max 65504)
    return (40 + torch.randn(2, 16, 16, 16)).half()


def test_float16_sum_does_not_overflow() -> None:
    m = _randomise(CGNL(16, groups=2))
    x = _large_input()
    expected = m.double()(x.double())
    p = m.half().p(x).reshape(2, 2, 1, -1)
    g = m.g(x).reshape(2, 2, -1, 1)
    assert not torch.isfinite(torch.matmul(p, g)).all()  # a float16 sum would overflow
    out = m(x)
    assert out.dtype == torch.float16
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=2e-3, atol=5e-2)


@pytest.mark.skipif(
    not torch.amp.is_autocast_available("cpu"), reason="this torch has no CPU autocast"
)
def test_float16_autocast_sum_does_not_overflow() -> None:
    m = _randomise(CGNL(16, groups=2))
    x = _large_input().float()
    expected = m.double()(x.double())
    m.float()
    with torch.autocast("cpu", dtype=torch.float16):
        assert m.p(x).dtype == torch.float16  # the projections do run in float16
        out = m(x)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=2e-3, atol=5e-2)


def test_norm_and_act_keywords_keep_the_group_norm() -> None:
    m = CGNL(16, norm_layer=nn.SyncBatchNorm, act_layer=nn.GELU)
    assert isinstance(m.gn, nn.GroupNorm)
    assert not any(isinstance(layer, (nn.SyncBatchNorm, nn.GELU)) for layer in m.modules())
    with pytest.raises(TypeError, match="norm_layer"):
        CGNL(16, norm_layer="bn")  # type: ignore[arg-type]
