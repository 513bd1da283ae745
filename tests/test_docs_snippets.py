"""Every Python code block of README.md and of the documentation site runs as written.

The blocks of one page run in order in one namespace (a page reads top to bottom, like a
notebook). A block that needs a third-party package that is not installed here (torchvision,
segmentation-models-pytorch, timm) is marked with ``<!-- needs: torchvision -->`` (or the other
names) on the line before its fence; it then runs against stand-ins of the same structure
(``tests/_standins.py``) when the real package is missing. Blocks fenced as ``text`` or ``bash``
are not run; a ``python`` block is never skipped.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest
import torch

import _standins

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
THIRD_PARTY = {
    "torchvision": "torchvision",
    "segmentation_models_pytorch": "segmentation_models_pytorch",
    "smp": "segmentation_models_pytorch",
    "timm": "timm",
}
FENCE = re.compile(
    r"(?:<!--\s*needs:\s*(?P<needs>[\w, ]+)-->\s*\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S
)


def _blocks(page: Path) -> list[tuple[int, set[str], str]]:
    text = page.read_text()
    found = []
    for m in FENCE.finditer(text):
        if m.group("lang") not in ("python", "py"):
            continue
        needs = {n.strip() for n in (m.group("needs") or "").split(",") if n.strip()}
        line = text.count("\n", 0, m.start("code")) + 1
        found.append((line, needs, m.group("code")))
    return found


def _imports_third_party(code: str) -> set[str]:
    names = set()
    for mod in THIRD_PARTY:
        if re.search(rf"^\s*(import|from)\s+{mod}\b", code, re.M):
            names.add(THIRD_PARTY[mod])
    return names


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_code_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = _blocks(page)
    if not blocks:
        # a page without Python is fine, but it must not hide code in an unrun fence
        assert "```python" not in page.read_text()
        return
    monkeypatch.chdir(tmp_path)  # files a block writes land in a temporary directory
    saved = dict(sys.modules)
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    try:
        for line, needs, code in blocks:
            used = _imports_third_party(code)
            missing = used - {THIRD_PARTY.get(n, n) for n in needs}
            assert not missing, (
                f"{page.name}:{line} imports {sorted(missing)} without a `<!-- needs: ... -->` mark"
            )
            if used and not all(_installed(n) for n in used):
                _standins.install()
            torch.manual_seed(0)
            try:
                exec(compile(code, f"{page.name}:{line}", "exec"), namespace)
            except Exception as exc:
                raise AssertionError(f"{page.name}, block at line {line} failed: {exc!r}") from exc
    finally:
        for name in set(sys.modules) - set(saved):
            if name.split(".")[0] in set(THIRD_PARTY.values()):
                del sys.modules[name]


def test_every_page_is_checked() -> None:
    assert ROOT / "README.md" in PAGES
    assert len(PAGES) >= 5
    assert all(p.exists() for p in PAGES)
    assert os.sep not in "".join(p.name for p in PAGES)
