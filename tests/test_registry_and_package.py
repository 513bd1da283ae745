"""Registry, package metadata and public API surface."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from torch import nn

import gald


def test_version() -> None:
    assert isinstance(gald.__version__, str) and gald.__version__.count(".") >= 2
    assert importlib.metadata.version("gald") == gald.__version__


def test_runtime_dependencies_are_torch_and_einops_only() -> None:
    reqs = importlib.metadata.requires("gald") or []
    runtime = sorted(r.split(">")[0].split("=")[0].split("<")[0].strip() for r in reqs if "extra ==" not in r)
    assert runtime == ["einops", "torch"]


def test_list_and_create() -> None:
    names = gald.list_ga()
    assert "cgnl" in names and names == sorted(names)
    layer = gald.create_ga("cgnl", 16, groups=4)
    assert isinstance(layer, gald.ga.CGNL) and layer.groups == 4
    with pytest.raises(ValueError, match="unknown GA module 'x'.*cgnl"):
        gald.create_ga("x", 16)
    with pytest.raises(TypeError, match="name must be a str"):
        gald.create_ga(3, 16)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", gald.list_ga())
def test_every_registered_layer_takes_channels_first(name: str) -> None:
    layer = gald.create_ga(name, 16).eval()
    assert isinstance(layer, nn.Module)
    x = torch.randn(2, 16, 6, 7)
    assert layer(x).shape == x.shape
    assert gald.get_ga_class(name).ga_name == name  # type: ignore[attr-defined]


def test_register_conflict() -> None:
    with pytest.raises(ValueError, match="already registered"):
        gald.register_ga("cgnl")(nn.Identity)


def test_public_api_is_small_and_importable() -> None:
    for name in gald.__all__:
        assert hasattr(gald, name), name
    assert {"GALD", "LocalDistribution", "GALDHead", "AuxHead", "create_ga", "list_ga"} <= set(gald.__all__)
