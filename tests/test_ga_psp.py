"""PyramidPooling: exact adaptive pooling, per-bin loop reference, batch 1, gradients, shapes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import gald
from _helpers import randomise
from gald.ga import PyramidPooling
from gald.ga.psp import adaptive_avg_pool


def pool_reference(x: torch.Tensor, bins: int) -> torch.Tensor:
    """Adaptive average pooling by explicit loops over the bins and their windows."""
    h, w = x.shape[-2:]
    out = x.new_zeros(*x.shape[:-2], bins, bins)
    for i in range(bins):
        top, bottom = math.floor(i * h / bins), math.ceil((i + 1) * h / bins)
        for j in range(bins):
            left, right = math.floor(j * w / bins), math.ceil((j + 1) * w / bins)
            out[..., i, j] = x[..., top:bottom, left:right].mean(dim=(-2, -1))
    return out


def reference(layer: PyramidPooling, x: torch.Tensor) -> torch.Tensor:
    feats = [x]
    for bins, branch in zip(layer.bins, layer.branches):
        pooled = branch(pool_reference(x, bins))
        feats.append(F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=True))
    return layer.fuse(torch.cat(feats, dim=1))


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 20), w=st.integers(1, 20), bins=st.integers(1, 8))
def test_adaptive_pool_equals_pytorch(h: int, w: int, bins: int) -> None:
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    out = adaptive_avg_pool(x, bins)
    torch.testing.assert_close(out, F.adaptive_avg_pool2d(x, bins), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, pool_reference(x, bins), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("pool_norm", [None, "bn"])
def test_matches_reference(training: bool, pool_norm: str | None) -> None:
    torch.manual_seed(0)
    pool_norm_layer = nn.BatchNorm2d if pool_norm == "bn" else None
    layer = randomise(PyramidPooling(16, pool_norm_layer=pool_norm_layer)).train(training)
    ref_layer = copy.deepcopy(layer).double()
    x = torch.randn(2, 16, 7, 5)  # odd sizes: uneven, overlapping bins
    expected = reference(ref_layer, x.double())
    torch.testing.assert_close(layer(x), expected.float(), rtol=1e-4, atol=1e-4)


def test_branches_matter() -> None:
    """The pooled context reaches the output: changing a far pixel changes distant outputs."""
    torch.manual_seed(1)
    layer = randomise(PyramidPooling(16)).eval()
    x = torch.randn(1, 16, 9, 9)
    y = x.clone()
    y[..., 8, 8] += 3.0  # outside the 3x3 receptive field of the fusion conv at rows/cols < 7
    far = (layer(y) - layer(x))[..., :7, :7]
    assert far.abs().max() > 1e-3


def test_batch_one_trains() -> None:
    """The default (no norm on pooled branches) trains at batch 1; PSPNet's BN copy cannot."""
    torch.manual_seed(2)
    layer = PyramidPooling(8).train()
    out = layer(torch.randn(1, 8, 6, 5))
    out.mean().backward()
    assert out.shape == (1, 8, 6, 5)
    assert all(p.grad is not None for p in layer.parameters())
    with pytest.raises(ValueError, match="more than 1 value"):
        PyramidPooling(8, pool_norm_layer=nn.BatchNorm2d).train()(torch.randn(1, 8, 6, 5))


def test_gradcheck() -> None:
    torch.manual_seed(3)
    layer = randomise(PyramidPooling(8)).double().eval()
    x = torch.randn(1, 8, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"channels": 0}, ValueError, "channels"),
        ({"channels": 8, "bins": ()}, ValueError, "bins"),
        ({"channels": 8, "bins": (1, 0)}, ValueError, "bins"),
        ({"channels": 8, "bins": (1, 2.0)}, TypeError, "bins"),
        ({"channels": 8, "bins": "1236"}, TypeError, "bins"),
        ({"channels": 8, "bins": 3}, TypeError, "bins"),
        ({"channels": 8, "bins": (2, 2)}, ValueError, "distinct"),
        ({"channels": 3, "bins": (1, 2, 3, 6)}, ValueError, "len\\(bins\\)"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, error: type, needle: str) -> None:
    channels = kwargs.pop("channels")
    with pytest.raises(error, match=needle):
        PyramidPooling(channels, **kwargs)


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"8 channels.*\(1, 6, 2, 2\)"):
        PyramidPooling(8)(torch.randn(1, 6, 2, 2))


@settings(max_examples=20, deadline=None)
@given(
    b=st.integers(0, 3),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    training=st.booleans(),
)
def test_shape_preserved(b: int, h: int, w: int, training: bool) -> None:
    # batch 1 trains; only the fusion BatchNorm needs more than one value per channel
    assume(not training or b * h * w >= 2)
    layer = PyramidPooling(8).train(training)
    out = layer(torch.randn(b, 8, h, w))
    assert out.shape == (b, 8, h, w)
    assert torch.isfinite(out).all()


def test_bf16_autocast_close_to_fp32() -> None:
    """Tolerance: max |bf16 - fp32| <= 5e-2 * max |fp32|."""
    torch.manual_seed(4)
    layer = randomise(PyramidPooling(16)).eval()
    x = torch.randn(2, 16, 9, 7)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert torch.isfinite(out).all()
    assert (out.float() - expected).abs().max() <= 5e-2 * expected.abs().max()


def test_no_tensor_on_the_default_device() -> None:
    layer = PyramidPooling(8).to("meta")
    out = layer(torch.empty(2, 8, 5, 3, device="meta"))
    assert out.device.type == "meta"
    assert out.shape == (2, 8, 5, 3)


def test_registry_and_gald() -> None:
    assert isinstance(gald.create_ga("psp", 16, bins=(1, 3)), PyramidPooling)
    block = gald.GALD(16, ga_module="psp").eval()
    assert block(torch.randn(2, 16, 9, 11)).shape == (2, 16, 9, 11)
