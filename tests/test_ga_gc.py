"""GlobalContext: equality with a per-sample explicit reference, structure, gradients, shapes."""

from __future__ import annotations

import collections
import copy

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import gald
from _helpers import randomise
from gald.ga import GlobalContext

VARIANTS = [
    ("att", "add"),
    ("att", "mul"),
    ("avg", "add"),
    ("avg", "mul"),
    ("att", ("add", "mul")),
    ("avg", ("mul", "add")),
]


def reference(layer: GlobalContext, x: torch.Tensor) -> torch.Tensor:
    """Per sample: explicit softmax over positions, weighted sum, one bottleneck per fusion,
    then mmcv's ``ContextBlock`` order: ``out = x``, ``out = out * sigmoid(mul)`` if any,
    ``out = out + add`` if any."""
    b, c, h, w = x.shape
    out = torch.empty_like(x)
    for n in range(b):
        feats = x[n].reshape(c, h * w)  # (C, N)
        if layer.pooling == "att":
            logits = layer.conv_mask.weight.reshape(c) @ feats + layer.conv_mask.bias
            e = torch.exp(logits - logits.max())
            alpha = e / e.sum()
            context = feats @ alpha
        else:
            context = feats.sum(dim=1) / (h * w)
        terms = {}
        for name, (conv1, ln, _, conv2) in layer.transforms.items():
            t = conv1.weight[:, :, 0, 0] @ context + conv1.bias
            t = (t - t.mean()) / torch.sqrt(t.var(unbiased=False) + ln.eps)
            t = torch.relu(t * ln.weight.reshape(-1) + ln.bias.reshape(-1))
            terms[name] = conv2.weight[:, :, 0, 0] @ t + conv2.bias
        y = x[n]
        if "mul" in terms:
            y = y * torch.sigmoid(terms["mul"])[:, None, None]
        if "add" in terms:
            y = y + terms["add"][:, None, None]
        out[n] = y
    return out


@pytest.mark.parametrize(("pooling", "fusion"), VARIANTS)
def test_matches_reference(pooling: str, fusion: str | tuple[str, str]) -> None:
    torch.manual_seed(0)
    layer = randomise(GlobalContext(16, pooling=pooling, fusion=fusion))
    x = torch.randn(3, 16, 5, 7)
    expected = reference(copy.deepcopy(layer).double(), x.double())
    assert not torch.allclose(expected, x.double(), atol=1e-3)
    for training in (False, True):  # no batch statistics: both modes agree
        torch.testing.assert_close(layer.train(training)(x), expected.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("pooling", "fusion"), VARIANTS)
def test_spatial_permutation_equivariance(pooling: str, fusion: str | tuple[str, str]) -> None:
    torch.manual_seed(1)
    layer = randomise(GlobalContext(8, pooling=pooling, fusion=fusion))
    x = torch.randn(2, 8, 4, 5)
    perm = torch.randperm(20)

    def permute(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(2)[..., perm].reshape(t.shape)

    torch.testing.assert_close(layer(permute(x)), permute(layer(x)), rtol=1e-5, atol=1e-5)


def test_one_context_for_every_position() -> None:
    """Query-independent: ``out - x`` (add) and ``out / x`` (mul) are constant over positions."""
    torch.manual_seed(2)
    x = torch.randn(2, 8, 4, 5)
    add = randomise(GlobalContext(8, fusion="add"))(x) - x
    torch.testing.assert_close(add, add[..., :1, :1].expand_as(add), rtol=1e-5, atol=1e-5)
    gate = randomise(GlobalContext(8, fusion="mul"))(x) / x
    torch.testing.assert_close(gate, gate[..., :1, :1].expand_as(gate), rtol=1e-4, atol=1e-5)


def test_initialisation() -> None:
    """Last convs zero: ``add`` is the identity, ``mul`` (alone or with ``add``) halves the
    input (sigmoid(0))."""
    x = torch.randn(2, 16, 5, 4)
    torch.testing.assert_close(GlobalContext(16)(x), x, rtol=0, atol=0)
    half = torch.sigmoid(torch.zeros(()))
    torch.testing.assert_close(GlobalContext(16, fusion="mul")(x), x * half)
    torch.testing.assert_close(GlobalContext(16, fusion=("add", "mul"))(x), x * half)


def test_both_fusions_gate_before_adding() -> None:
    """With both fusions the add term is not gated: ``x * sigmoid(m) + a``, not
    ``(x + a) * sigmoid(m)``; each fusion has its own transform."""
    torch.manual_seed(5)
    layer = randomise(GlobalContext(8, fusion=["mul", "add"]))
    assert layer.fusion == ("add", "mul")
    assert set(layer.transforms) == {"add", "mul"}
    # any ordered sequence, as for every other sequence argument (an OmegaConf ListConfig)
    assert GlobalContext(8, fusion=collections.UserList(["mul"])).fusion == ("mul",)
    assert GlobalContext(8, fusion=np.array(["mul", "add"])).fusion == ("add", "mul")
    with pytest.raises(TypeError, match=r"fusion must be a sequence of names.*got set"):
        GlobalContext(8, fusion={"add"})
    x = torch.randn(2, 8, 3, 4)
    context = layer._context(x)
    gate = torch.sigmoid(layer.transforms["mul"](context))
    term = layer.transforms["add"](context)
    torch.testing.assert_close(layer(x), x * gate + term)
    assert not torch.allclose(layer(x), (x + term) * gate, atol=1e-3)


@pytest.mark.parametrize(("pooling", "fusion"), [("att", "add"), ("avg", "mul")])
def test_gradcheck(pooling: str, fusion: str) -> None:
    torch.manual_seed(3)
    layer = randomise(GlobalContext(8, pooling=pooling, fusion=fusion)).double()
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"channels": 0}, ValueError, "channels"),
        ({"channels": 8, "ratio": 0.0}, ValueError, "ratio"),
        ({"channels": 8, "ratio": "1/4"}, TypeError, "ratio"),
        ({"channels": 8, "ratio": 1 / 16}, ValueError, "ratio"),
        ({"channels": 8, "ratio": 4}, ValueError, r"ratio must be in \(0, 1\].*pass ratio=1/r"),
        ({"channels": 8, "pooling": "max"}, ValueError, "pooling"),
        ({"channels": 8, "pooling": None}, TypeError, "pooling"),
        ({"channels": 8, "fusion": "channel_add"}, ValueError, "fusion"),
        ({"channels": 8, "fusion": ()}, ValueError, "fusion"),
        ({"channels": 8, "fusion": ("add", "add")}, ValueError, "fusion"),
        ({"channels": 8, "fusion": ("add", "max")}, ValueError, "fusion"),
        ({"channels": 8, "fusion": None}, TypeError, "fusion"),
        ({"channels": 8, "fusion": ("add", 1)}, TypeError, "fusion"),
        ({"channels": 8, "act_layer": "relu"}, TypeError, "act_layer"),
        ({"channels": 8, "norm_layer": 3}, TypeError, "norm_layer"),
        ({"channels": 8, "bottleneck_norm_layer": None}, TypeError, "bottleneck_norm_layer"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, error: type, needle: str) -> None:
    channels = kwargs.pop("channels")
    with pytest.raises(error, match=needle):
        GlobalContext(channels, **kwargs)


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"8 channels.*\(1, 6, 2, 2\)"):
        GlobalContext(8)(torch.randn(1, 6, 2, 2))


