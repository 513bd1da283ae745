"""The package ships ``py.typed``: a downstream project's mypy type-checks against gald."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gald

DOWNSTREAM = """
import torch
from torch import nn
import gald

block: gald.GALD = gald.GALD(64, "aspp", out_channels=32, norm_layer=nn.BatchNorm2d)
head = gald.GALDHead(2048, 19, channels=256)
model: nn.Sequential = gald.wrap(nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1)), "1")
loss_fn = gald.OhemCrossEntropy(thresh=0.7, min_kept=10)
y: torch.Tensor = gald.ops.ld_modulate(torch.randn(1, 2, 8, 8), torch.randn(1, 2, 2, 2), 1.0)
names: list[str] = gald.list_ga()
"""

WRONG_LINE = "count: int = gald.list_ga()\n"

# torch is analysed as Any: following its sources takes minutes; gald's own annotations are what
# this checks
CONFIG = """
[mypy]
follow_imports = silent
[mypy-torch.*]
follow_imports = skip
follow_imports_for_stubs = True
"""


def _mypy(tmp_path: Path, code: str) -> subprocess.CompletedProcess[str]:
    src = tmp_path / "downstream.py"
    src.write_text(code)
    (tmp_path / "mypy.ini").write_text(CONFIG)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--no-incremental",
            "--config-file",
            "mypy.ini",
            "--cache-dir",
            str(tmp_path / "cache"),
            str(src),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )


def test_py_typed_is_shipped() -> None:
    assert (Path(gald.__file__).parent / "py.typed").is_file()


def test_downstream_mypy_uses_gald_types(tmp_path: Path) -> None:
    # the only error is the deliberately wrong annotation: gald's types are visible and real
    result = _mypy(tmp_path, DOWNSTREAM + WRONG_LINE)
    out = result.stdout
    assert "py.typed" not in out and "missing library stubs" not in out, out
    errors = [line for line in out.splitlines() if ": error:" in line]
    line_no = len((DOWNSTREAM + WRONG_LINE).splitlines())
    assert len(errors) == 1, out
    assert f"downstream.py:{line_no}:" in errors[0] and 'has type "list[str]"' in errors[0], out
