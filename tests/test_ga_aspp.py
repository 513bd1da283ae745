"""ASPP: equality with an explicit shifted-tap reference (the torchvision, smp and mmseg
configurations included), out_channels, batch 1, dropout, gradients, shapes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import gald
from _helpers import bn_reference, randomise
from gald.ga import ASPP


def atrous_reference(x: torch.Tensor, weight: torch.Tensor, rate: int) -> torch.Tensor:
    """A 3x3 conv with dilation and zero padding ``rate``, as a sum of nine shifted 1x1 taps."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (rate, rate, rate, rate))
    out = 0
    for di in range(3):
        for dj in range(3):
            shifted = padded[..., di * rate : di * rate + h, dj * rate : dj * rate + w]
            out = out + torch.einsum("oc,bchw->bohw", weight[:, :, di, dj], shifted)
    return out


def reference(
    layer: ASPP, x: torch.Tensor, training: bool, *, align_corners: bool = False
) -> torch.Tensor:
    """Restated as torchvision's ``ASPP`` (and smp's, and mmseg's ``ASPPHead`` with a 1x1
    bottleneck): the image-pooling branch is ``AdaptiveAvgPool2d(1)`` -> conv [-> norm] -> act
    -> bilinear ``F.interpolate`` with the given ``align_corners``; every conv is an explicit
    sum of taps."""
    _, _, h, w = x.shape

    def conv_bn_relu(seq: nn.Sequential, y: torch.Tensor) -> torch.Tensor:
        return torch.relu(bn_reference(seq[1], y, training))

    one = layer.branch_1x1
    feats = [conv_bn_relu(one, torch.einsum("oc,bchw->bohw", one[0].weight[:, :, 0, 0], x))]
    for rate, branch in zip(layer.rates, layer.branches_atrous):
        feats.append(conv_bn_relu(branch, atrous_reference(x, branch[0].weight, rate)))
    conv = layer.branch_pool[0]
    mean = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    pooled = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], mean)
    if conv.bias is not None:
        pooled = pooled + conv.bias.reshape(1, -1, 1, 1)
    if isinstance(layer.branch_pool[1], nn.BatchNorm2d):
        pooled = bn_reference(layer.branch_pool[1], pooled, training)
    pooled = torch.relu(pooled)
    feats.append(F.interpolate(pooled, size=(h, w), mode="bilinear", align_corners=align_corners))
    cat = torch.cat(feats, dim=1)
    fused = torch.einsum("oc,bchw->bohw", layer.fuse[0].weight[:, :, 0, 0], cat)
    return torch.relu(bn_reference(layer.fuse[1], fused, training))


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("out_channels", [None, 5])
def test_matches_reference(training: bool, out_channels: int | None) -> None:
    torch.manual_seed(0)
    # rates 1 and 2 act inside the 5x6 map; 7 exceeds it (centre tap only)
    layer = ASPP(8, out_channels=out_channels, rates=(1, 2, 7), inner_channels=6, dropout=0.0)
    layer = randomise(layer).train(training)
    x = torch.randn(2, 8, 5, 6)
    expected = reference(copy.deepcopy(layer).double(), x.double(), training)
    assert expected.shape == (2, out_channels or 8, 5, 6)
    torch.testing.assert_close(layer(x), expected.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("align_corners", [False, True])
def test_matches_torchvision_configuration_in_float64(align_corners: bool) -> None:
    """Channel-changing, BatchNorm on the pooling branch (torchvision, smp, mmseg), random BN
    statistics, either ``align_corners``: equal to float64 rounding."""
    layer = ASPP(
        12,
        out_channels=5,
        rates=(1, 3),
        inner_channels=4,
        dropout=0.0,
        pool_norm_layer=nn.BatchNorm2d,
    )
    layer = randomise(layer, seed=7).double().eval()
    x = torch.randn(2, 12, 6, 5, dtype=torch.float64)
    expected = reference(layer, x, training=False, align_corners=align_corners)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_large_rate_is_a_centre_tap() -> None:
    """When the rate is at least the side, the atrous conv equals its centre tap alone."""
    torch.manual_seed(1)
    layer = randomise(ASPP(8, rates=(4,), inner_channels=4)).eval()
    branch = layer.branches_atrous[0]
    centre_only = copy.deepcopy(branch)
    with torch.no_grad():
        mask = torch.zeros(3, 3)
        mask[1, 1] = 1.0
        centre_only[0].weight.mul_(mask)
    x = torch.randn(2, 8, 4, 3)
    torch.testing.assert_close(branch(x), centre_only(x), rtol=1e-6, atol=1e-6)
    wide = torch.randn(2, 8, 9, 9)  # with room for the other taps the two differ
    assert not torch.allclose(branch(wide), centre_only(wide), atol=1e-4)


def test_image_pooling_reaches_every_position() -> None:
    torch.manual_seed(2)
    layer = randomise(ASPP(8, rates=(1,), inner_channels=8)).eval()
    x = torch.randn(1, 8, 12, 12)
    y = x.clone()
    y[..., 11, 11] += 3.0  # only the image-pooling branch sees this at the top-left corner
    assert (layer(y) - layer(x))[..., :9, :9].abs().max() > 1e-4


def test_batch_one_trains() -> None:
    """No BatchNorm on the 1x1 image-pool map by default, so batch 1 trains."""
    layer = ASPP(8, inner_channels=4).train()
    out = layer(torch.randn(1, 8, 5, 4))
    out.mean().backward()
    assert out.shape == (1, 8, 5, 4)
    with pytest.raises(ValueError, match="more than 1 value"):
        ASPP(8, inner_channels=4, pool_norm_layer=nn.BatchNorm2d).train()(torch.randn(1, 8, 5, 4))


def test_dropout_drops_whole_channels_in_train_mode_only() -> None:
    torch.manual_seed(3)
    p = 0.5
    layer = randomise(ASPP(16, rates=(1, 2), inner_channels=4, dropout=p))
    plain = copy.deepcopy(layer)
    plain.fuse[-1].p = 0.0
    x = torch.randn(2, 16, 4, 5)
    layer.eval()
    plain.eval()
    torch.testing.assert_close(layer(x), plain(x), rtol=0, atol=0)
    layer.train()
    plain.train()
    out, full = layer(x), plain(x)
    dropped = (out == 0).flatten(2).all(dim=-1)  # (B, C): whole planes zeroed
    kept = torch.isclose(out, full / (1 - p), rtol=1e-5, atol=1e-6).flatten(2).all(dim=-1)
    assert (dropped | kept).all()
    live = full.flatten(2).abs().amax(dim=-1) > 0
    assert (dropped & live).any()
    assert (kept & live & ~dropped).any()


def test_gradcheck() -> None:
    torch.manual_seed(4)
    layer = randomise(ASPP(8, rates=(1, 2), inner_channels=4, dropout=0.0)).double().eval()
    x = torch.randn(1, 8, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"channels": 0}, ValueError, "channels"),
        ({"channels": 8, "rates": (12, 0)}, ValueError, "rates"),
        ({"channels": 8, "rates": 12}, TypeError, "rates"),
        ({"channels": 8, "rates": (1.5,)}, TypeError, "rates"),
        ({"channels": 8, "inner_channels": 0}, ValueError, "inner_channels"),
        ({"channels": 8, "out_channels": 0}, ValueError, "out_channels"),
        ({"channels": 8, "out_channels": 4.0}, TypeError, "out_channels"),
        ({"channels": 8, "norm_layer": None}, TypeError, "norm_layer"),
        ({"channels": 8, "act_layer": "relu"}, TypeError, "act_layer"),
        ({"channels": 8, "pool_norm_layer": 1}, TypeError, "pool_norm_layer"),
        ({"channels": 8, "dropout": 1.0}, ValueError, "dropout"),
        ({"channels": 8, "dropout": -0.1}, ValueError, "dropout"),
        ({"channels": 8, "dropout": "0.1"}, TypeError, "dropout"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, error: type, needle: str) -> None:
    channels = kwargs.pop("channels")
    with pytest.raises(error, match=needle):
        ASPP(channels, **kwargs)


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"8 channels.*\(1, 6, 2, 2\)"):
        ASPP(8, inner_channels=4)(torch.randn(1, 6, 2, 2))


