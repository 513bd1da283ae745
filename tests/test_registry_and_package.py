"""Registry (create_ga, register_ga, unregister_ga, registered), package metadata, public API
surface and what the sdist contains."""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch
from torch import nn

import gald
import gald.testing

ROOT = Path(__file__).resolve().parents[1]


class Tiny(nn.Module):
    def __init__(self, channels: int, scale: float = 1.0) -> None:
        super().__init__()
        self.channels = channels
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Config(Mapping):
    """A minimal read-only mapping, like an OmegaConf DictConfig."""

    def __init__(self, **items: object) -> None:
        self._items = items

    def __getitem__(self, key: str) -> object:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def snapshot() -> dict[str, type[nn.Module]]:
    return {name: gald.get_ga_class(name) for name in gald.list_ga()}


def test_version() -> None:
    assert isinstance(gald.__version__, str) and gald.__version__.count(".") >= 2
    assert importlib.metadata.version("gald") == gald.__version__


def test_runtime_dependencies_are_torch_and_einops_only() -> None:
    reqs = importlib.metadata.requires("gald") or []
    runtime = sorted(
        r.split(">")[0].split("=")[0].split("<")[0].strip() for r in reqs if "extra ==" not in r
    )
    assert runtime == ["einops", "torch"]


def test_list_and_create_by_name() -> None:
    names = gald.list_ga()
    assert "cgnl" in names and names == sorted(names)
    layer = gald.create_ga("cgnl", 16, groups=4)
    assert isinstance(layer, gald.ga.CGNL) and layer.groups == 4
    assert gald.get_ga_class("cgnl") is gald.ga.CGNL and gald.ga.CGNL.ga_name == "cgnl"  # type: ignore[attr-defined]


def test_create_from_class_instance_and_mapping() -> None:
    built = gald.create_ga(Tiny, 8, scale=2.0)
    assert isinstance(built, Tiny) and built.channels == 8 and built.scale == 2.0
    ready = Tiny(8)
    assert gald.create_ga(ready, 8) is ready
    assert gald.create_ga(ready) is ready  # an instance needs no width
    cfg = Config(groups=2, use_scale=True)
    layer = gald.create_ga("cgnl", 16, **cfg)
    assert layer.groups == 2 and layer.use_scale  # type: ignore[union-attr]
    # a keyword partial of a class (a ``_partial_: true`` config): later keywords override it
    half = functools.partial(Tiny, scale=0.5)
    assert gald.create_ga(half, 8).scale == 0.5 and gald.create_ga(half, 8, scale=3.0).scale == 3.0
    # any callable channels -> module, called with the keywords
    made = gald.create_ga(lambda c, **kw: Tiny(c, **kw), 8, scale=4.0)
    assert isinstance(made, Tiny) and made.channels == 8 and made.scale == 4.0


def test_create_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="unknown GA module 'x'; expected one of .*'cgnl'"):
        gald.create_ga("x", 16)
    with pytest.raises(TypeError, match="ga must be a registry name .* got int 3"):
        gald.create_ga(3, 16)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="factory .* must return an nn.Module, got int"):
        gald.create_ga(lambda c: 3, 16)
    with pytest.raises(TypeError, match="channels is required to call the factory"):
        gald.create_ga(lambda c: Tiny(c))
    with pytest.raises(
        ValueError,
        match=r"kwargs must be empty when ga is an nn.Module instance .* got \['scale'\]",
    ):
        gald.create_ga(Tiny(8), 8, scale=2.0)
    with pytest.raises(ValueError, match=r"Tiny instance with channels=8, expected channels=16"):
        gald.create_ga(Tiny(8), 16)
    with pytest.raises(ValueError, match="channels must be >= 1, got 0"):
        gald.create_ga("cgnl", 0)
    with pytest.raises(TypeError, match="channels must be an int, got float"):
        gald.create_ga("cgnl", 16.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="channels is required to build CGNL from the name 'cgnl'"):
        gald.create_ga("cgnl")
    with pytest.raises(TypeError, match="channels is required to build Tiny from its class"):
        gald.create_ga(Tiny)
    with pytest.raises(ValueError, match="channels must be >= 1, got 0"):
        gald.create_ga(Tiny(8), 0)


