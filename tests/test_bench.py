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


def test_ga_table_tiny() -> None:
    from gald.bench import ga

    res = ga.run((2, 16, 9, 9), 1, names=["cgnl", "gc"])
    assert [r["name"] for r in res["rows"]] == ["cgnl", "gc"]
    assert res["half"] == [5, 5]
    for r in res["rows"]:
        for key in ("ga_full", "ga_half", "gald", "gald_no_ld"):
            assert r[key]["params"] > 0 and r[key]["forward_ms"] > 0 and r[key]["saved_mb"] > 0
        # the LD adds parameters and FLOPs to the same GA
        assert r["gald"]["params"] > r["gald_no_ld"]["params"]
        assert r["gald"]["gflops"] > r["gald_no_ld"]["gflops"]
    table = ga.render(res)
    assert "LD +% f+b" in table and "cgnl" in table


def test_flops_count_the_fused_cpu_attention() -> None:
    # FlopCounterMode has no formula for the fused CPU attention kernel: the benchmark adds one,
    # so NonLocal2d's N x N work is counted (two matmuls of N x N x C', 2 FLOPs per MAC).
    import torch

    import gald
    from gald.bench.ga import _flops

    n, inner = 20 * 20, 32
    flops = _flops(gald.create_ga("nonlocal", 64).eval(), torch.randn(1, 64, 20, 20))
    assert flops >= 2 * 2 * n * n * inner
