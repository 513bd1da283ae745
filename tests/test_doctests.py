"""The ``>>>`` examples of the docstrings (shown on the API reference pages) run as written."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from types import ModuleType

import pytest

import gald


def _runs(example: doctest.Example) -> bool:
    return not example.options.get(doctest.SKIP, False)


def _examples(module: ModuleType) -> list[doctest.DocTest]:
    """The docstring tests of ``module`` with at least one example that is not skipped (a
    skipped one needs a file the reader has, such as the authors' checkpoint)."""
    return [t for t in doctest.DocTestFinder().find(module) if any(map(_runs, t.examples))]


def _modules_with_examples() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(gald.__path__, "gald."):
        if info.name.startswith("gald.bench"):  # the CLI: its modules have no examples
            continue
        if _examples(importlib.import_module(info.name)):
            names.append(info.name)
    return names


MODULES = _modules_with_examples()


def test_examples_are_found() -> None:
    # the GA layers, the registry, wrap, convert, ONNX export and gald.testing carry examples
    assert {"gald.ga.aspp", "gald.registry", "gald.stats", "gald.testing._contract"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module: ModuleType = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    runner = doctest.DocTestRunner(optionflags=flags, verbose=False)
    for test in _examples(module):  # the same tests the finder listed, globals included
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed"
