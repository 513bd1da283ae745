"""Every registered GA layer takes ``norm_layer`` and ``act_layer`` and builds all its norms and
activations from them (a layer without any accepts and ignores them)."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

import gald
from gald.models import DilatedResNet
from gald.registry import get_ga_class

# Norms that are part of a layer's definition, normalise each sample on its own and are
# documented as not replaced by ``norm_layer``.
INTRINSIC = {"gc": (nn.LayerNorm,), "cgnl": (nn.GroupNorm,)}
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Hardswish)
NORMS = (_NormBase, nn.GroupNorm, nn.LayerNorm)


def _keywords(name: str) -> set[str]:
    params = inspect.signature(get_ga_class(name)).parameters
    return {"norm_layer", "act_layer"} & set(params)


@pytest.mark.parametrize("name", gald.list_ga())
def test_sync_batch_norm_replaces_every_batch_norm(name: str) -> None:
    # one signature for every GA: a model-wide norm choice can be handed to each of them
    assert _keywords(name) == {"norm_layer", "act_layer"}
    default = gald.create_ga(name, 16)
    layer = gald.create_ga(name, 16, norm_layer=nn.SyncBatchNorm, act_layer=nn.Hardswish)
    modules = list(layer.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in modules)
    assert not any(isinstance(m, ACTIVATIONS) and not isinstance(m, nn.Hardswish) for m in modules)
    # every norm the default builds is now a SyncBatchNorm, except the documented intrinsic ones
    intrinsic = INTRINSIC.get(name, ())
    expected = sum(isinstance(m, nn.BatchNorm2d) for m in default.modules())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in modules) == expected
    assert sum(isinstance(m, nn.Hardswish) for m in modules) == sum(
        isinstance(m, ACTIVATIONS) for m in default.modules()
    )
    assert all(
        isinstance(m, (nn.SyncBatchNorm, *intrinsic)) for m in modules if isinstance(m, NORMS)
    )


def test_the_check_can_fail() -> None:
    """The defaults do build plain BatchNorm2d layers, so the test above is not vacuous."""
    with_bn = [
        name
        for name in gald.list_ga()
        if any(isinstance(m, nn.BatchNorm2d) for m in gald.create_ga(name, 16).modules())
    ]
    assert {"aspp", "psp", "nonlocal", "ema", "glore", "dualgcn"} <= set(with_bn)


@pytest.mark.parametrize("name", ["aspp", "psp", "dualgcn", "glore", "ema", "nonlocal"])
def test_a_norm_factory_that_cannot_build_a_width_is_named(name: str) -> None:
    from functools import partial

    with pytest.raises(ValueError, match=r"^norm_layer=.*GroupNorm.*32\) cannot build a norm of"):
        gald.create_ga(name, 16, norm_layer=partial(nn.GroupNorm, 32))


def _channel_layer_norm(c: int) -> nn.Module:
    """mmcv's GC bottleneck norm: a layer norm over (C, 1, 1), for (B, C, 1, 1) maps only."""
    return nn.LayerNorm([c, 1, 1])


@pytest.mark.parametrize(
    ("build", "argument"),
    [
        (lambda f: gald.LocalDistribution(16, norm_layer=f), "norm_layer"),
        (lambda f: gald.GALD(16, "psp", downsample=False, norm_layer=f), "norm_layer"),
        (lambda f: gald.AuxHead(32, 3, channels=16, norm_layer=f), "norm_layer"),
        (lambda f: DilatedResNet(50, norm_layer=f), "norm_layer"),
        (lambda f: gald.create_ga("psp", 16, norm_layer=f), "norm_layer"),
        (lambda f: gald.create_ga("aspp", 16, pool_norm_layer=f), "pool_norm_layer"),
        (lambda f: gald.create_ga("gc", 16, bottleneck_norm_layer=f), "bottleneck_norm_layer"),
    ],
)
def test_a_norm_for_another_layout_is_refused_at_construction(build, argument: str) -> None:
    """Every layer that builds norms runs one on a small map once, so a factory for another
    layout (nn.LayerNorm, nn.BatchNorm1d) or one that builds no module is named at construction,
    not by torch at the first forward."""
    with pytest.raises(ValueError, match=rf"{argument}=.*LayerNorm.* cannot normalise a \(B, C"):
        build(nn.LayerNorm)
    with pytest.raises(TypeError, match=rf"{argument}=.* must build an nn.Module .* returned int"):
        build(lambda c: 5)


def test_norms_of_the_map_they_see_are_accepted() -> None:
    # a (C, 1, 1) layer norm is right where the map is 1x1: GC's bottleneck, ASPP's pooling
    gc = gald.create_ga("gc", 16, bottleneck_norm_layer=_channel_layer_norm)
    aspp = gald.create_ga("aspp", 16, pool_norm_layer=_channel_layer_norm)
    x = torch.randn(2, 16, 5, 7)
    assert gc(x).shape == aspp(x).shape == x.shape
    with pytest.raises(ValueError, match=r"norm_layer=.*cannot normalise"):
        gald.create_ga("psp", 16, norm_layer=_channel_layer_norm)  # psp's output norm sees 5x7
    with pytest.raises(TypeError, match=r"act_layer=.* must build an nn.Module .* returned str"):
        gald.AuxHead(32, 3, act_layer=lambda: "relu")