@pytest.mark.parametrize("name", gald.list_ga())
def test_every_registered_layer_takes_channels_first(name: str) -> None:
    layer = gald.create_ga(name, 16).eval()
    x = torch.randn(2, 16, 6, 7)
    assert layer(x).shape == x.shape
    assert gald.get_ga_class(name).ga_name == name  # type: ignore[attr-defined]


def test_register_validation_and_conflict() -> None:
    with pytest.raises(ValueError, match="already registered"):
        gald.register_ga("cgnl")(nn.Identity)
    with pytest.raises(TypeError, match="name must be a str, got int"):
        gald.register_ga(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cls must be an nn.Module subclass, got <function"):
        gald.register_ga("fn")(lambda c: c)  # type: ignore[type-var]
    for name in ("", " ", "psp "):  # a name that would not round-trip through a config
        with pytest.raises(
            ValueError, match=rf"without leading or trailing whitespace, got {name!r}"
        ):
            gald.register_ga(name)


def test_register_and_unregister() -> None:
    before = snapshot()

    class Mine(Tiny):
        pass

    assert gald.register_ga("mine")(Mine) is Mine
    assert "mine" in gald.list_ga() and Mine.ga_name == "mine"  # type: ignore[attr-defined]
    assert gald.unregister_ga("mine") is Mine
    assert "mine" not in gald.list_ga() and not hasattr(Mine, "ga_name")
    assert snapshot() == before
    with pytest.raises(ValueError, match="unknown GA module 'mine'"):
        gald.unregister_ga("mine")
    # the call form, as registered(name, cls) takes it
    assert gald.register_ga("mine", Mine) is Mine
    assert gald.create_ga("mine", 4).__class__ is Mine
    with pytest.raises(ValueError, match="already registered"):
        gald.register_ga("mine", Tiny)
    with pytest.raises(TypeError, match="cls must be an nn.Module subclass, got None"):
        gald.register_ga("other", None)  # type: ignore[call-overload]
    assert gald.unregister_ga("mine") is Mine and snapshot() == before


def test_registered_restores_the_registry_exactly() -> None:
    before = snapshot()

    class Mine(Tiny):
        pass

    with gald.registered("mine", Mine) as cls:
        assert cls is Mine and "mine" in gald.list_ga()
        block = gald.GALD(8, "mine")
        assert isinstance(block.ga, Mine)
        gald.register_ga("also_mine")(Tiny)  # registered inside the block: removed on exit
    assert snapshot() == before
    assert not hasattr(Mine, "ga_name") and "ga_name" not in Tiny.__dict__

    with pytest.raises(RuntimeError, match="boom"), gald.registered("mine", Mine):
        raise RuntimeError("boom")
    assert snapshot() == before


def test_registered_with_a_taken_name() -> None:
    before = snapshot()
    with (
        pytest.raises(ValueError, match="'cgnl' is already registered to .*; pass replace=True"),
        gald.registered("cgnl", Tiny),
    ):
        pass
    with gald.registered("cgnl", Tiny, replace=True):
        assert gald.get_ga_class("cgnl") is Tiny
    assert snapshot() == before
    assert gald.get_ga_class("cgnl").ga_name == "cgnl"  # type: ignore[attr-defined]
    assert "ga_name" not in Tiny.__dict__
    # the class already registered under that name: allowed, and still registered afterwards
    with gald.registered("cgnl", gald.ga.CGNL):
        pass
    assert snapshot() == before


def test_a_class_under_two_names_keeps_its_first_ga_name() -> None:
    before = snapshot()

    class Mine(Tiny):
        pass

    gald.register_ga("x1")(Mine)
    gald.register_ga("x2")(Mine)
    try:
        assert Mine.ga_name == "x1"  # type: ignore[attr-defined]
        gald.unregister_ga("x2")
        assert Mine.ga_name == "x1"  # type: ignore[attr-defined]
        gald.register_ga("x2")(Mine)
        gald.unregister_ga("x1")  # its ga_name goes: the name it still has takes over
        assert Mine.ga_name == "x2"  # type: ignore[attr-defined]
    finally:
        gald.unregister_ga("x2")
    assert "ga_name" not in Mine.__dict__  # with the last name
    assert snapshot() == before


def test_registered_alias_keeps_the_builtin_ga_name() -> None:
    before = snapshot()
    cgnl = gald.ga.CGNL
    with gald.registered("alias", cgnl):
        assert gald.get_ga_class("alias") is cgnl
        assert cgnl.ga_name == "cgnl"  # type: ignore[attr-defined]
    assert cgnl.ga_name == "cgnl" and snapshot() == before  # type: ignore[attr-defined]

    class Mine(Tiny):
        pass

    with gald.registered("mine", Mine):
        gald.register_ga("mine_too")(Mine)  # a second name inside the block
        assert Mine.ga_name == "mine"  # type: ignore[attr-defined]
    assert "ga_name" not in Mine.__dict__ and snapshot() == before
    with gald.registered("mine", Mine):
        gald.register_ga("new")(Tiny)
        gald.register_ga("new_too")(Tiny)  # a class first registered inside the block
        assert Tiny.ga_name == "new"  # type: ignore[attr-defined]
    assert "ga_name" not in Tiny.__dict__ and snapshot() == before


def test_public_api_is_small_and_importable() -> None:
    """The top-level names, exactly: a new public name is a decision (and a line here)."""
    for name in gald.__all__:
        assert hasattr(gald, name), name
    assert len(gald.__all__) == len(set(gald.__all__))
    assert set(gald.__all__) == {
        "GALD",
        "LocalDistribution",
        "GALDHead",
        "AuxHead",
        "OhemCrossEntropy",
        "create_ga",
        "list_ga",
        "register_ga",
        "unregister_ga",
        "registered",
        "get_ga_class",
        "wrap",
        "fuse",
        "fuse_conv_bn",
        "ld_statistics",
        "__version__",
        # the subpackages, importable as attributes
        "convert",
        "deploy",
        "ga",
        "losses",
        "models",
        "ops",
    }


_NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "build", "dist"
)


