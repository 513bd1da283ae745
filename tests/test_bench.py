"""The benchmark CLI runs end to end on a tiny shape and writes valid JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gald.bench.__main__ import main


def test_cli_tiny(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    assert main(["--shape", "1,16,17,17", "--repeats", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "LD overhead" in text and "ld=False" in text
    data = json.loads(out.read_text())
    rows = data["block"]["rows"]
    assert [r["model"] for r in rows] == ["GALD(cgnl), ld=True", "GALD(cgnl), ld=False"]
    assert all(r["forward_ms"] > 0 and r["forward_backward_ms"] > 0 for r in rows)
    assert data["machine"]["torch"]


def test_cli_rejects_bad_shape() -> None:
    with pytest.raises(SystemExit):
        main(["--shape", "1,2,3"])


def test_module_entry_point_help() -> None:
    res = subprocess.run([sys.executable, "-m", "gald.bench", "--help"], capture_output=True, text=True, check=True)
    assert "--shape" in res.stdout and "--json" in res.stdout
