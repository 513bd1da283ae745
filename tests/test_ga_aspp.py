"""ASPP: equality with an explicit shifted-tap reference, batch 1, dropout, gradients, shapes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import gald
from _helpers import randomise
from gald.ga import ASPP


def bn_reference(bn: nn.BatchNorm2d, y: torch.Tensor, training: bool) -> torch.Tensor:
    if training:
        mean = y.mean(dim=(0, 2, 3))
        var = y.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    shape = (1, -1, 1, 1)
    normed = (y - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + bn.eps)
    return normed * bn.weight.reshape(shape) + bn.bias.reshape(shape)


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


def reference(layer: ASPP, x: torch.Tensor, training: bool) -> torch.Tensor:
    _, _, h, w = x.shape

    def conv_bn_relu(seq: nn.Sequential, y: torch.Tensor) -> torch.Tensor:
        return torch.relu(bn_reference(seq[1], y, training))

    one = layer.branch_1x1
    feats = [conv_bn_relu(one, torch.einsum("oc,bchw->bohw", one[0].weight[:, :, 0, 0], x))]
    for rate, branch in zip(layer.rates, layer.branches_atrous):
        feats.append(conv_bn_relu(branch, atrous_reference(x, branch[0].weight, rate)))
    conv = layer.branch_pool[0]
    mean = x.mean(dim=(2, 3))  # (B, C)
    pooled = torch.relu(mean @ conv.weight[:, :, 0, 0].T + conv.bias)  # (B, D)
    feats.append(pooled[:, :, None, None].repeat(1, 1, h, w))
    cat = torch.cat(feats, dim=1)
    fused = torch.einsum("oc,bchw->bohw", layer.fuse[0].weight[:, :, 0, 0], cat)
    return torch.relu(bn_reference(layer.fuse[1], fused, training))


@pytest.mark.parametrize("training", [False, True])
def test_matches_reference(training: bool) -> None:
    torch.manual_seed(0)
    # rates 1 and 2 act inside the 5x6 map; 7 exceeds it (centre tap only)
    layer = randomise(ASPP(8, rates=(1, 2, 7), inner_channels=6, dropout=0.0)).train(training)
    x = torch.randn(2, 8, 5, 6)
    expected = reference(copy.deepcopy(layer).double(), x.double(), training)
    torch.testing.assert_close(layer(x), expected.float(), rtol=1e-4, atol=1e-4)


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


@settings(max_examples=20, deadline=None)
@given(
    b=st.integers(0, 3),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    training=st.booleans(),
)
def test_shape_preserved(b: int, h: int, w: int, training: bool) -> None:
    # the conv-branch and fusion BatchNorms need more than one value per channel in training
    assume(not training or b * h * w >= 2)
    layer = ASPP(8, rates=(2, 5), inner_channels=4).train(training)
    out = layer(torch.randn(b, 8, h, w))
    assert out.shape == (b, 8, h, w)
    assert torch.isfinite(out).all()


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


def test_no_tensor_on_the_default_device() -> None:
    layer = ASPP(8, inner_channels=4).to("meta")
    out = layer(torch.empty(2, 8, 5, 3, device="meta"))
    assert out.device.type == "meta"
    assert out.shape == (2, 8, 5, 3)


def test_registry_and_gald() -> None:
    assert isinstance(gald.create_ga("aspp", 16, inner_channels=8), ASPP)
    block = gald.GALD(16, ga_module="aspp", ga_kwargs={"inner_channels": 8}).eval()
    assert block(torch.randn(2, 16, 9, 11)).shape == (2, 16, 9, 11)