def test_loads_a_single_transform_checkpoint() -> None:
    """State dicts that keep the one transform under ``transform.`` still load."""
    layer = randomise(GlobalContext(8, fusion="mul"))
    old = {
        k.replace("transforms.mul.", "transform."): v.clone() for k, v in layer.state_dict().items()
    }
    assert any(k.startswith("transform.") for k in old)
    fresh = GlobalContext(8, fusion="mul")
    fresh.load_state_dict(old)
    x = torch.randn(2, 8, 3, 4)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    wrapped = nn.Sequential(GlobalContext(8, fusion="mul"))  # under a prefix too
    wrapped.load_state_dict({f"0.{k}": v for k, v in old.items()})
    torch.testing.assert_close(wrapped(x), layer(x), rtol=0, atol=0)


def test_injectable_norm_and_activation() -> None:
    layer = GlobalContext(
        8,
        fusion=("add", "mul"),
        bottleneck_norm_layer=lambda c: nn.GroupNorm(1, c),
        act_layer=nn.GELU,
    )
    for transform in layer.transforms.values():
        assert isinstance(transform[1], nn.GroupNorm)
        assert isinstance(transform[2], nn.GELU)
    assert layer(torch.randn(1, 8, 3, 3)).shape == (1, 8, 3, 3)


def test_norm_layer_keeps_the_bottleneck_layer_norm() -> None:
    """``norm_layer`` (a model-wide batch-norm choice) does not replace GCNet's LayerNorm."""
    layer = GlobalContext(8, norm_layer=nn.SyncBatchNorm)
    assert isinstance(layer.transforms["add"][1], nn.LayerNorm)
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in layer.modules())
    x = torch.randn(1, 8, 3, 3)
    torch.testing.assert_close(layer.train()(x), x, rtol=0, atol=0)  # batch 1 still trains


@given(
    b=st.integers(0, 3),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    variant=st.sampled_from(VARIANTS),
    training=st.booleans(),
)
def test_shape_preserved(
    b: int, h: int, w: int, variant: tuple[str, str | tuple[str, str]], training: bool
) -> None:
    pooling, fusion = variant
    layer = randomise(GlobalContext(8, pooling=pooling, fusion=fusion)).train(training)
    out = layer(torch.randn(b, 8, h, w))
    assert out.shape == (b, 8, h, w)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("pooling", "fusion"), VARIANTS)
def test_bf16_autocast_close_to_fp32(pooling: str, fusion: str | tuple[str, str]) -> None:
    """Tolerance: max |bf16 - fp32| <= 5e-2 * max |fp32 output - x|."""
    torch.manual_seed(4)
    layer = randomise(GlobalContext(16, pooling=pooling, fusion=fusion))
    x = torch.randn(2, 16, 9, 7)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert torch.isfinite(out).all()
    assert (out.float() - expected).abs().max() <= 5e-2 * (expected - x).abs().max()


def test_registry_and_gald() -> None:
    assert isinstance(gald.create_ga("gc", 16, pooling="avg"), GlobalContext)
