"""PyramidPooling: exact adaptive pooling, per-bin loop reference (the mmseg configuration
included), out_channels, align_corners, batch 1, gradients, shapes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import gald
from _helpers import bn_reference, randomise
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


def reference(layer: PyramidPooling, x: torch.Tensor, training: bool) -> torch.Tensor:
    """Restated as mmseg's ``PPM`` + ``PSPHead`` bottleneck (hszhao's PSPNet for the default
    widths): loop-pooled bins, 1x1 conv [-> BN] -> ReLU per bin, bilinear upsampling, concat
    with ``x``, 3x3 conv -> BN -> ReLU; batch norms written out."""
    feats = [x]
    for bins, branch in zip(layer.bins, layer.branches):
        conv = branch[0]
        pooled = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], pool_reference(x, bins))
        if conv.bias is not None:
            pooled = pooled + conv.bias.reshape(1, -1, 1, 1)
        if isinstance(branch[1], nn.BatchNorm2d):
            pooled = bn_reference(branch[1], pooled, training)
        feats.append(
            F.interpolate(
                torch.relu(pooled),
                size=x.shape[-2:],
                mode="bilinear",
                align_corners=layer.align_corners,
            )
        )
    fused = F.conv2d(torch.cat(feats, dim=1), layer.fuse[0].weight, padding=1)
    return torch.relu(bn_reference(layer.fuse[1], fused, training))


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
    expected = reference(ref_layer, x.double(), training)
    torch.testing.assert_close(layer(x), expected.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("training", [False, True])
def test_matches_mmseg_configuration_in_float64(training: bool) -> None:
    """mmseg's ``PSPHead(in_channels=12, channels=5)``: channel-changing, branch width = output
    width, BatchNorm on every branch, ``align_corners=False``; random BN statistics."""
    layer = PyramidPooling(
        12,
        out_channels=5,
        bins=(1, 2, 3),
        branch_channels=5,
        align_corners=False,
        pool_norm_layer=nn.BatchNorm2d,
    )
    layer = randomise(layer, seed=3).double().train(training)
    x = torch.randn(2, 12, 7, 6, dtype=torch.float64)
    expected = reference(layer, x, training)
    assert expected.shape == (2, 5, 7, 6)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_align_corners_is_used() -> None:
    torch.manual_seed(5)
    x = torch.randn(1, 8, 7, 5)
    true = randomise(PyramidPooling(8, bins=(2,))).eval()
    false = copy.deepcopy(true)
    false.align_corners = False
    assert "align_corners=True" in repr(true)
    assert not torch.allclose(true(x), false(x), atol=1e-4)


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
        ({"channels": 8, "out_channels": 0}, ValueError, "out_channels"),
        ({"channels": 8, "out_channels": "8"}, TypeError, "out_channels"),
        ({"channels": 8, "branch_channels": 0}, ValueError, "branch_channels"),
        ({"channels": 8, "align_corners": 1}, TypeError, "align_corners"),
        ({"channels": 8, "norm_layer": None}, TypeError, "norm_layer"),
        ({"channels": 8, "act_layer": 0}, TypeError, "act_layer"),
        ({"channels": 8, "pool_norm_layer": "bn"}, TypeError, "pool_norm_layer"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, error: type, needle: str) -> None:
    channels = kwargs.pop("channels")
    with pytest.raises(error, match=needle):
        PyramidPooling(channels, **kwargs)


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"8 channels.*\(1, 6, 2, 2\)"):
        PyramidPooling(8)(torch.randn(1, 6, 2, 2))


@given(
    b=st.integers(0, 3),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    channels=st.integers(2, 12),
    out_channels=st.integers(1, 12),
    training=st.booleans(),
)
def test_shape(b: int, h: int, w: int, channels: int, out_channels: int, training: bool) -> None:
    # batch 1 trains; only the fusion BatchNorm needs more than one value per channel
    assume(not training or b * h * w >= 2)
    layer = PyramidPooling(channels, out_channels=out_channels, bins=(1, 2)).train(training)
    out = layer(torch.randn(b, channels, h, w))
    assert out.shape == (b, out_channels, h, w)
    assert torch.isfinite(out).all()


def test_widths_are_shown_and_default_as_pspnet() -> None:
    layer = PyramidPooling(16)
    assert (layer.out_channels, layer.branch_channels) == (16, 4)
    layer = PyramidPooling(16, out_channels=6, branch_channels=3)
    assert "out_channels=6" in repr(layer)
    assert "branch_channels=3" in repr(layer)
    assert layer.fuse[0].in_channels == 16 + 4 * 3
    assert layer.fuse[1].num_features == 6
    # an explicit branch width lifts the channels >= len(bins) limit
    assert PyramidPooling(3, branch_channels=2)(torch.randn(1, 3, 4, 4)).shape == (1, 3, 4, 4)


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


def test_registry_and_gald() -> None:
    assert isinstance(gald.create_ga("psp", 16, bins=(1, 3)), PyramidPooling)
    assert gald.create_ga("psp", 16, out_channels=4).out_channels == 4