def test_sdist_ships_the_library_docs_and_a_test_suite_that_runs(tmp_path: Path) -> None:
    """The sdist carries the library, the docs site's sources and the whole test suite with
    what it reads; unpacked, its tests run against its own sources (as a packager's recipe runs
    them)."""
    if not (ROOT / "pyproject.toml").is_file():
        pytest.fail("run from a source checkout: the sdist is built from the repository")
    src = tmp_path / "src_tree"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCES)
    code = (
        "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "dist")],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    archive = tmp_path / "dist" / out.stdout.strip().splitlines()[-1]
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12
            tar.extractall(tmp_path / "unpacked", filter="data")
        else:
            tar.extractall(tmp_path / "unpacked")
    package = {str(p.relative_to(src)) for p in (src / "src" / "gald").rglob("*.py")}
    assert package - names == set()
    suite = {str(p.relative_to(src)) for p in (src / "tests").glob("*.py")}
    assert "tests/conftest.py" in suite and "tests/_helpers.py" in suite
    assert suite - names == set()
    assert {
        "src/gald/testing/__init__.py",
        "README.md",
        "LICENSE",
        "pyproject.toml",
        "PKG-INFO",
        "mkdocs.yml",
        "docs/_ext/griffe_rst.py",
        ".ci/run",
        "benchmarks/docs_runs.sh",
    } <= names
    assert "docs/testing.md" in names
    assert "src/gald/py.typed" in names  # downstream type checkers read the annotations
    # the images the shipped pages embed and the data their benchmark blocks are made from
    assert {"docs/img/gald-block.svg", "docs/benchmarks.png", "docs/data/all.json"} <= names
    assert not [n for n in names if n.endswith(".pyc") or "__pycache__" in n]

    tree = next((tmp_path / "unpacked").iterdir())
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    env.pop("PYTEST_XDIST_WORKER_COUNT", None)
    where = subprocess.run(
        [sys.executable, "-c", "import gald; print(gald.__file__)"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert Path(where.stdout.strip()).is_relative_to(tree), where.stdout + where.stderr
    # a slice that reads the helpers, the README, the CI script and the docs pages
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_readme.py",
            "tests/test_api_reference.py",
            "tests/test_ld.py",
            "-k",
            "not gradcheck",
        ],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert re.search(r"\d+ passed", run.stdout), run.stdout[-500:]


def _fresh_classes(own_name: str) -> tuple[type[nn.Module], type[nn.Module]]:
    """Two new GA classes (registration labels them): one that defines its own ``ga_name``,
    one that defines none."""

    class Own(nn.Identity):
        ga_name = own_name

        def __init__(self, channels: int) -> None:
            super().__init__()

    class Bare(nn.Identity):
        def __init__(self, channels: int) -> None:
            super().__init__()

    return Own, Bare


def test_a_class_gets_back_the_ga_name_it_defined_itself() -> None:
    """Registered inside a ``registered`` block, or by ``register_ga`` and then unregistered: a
    class that defined its own ``ga_name`` has it again afterwards; one that had none has none."""

    Own, Bare = _fresh_classes("custom")
    with gald.registered("tmp_bare", Bare):
        gald.register_ga("tmp_own", Own)
        gald.register_ga("tmp_own2", Own)
        assert Own.ga_name == "tmp_own" and Bare.ga_name == "tmp_bare"
    assert Own.ga_name == "custom" and "ga_name" not in Bare.__dict__
    assert "tmp_own" not in gald.list_ga() and "tmp_bare" not in gald.list_ga()
    gald.register_ga("tmp_own", Own)
    gald.register_ga("tmp_own2", Own)
    gald.unregister_ga("tmp_own")
    assert Own.ga_name == "tmp_own2"  # still registered under its second name
    gald.unregister_ga("tmp_own2")
    assert Own.ga_name == "custom"


@pytest.mark.parametrize("name", gald.list_ga())
def test_repr_names_every_constructor_argument(name: str) -> None:
    # factories show up as the child modules they build; chunk_elements only where it is used
    shown_as_children = {"norm_layer", "act_layer", "pool_norm_layer", "bottleneck_norm_layer"}
    cls = gald.get_ga_class(name)
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    text = gald.create_ga(name, 16).extra_repr()
    missing = [
        p
        for p in params
        if p not in shown_as_children and p != "chunk_elements" and f"{p}=" not in text
    ]
    assert not missing, f"{cls.__name__}.extra_repr() omits {missing}: {text}"


def test_registered_restores_the_own_label_of_a_class_unregistered_inside():
    """A class with its own ga_name, registered outside, unregistered inside a
    registered() block: after the block it is registered again, and unregistering it then
    gives back its own ga_name (the block must restore _OWN_LABEL too)."""

    Mine, Other = _fresh_classes("mine")
    gald.register_ga("scoped_mine", Mine)
    try:
        assert Mine.ga_name == "scoped_mine"
        with gald.registered("scoped_other", Other):
            gald.unregister_ga("scoped_mine")
            assert Mine.ga_name == "mine"
        assert "scoped_mine" in gald.list_ga() and Mine.ga_name == "scoped_mine"
    finally:
        gald.unregister_ga("scoped_mine")
    assert Mine.__dict__.get("ga_name") == "mine"
