"""Every registered GA layer builds all its norms and activations from ``norm_layer`` and
``act_layer``, or has none that a batch-norm choice could concern."""

from __future__ import annotations

import inspect

import pytest
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

import gald
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
    keywords = _keywords(name)
    default = gald.create_ga(name, 16)
    if not keywords:
        # nothing to replace: no norm and no activation module at all
        assert not any(isinstance(m, NORMS + ACTIVATIONS) for m in default.modules())
        return
    assert keywords == {"norm_layer", "act_layer"}, "both keywords or neither"
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