@given(
    b=st.integers(0, 3),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    channels=st.integers(1, 12),
    out_channels=st.integers(1, 12),
    training=st.booleans(),
)
def test_shape(b: int, h: int, w: int, channels: int, out_channels: int, training: bool) -> None:
    # the conv-branch and fusion BatchNorms need more than one value per channel in training
    assume(not training or b * h * w >= 2)
    layer = ASPP(channels, out_channels=out_channels, rates=(2, 5), inner_channels=3)
    out = layer.train(training)(torch.randn(b, channels, h, w))
    assert out.shape == (b, out_channels, h, w)
    assert torch.isfinite(out).all()


def test_out_channels_is_shown_and_defaults_to_channels() -> None:
    assert ASPP(8, inner_channels=4).out_channels == 8
    layer = ASPP(8, out_channels=3, inner_channels=4)
    assert "out_channels=3" in repr(layer)
    assert layer.fuse[0].out_channels == 3
    assert layer.fuse[1].num_features == 3


def test_bf16_autocast_close_to_fp32() -> None:
    """Tolerance: max |bf16 - fp32| <= 5e-2 * max |fp32|."""
    torch.manual_seed(5)
    layer = randomise(ASPP(16, rates=(1, 2, 3), inner_channels=8)).eval()
    x = torch.randn(2, 16, 9, 7)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert torch.isfinite(out).all()
    assert (out.float() - expected).abs().max() <= 5e-2 * expected.abs().max()


def test_registry_and_gald() -> None:
    assert isinstance(gald.create_ga("aspp", 16, inner_channels=8), ASPP)
    assert gald.create_ga("aspp", 16, out_channels=4, inner_channels=8).out_channels == 4
