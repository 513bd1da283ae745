"""The documentation site covers the public API, and every page is reachable.

- Every name in ``gald.__all__`` and in the ``__all__`` of the public subpackages has a
  ``::: path`` directive in ``docs/api/`` (so mkdocstrings renders it) and a docstring of its own.
- Every directive names an object that exists.
- The ``nav`` of ``mkdocs.yml`` lists every page under ``docs/`` and nothing else.
- The README links only to pages that exist.
- The docstring rewriting of the site (``docs/_ext/griffe_rst.py``) turns the reStructuredText
  parts of the docstrings into Markdown (runs where the ``docs`` extra is installed).

``mkdocs build --strict`` (in ``.ci/run``) checks the rest: links, anchors, docstring parsing.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import itertools
import re
import sys
import types
from pathlib import Path

import pytest

import gald

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API = DOCS / "api"
MKDOCS = ROOT / "mkdocs.yml"

# gald.testing is imported on its own (a test-time API, not loaded by `import gald`), so
# gald.__all__ does not list it.
EXTRA_PUBLIC_MODULES = ("gald.testing",)
_DIRECTIVE = re.compile(r"^:::\s+(\S+)\s*$", re.M)


def _public_modules() -> list[types.ModuleType]:
    mods = [gald]
    mods += [
        getattr(gald, n) for n in gald.__all__ if isinstance(getattr(gald, n), types.ModuleType)
    ]
    mods += [importlib.import_module(m) for m in EXTRA_PUBLIC_MODULES]
    return mods


def _public_names() -> list[tuple[str, str]]:
    names = []
    for mod in _public_modules():
        for name in getattr(mod, "__all__", ()):
            if not (name.startswith("__") and name.endswith("__")):  # __version__: a plain string
                names.append((mod.__name__, name))
    return names


def _resolve(path: str) -> object:
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


def _directives() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for page in sorted(API.glob("*.md")):
        for path in _DIRECTIVE.findall(page.read_text()):
            assert path not in found, (
                f"{path} is documented twice ({found[path].name}, {page.name})"
            )
            found[path] = page
    return found


def _is_value(obj: object) -> bool:
    """Constants (ints, strings, tuples, ...) are matched by path, not by identity."""
    return not isinstance(obj, (type, types.ModuleType)) and not callable(obj)


def _attribute_docstring(module: types.ModuleType, name: str) -> str | None:
    """The docstring written under ``name = ...`` in the package that defines ``module``."""
    file = Path(module.__file__ or "")
    files = sorted(file.parent.glob("*.py")) if file.name == "__init__.py" else [file]
    for source in files:
        body = ast.parse(source.read_text()).body
        for stmt, nxt in itertools.pairwise(body):
            targets = (
                stmt.targets
                if isinstance(stmt, ast.Assign)
                else [stmt.target]
                if isinstance(stmt, ast.AnnAssign)
                else []
            )
            if any(isinstance(t, ast.Name) and t.id == name for t in targets) and (
                isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                return nxt.value.value
    return None


PUBLIC = _public_names()


def test_public_api_is_found() -> None:
    modules = {m for m, _ in PUBLIC}
    assert {"gald", "gald.ga", "gald.ops", "gald.models", "gald.deploy", "gald.testing"} <= modules
    assert ("gald", "GALD") in PUBLIC
    assert ("gald.ga", "CGNL") in PUBLIC


@pytest.mark.parametrize(("module", "name"), PUBLIC, ids=[f"{m}.{n}" for m, n in PUBLIC])
def test_public_name_is_in_the_api_reference(module: str, name: str) -> None:
    obj = getattr(sys.modules[module], name)
    directives = _directives()
    if f"{module}.{name}" in directives:
        return
    if not _is_value(obj):
        same = [p for p in directives if _resolve(p) is obj]
        assert same, (
            f"{module}.{name} is public but no page of docs/api/ has a '::: {module}.{name}' line"
        )
        return
    pytest.fail(f"{module}.{name} is public but no page of docs/api/ has '::: {module}.{name}'")


@pytest.mark.parametrize(("module", "name"), PUBLIC, ids=[f"{m}.{n}" for m, n in PUBLIC])
def test_public_name_has_a_docstring(module: str, name: str) -> None:
    obj = getattr(sys.modules[module], name)
    if _is_value(obj):
        doc = _attribute_docstring(sys.modules[module], name)
    elif isinstance(obj, type):
        doc = obj.__dict__.get("__doc__")  # its own, not one inherited from nn.Module
    else:
        doc = inspect.getdoc(obj)
    assert doc and doc.strip(), f"{module}.{name} has no docstring"


def test_public_modules_have_docstrings() -> None:
    for mod in _public_modules():
        assert (mod.__doc__ or "").strip(), f"{mod.__name__} has no docstring"


def test_every_directive_names_an_existing_object() -> None:
    directives = _directives()
    assert len(directives) >= len(PUBLIC)
    for path, page in directives.items():
        try:
            _resolve(path)
        except (ImportError, AttributeError) as exc:
            pytest.fail(f"docs/api/{page.name}: '::: {path}' names nothing ({exc})")


def _nav_pages() -> list[str]:
    text = MKDOCS.read_text()
    nav = re.search(r"^nav:\n(?P<body>(?:[ \t]+.*\n|\n)+)", text, re.M)
    assert nav, "mkdocs.yml has no nav"
    return re.findall(r"(?:^|\s)([\w./-]+\.md)\s*$", nav.group("body"), re.M)


def test_nav_lists_every_page_and_only_existing_pages() -> None:
    nav = _nav_pages()
    assert len(nav) == len(set(nav)), "a page is listed twice in the nav"
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert set(nav) - pages == set(), "the nav lists pages that do not exist"
    assert pages - set(nav) == set(), "pages under docs/ that the nav does not list"
    assert nav[0] == "index.md"


def test_readme_links_to_existing_pages() -> None:
    links = re.findall(r"\]\((docs/[^)#]+)", (ROOT / "README.md").read_text())
    assert links, "the README links to no page"
    missing = [link for link in links if not (ROOT / link).is_file()]
    assert not missing, f"README links to missing pages: {missing}"
    # every page of the site's nav, the API reference through its overview
    wanted = {f"docs/{p}" for p in _nav_pages() if not p.startswith("api/") or p == "api/index.md"}
    assert wanted - set(links) == set(), "site pages the README does not link to"


def _rst_extension() -> types.ModuleType:
    pytest.importorskip("griffe", reason="the docs extra is not installed")
    spec = importlib.util.spec_from_file_location("griffe_rst", DOCS / "_ext" / "griffe_rst.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rst_blocks_become_markdown() -> None:
    ext = _rst_extension()
    text = (
        "Summary.\n\n.. math::\n    y = x\n\nText.\n\n.. note::\n    Careful.\n\n"
        "Example::\n\n    a = 1\n    b = 2\n\nEnd."
    )
    assert ext._convert_blocks(text) == (
        "Summary.\n\n$$\ny = x\n$$\n\nText.\n\n!!! note\n    Careful.\n\n"
        "Example:\n    ```python\n    a = 1\n    b = 2\n    ```\n\nEnd."
    )


def test_doctest_blocks_become_fenced_code() -> None:
    # Markdown would read ">>>" as three nested quotes and "__init__" as bold text
    ext = _rst_extension()
    text = (
        "Summary.\n\nExample:\n    >>> class A:\n    ...     def __init__(self): pass\n"
        "    >>> 1 + 1\n    2\n\nMore.\n>>> x = 1\n\nEnd."
    )
    assert ext._convert_blocks(text) == (
        "Summary.\n\nExample:\n    ```pycon\n    >>> class A:\n    ...     def __init__(self): pass\n"
        "    >>> 1 + 1\n    2\n    ```\n\nMore.\n\n```pycon\n>>> x = 1\n```\n\nEnd."
    )


def test_doctest_blocks_end_at_a_dedent_and_fences_are_kept() -> None:
    ext = _rst_extension()
    text = "Example:\n    >>> f()\n    1\nReturns:\n    x.\n\n```python\n>>> g()\n```\nEnd."
    assert ext._convert_blocks(text) == (
        "Example:\n    ```pycon\n    >>> f()\n    1\n    ```\n\nReturns:\n    x.\n\n"
        "```python\n>>> g()\n```\nEnd."
    )


def test_simple_tables_become_markdown_tables() -> None:
    ext = _rst_extension()
    text = (
        "Cost:\n\n"
        "====  =====  ==========\n"
        "mode  time   memory\n"
        "====  =====  ==========\n"
        "a     O(N)   O(1) with\n"
        "             a note\n"
        "b     O(N2)  ``O(N)``\n"
        "====  =====  ==========\n"
        "\nAfter."
    )
    assert ext._convert_blocks(text) == (
        "Cost:\n\n| mode | time | memory |\n|---|---|---|\n| a | O(N) | O(1) with a note |\n"
        "| b | O(N2) | ``O(N)`` |\n\nAfter."
    )


def test_grouped_items_are_split() -> None:
    ext = _rst_extension()
    text = "Attributes:\n    low, high: the range\n        of the gate.\n    mean: the mean.\n"
    assert ext._split_grouped_items(text) == (
        "Attributes:\n    low: the range\n        of the gate.\n"
        "    high: the range\n        of the gate.\n    mean: the mean.\n"
    )
    # outside an item section a comma list is prose and stays as it is
    assert ext._split_grouped_items("Note, please: this.") == "Note, please: this."


def test_roles_become_references() -> None:
    ext = _rst_extension()
    import griffe

    pkg = griffe.load("gald", search_paths=[str(ROOT / "src")])
    ld = pkg["ld.LocalDistribution"]
    out = ext._convert_roles(
        ":func:`gald.fuse` :class:`~gald.GALD` :meth:`set_grad_checkpointing` "
        ":class:`torch.nn.Conv2d` :math:`x^2`",
        ld,
        pkg,
    )
    assert out == (
        "[`gald.fuse`][gald.fuse] [`GALD`][gald.GALD] "
        '<autoref identifier="gald.ld.LocalDistribution.set_grad_checkpointing" optional>'
        "<code>set_grad_checkpointing</code></autoref> `torch.nn.Conv2d` $x^2$"
    )
