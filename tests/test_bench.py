"""``python -m gald.bench``: CLI errors, JSON schema, plot, tiny runs per dtype and memory format,
the FLOP formula of the fused op, the docs rewriter, and the GPU-check path under Triton's
interpreter. Timings here are only checked for shape and consistency, never for speed."""

from __future__ import annotations

import builtins
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import gald
from _helpers import require_triton_interpreter
from gald.bench import block
from gald.bench.__main__ import main
from gald.bench._config import Config
from gald.bench._timing import (
    KERNEL_NOTE,
    OVERHEAD_NOTE,
    Ratio,
    Stats,
    format_overhead,
    format_pct,
    format_speed,
    signed,
)
from gald.bench.docs import rewrite
from gald.ops import ld_modulate

TINY = ["--shape", "2,8,15,15", "--min-time", "0.01", "--rounds", "3", "--threads", "1", "--quiet"]


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# CLI errors and help


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shape", "1,2,3"], "expected B,C,H,W"),
        (["--shape", "a,b,c,d"], "expected B,C,H,W"),
        (["--shape", "0,8,15,15"], "expected B,C,H,W"),
        # not argparse's "expected one argument": the value itself is named
        (
            ["--shape", "-1,16,17,17"],
            "expected B,C,H,W (four positive integers, e.g. 2,512,97,97), got '-1,16,17,17'",
        ),
        (["--ga", "nope"], "unknown GA 'nope'"),
        (["--ga", "cgnl,nope"], "unknown GA 'nope'"),
        (["--device", "cuda"], "no CUDA device is available"),
        (["--rounds", "2"], "expected an integer >= 3"),
        (["--min-time", "0"], "expected a positive number of seconds"),
        (["--dtype", "float64"], "invalid choice"),
        (["--ga", "none"], "--ga none measures nothing without --ld"),
        (["--ga", "none", "--ld", "--plot", "x.png"], "--plot draws the GA table"),
        # a value in exponent form or -inf reaches its own check, as --shape's does
        (
            ["--min-time", "-1e-3"],
            "expected a positive number of seconds, at most 3600, got '-1e-3'",
        ),
        (["--min-time", "-inf"], "got '-inf'"),
        # options no part of the run reads are refused, not silently accepted
        (["--ga", "all", "--cost", "--min-time", "3"], "--min-time has no effect on what this run"),
        (
            ["--ga", "cgnl", "--cost", "--rounds", "9", "--threads=1", "--compile", "off"],
            "--threads, --rounds, --compile have no effect",
        ),
        (
            ["--ga", "none", "--first-call", "--shape", "1,1,1,1", "--dtype", "float16"],
            "--shape, --dtype have no effect",
        ),
        (["--ga", "cgnl", "--compile", "off"], "--compile has no effect"),
    ],
)
def test_cli_rejects_bad_arguments(argv, message, capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_reports_a_shape_too_small_for_the_model(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--shape", "1,8,2,2", "--min-time", "0.01", "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error: --shape 1,8,2,2 is too small" in err and "GALD(cgnl)" in err


def test_help_shows_every_default_without_markup(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for default in ("2,512,97,97", "cgnl", "float32", "2.0", "(default: 5)", "(default: auto)"):
        assert default in text
    assert "(default: cuda)" in text or "(default: cpu)" in text
    assert "``" not in text and ":math:" not in text


def test_plot_without_matplotlib_says_how_to_install(capsys, monkeypatch, tmp_path) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "--plot", str(tmp_path / "x.png")])
    assert exc.value.code == 2
    assert (
        "pip install 'gald[plot]' (or pip install matplotlib; in a clone of gald: "
        "pip install -e '.[plot]')" in capsys.readouterr().err
    )
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------------------------
# One tiny run: JSON schema, tables, plot, docs


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[dict, str, Path]:
    out = tmp_path_factory.mktemp("bench")
    argv = [*TINY, "--ga", "cgnl,gc", "--json", str(out / "r.json")]
    if _has_matplotlib():
        argv += ["--plot", str(out / "r.png")]
    capture = out / "stdout.txt"
    real = sys.stdout
    with open(capture, "w") as f:
        sys.stdout = f
        try:
            status = main(argv)
        finally:
            sys.stdout = real
    assert status == 0
    return json.loads((out / "r.json").read_text()), capture.read_text(), out


def test_json_schema(tiny_run) -> None:
    res, _, _ = tiny_run
    assert set(res) == {"command", "environment", "config", "block", "durations_s"}
    assert res["durations_s"]["block"] > 0
    env = res["environment"]
    for key in ("date", "torch", "device", "device_name", "threads", "python"):
        assert env[key]
    assert env["torch"] == torch.__version__
    assert res["config"]["shape"] == [2, 8, 15, 15] and res["config"]["ga"] == ["cgnl", "gc"]
    rows = res["block"]["rows"]
    assert [r["ga"] for r in rows] == ["cgnl", "gc"]
    for r in rows:
        w, wo = r["models"]["with LD"], r["models"]["without LD"]
        for m in (w, wo):
            for key in ("inference", "train_step"):
                t = m[key]
                assert t["runs"] >= 3 and t["calls"] >= t["runs"]
                assert 0 < t["q1_ms"] <= t["median_ms"] <= t["q3_ms"]
                assert t["iqr_ms"] == pytest.approx(t["q3_ms"] - t["q1_ms"])
                assert len(t["round_medians_ms"]) == 3  # --rounds 3
            assert m["peak_bytes"] is None  # CPU: no allocator peak
        # the LD adds parameters, FLOPs and saved activations
        assert w["params"] > wo["params"] and w["gflops"] > wo["gflops"]
        assert w["saved_bytes"] > wo["saved_bytes"] > 0
        for key in ("inference", "train_step"):
            ov = r["overhead"][key]
            # the median over the rounds of the per-round ratio (paired, rounds weigh alike)
            per_round = [
                math.log(a / b)
                for a, b in zip(w[key]["round_medians_ms"], wo[key]["round_medians_ms"])
            ]
            assert ov["ratio"] == pytest.approx(math.exp(statistics.median(per_round)))
            assert ov["ratio_low"] <= ov["ratio"] <= ov["ratio_high"]
            assert ov["within_noise"] == (ov["ratio_low"] <= 1.0 <= ov["ratio_high"])
        assert r["overhead"]["saved_bytes_ratio"] == pytest.approx(
            w["saved_bytes"] / wo["saved_bytes"]
        )


def test_tables_state_facts(tiny_run) -> None:
    _, text, _ = tiny_run
    assert "LD overhead" in text and "n=" in text and "IQR" in text
    assert "goal" not in text.lower() and "| NO" not in text


def test_the_overhead_says_it_is_not_the_ratio_of_the_medians(tiny_run) -> None:
    # the overhead is the median of the per-round ratios: 75.8 / 39.1 ms can read +69.2 %, so
    # the terminal table, the docs table and the JSON say so
    res, text, _ = tiny_run
    table_end = text.rindex("LD overhead | ")  # the last row of the table
    assert text.index(OVERHEAD_NOTE) > table_end
    assert "median over the rounds of the per-round ratio" in OVERHEAD_NOTE
    assert "ratio of the medians above" in OVERHEAD_NOTE
    assert res["block"]["overhead_definition"] == OVERHEAD_NOTE
    new, _ = rewrite("<!-- bench:start block -->\n<!-- bench:end -->\n", res)
    # under the Markdown table, after a blank line (a line right below would be a table row)
    assert "\n\n*LD overhead*: median over the rounds of the per-round ratio" in new


def test_plot_writes_a_png(tiny_run) -> None:
    pytest.importorskip("matplotlib")  # in the dev extra; without it the error is tested above
    _, _, out = tiny_run
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_title_fits_the_figure_with_a_long_device_name(tiny_run) -> None:
    pytest.importorskip("matplotlib")
    from gald.bench._plot import figure

    res = json.loads(json.dumps(tiny_run[0]))
    res["environment"]["device_name"] = "AMD EPYC 9654 96-Core Processor " * 4 + "X" * 120
    res["config"].update(dtype="bfloat16", channels_last=True)
    fig = figure(res)
    fig.canvas.draw()
    title = fig._suptitle
    assert title is not None and title.get_text().count("\n") >= 3
    assert all(len(line) <= 100 for line in title.get_text().splitlines())
    box, page = title.get_window_extent(), fig.bbox
    assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1
    # above the panels' titles, not over them
    assert box.y0 >= max(ax.title.get_window_extent().y1 for ax in fig.axes)


def test_docs_rewriter_replaces_only_marked_blocks(tiny_run) -> None:
    res, _, _ = tiny_run
    text = (
        "# title\nkept\n<!-- bench:start -->\nold\n<!-- bench:end -->\nkept too\n"
        "<!-- bench:start block -->\nold table\n<!-- bench:end -->\n"
    )
    new, n = rewrite(text, res)
    assert n == 2
    assert new.startswith("# title\nkept\n<!-- bench:start -->\nLD overhead inside GALD(cgnl)")
    assert "\nkept too\n" in new and "old" not in new
    assert "| gc | LD overhead |" in new and res["environment"]["date"] in new
    assert rewrite(new, res)[0] == new  # idempotent
    with pytest.raises(ValueError, match="unknown bench marker kind"):
        rewrite("<!-- bench:start nope -->\n<!-- bench:end -->", res)


# --------------------------------------------------------------------------------------------
# dtypes and memory formats


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tiny_runs(dtype, channels_last) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny inputs: one thread is faster and steadier on a busy machine
    try:
        _tiny_run(dtype, channels_last)
    finally:
        torch.set_num_threads(before)


def _tiny_run(dtype: torch.dtype, channels_last: bool) -> None:
    cfg = Config(
        shape=(2, 8, 15, 15),
        device=torch.device("cpu"),
        dtype=dtype,
        channels_last=channels_last,
        threads=1,
        min_time=0.01,
        rounds=3,
        quiet=True,
    )
    res = block.run(cfg, ["cgnl"])
    (row,) = res["rows"]
    for m in row["models"].values():
        assert math.isfinite(m["train_step"]["median_ms"]) and m["train_step"]["runs"] >= 3
    saved = row["models"]["with LD"]["saved_bytes"]
    # under bfloat16 autocast the convs save bfloat16 copies: fewer bytes than in float32
    full = 2 * 8 * 15 * 15 * 4
    assert saved > full if dtype == torch.float32 else saved > 0
    assert "(2, 8, 15, 15)" in block.render(res, cfg.describe())


# --------------------------------------------------------------------------------------------
# Statistics and wording


def test_overhead_wording() -> None:
    tight_a = Stats([1.00, 1.01, 0.99, 1.00, 1.02])
    tight_b = Stats([0.50, 0.51, 0.49, 0.50, 0.50])
    loose = Stats([0.2, 1.0, 3.0, 0.5, 2.0])
    faster = Ratio.of(tight_a, tight_b)
    assert not faster.within_noise and format_speed(faster) == "2.00x faster (95 %: 1.98–2.02)"
    assert format_overhead(faster).startswith("+100.0 % [")
    slower = Ratio.of(tight_b, tight_a)
    assert format_speed(slower) == "2.00x slower (95 %: 1.98–2.02)"
    noisy = Ratio.of(loose, tight_a)
    # an interval that contains 0 but spans more than a factor of 2 is no figure either
    assert noisy.within_noise and noisy.verdict == "too noisy"
    assert format_overhead(noisy).startswith("too noisy")
    assert format_overhead(Ratio(1.5, 2.0)) == "too noisy: +50 % [-50, +350]"
    assert format_speed(Ratio(1.5, 2.0)) == "too noisy (2.00x slower to 4.50x faster)"
    assert format_speed(Ratio(1 / 1.5, 2.0)) == "too noisy (4.50x slower to 2.00x faster)"
    # no "1x faster" for a factor just above 1, no exponent for a large one
    assert format_speed(Ratio(1 / 40.0, 40.0)) == "too noisy (1640x slower to 1.03x faster)"
    assert format_speed(Ratio(1 / 310.0, 0.5)) == "too noisy (207x–465x slower)"
    # rounds that disagree widen the interval beyond what the blocks alone say
    steady = Stats([1.0] * 9, round_medians=[1.0, 1.0, 1.0])
    drifting = Stats(
        [1.30, 1.31, 1.29, 1.30, 1.31, 1.29, 1.30, 1.31, 1.29], round_medians=[1.1, 1.3, 1.5]
    )
    assert (
        Ratio.of(drifting, steady).rel_halfwidth
        > 0.3
        > Ratio.of(Stats(drifting.times), Stats(steady.times)).rel_halfwidth
    )
    # one round hit by a stall (here 8x slower) neither moves the medians nor swamps the interval
    base = Stats(
        [0.212, 0.208, 0.215, 0.211, 0.213], round_medians=[0.419, 0.208, 0.212, 0.213, 0.211]
    )
    fast = Stats(
        [0.127, 0.125, 0.126, 0.128, 0.124], round_medians=[0.123, 0.125, 0.125, 1.054, 0.127]
    )
    stalled = Ratio.of(base, fast)
    # per round 3.41, 1.66, 1.70, 0.20, 1.66: the median is the figure, the stalls do not count
    assert not stalled.within_noise and format_speed(stalled) == "1.66x faster (95 %: 1.54–1.80)"
    assert stalled.rel_halfwidth < 0.1
    # an interval that excludes zero but is wider than the baseline: no four-digit figure
    huge = Ratio(15.8, 0.6)
    assert not huge.within_noise and format_overhead(huge) == "too noisy (> +1000 %)"
    assert format_overhead(Ratio(3.0, 0.5)) == "too noisy: +200 % [+100, +350]"
    # no four-digit end either
    assert format_overhead(Ratio(3.0, 17.0)) == "too noisy: +200 % [-83, > +1000]"


def test_zero_is_never_written_as_minus_zero() -> None:
    assert [signed(v, 0) for v in (-0.4, -0.0, 0.0, 0.4, -0.6, -1.2)] == [
        "+0",
        "+0",
        "+0",
        "+0",
        "-1",
        "-1",
    ]
    assert [signed(v, 1) for v in (-0.04, 0.04, -0.06, 12.34)] == ["+0.0", "+0.0", "-0.1", "+12.3"]
    # the audit's case: an interval from just below 0 to +953 %
    assert format_overhead(Ratio(3.24, 2.25)) == "too noisy: +224 % [+0, +953]"
    assert format_overhead(Ratio(1.0, 0.0004)) == "within noise [+0.0, +0.0 %]"
    assert format_overhead(Ratio(0.9996, math.nan)) == "+0.0 % (spread unknown)"
    assert format_overhead(Ratio(0.9996, 1.5)) == "too noisy: +0 % [-60, +150]"
    assert [format_pct(r) for r in (0.9999, 1.0, 0.9)] == ["+0.0 %", "+0.0 %", "-10.0 %"]


def test_cost_prints_no_timing_notes(monkeypatch, capsys) -> None:
    # --cost times nothing: no busy-machine note and no threads in the footer; a timing run
    # (here the first call, faked) still gets both
    from gald.bench import __main__ as cli
    from gald.bench import first_call

    monkeypatch.setattr(cli, "busy_note", lambda threads, in_use=None: "note: BUSY")
    assert main(["--ga", "gc", "--cost", "--shape", "1,16,9,9"]) == 0
    out, err = capsys.readouterr()
    assert "note: BUSY" not in err and "thread" not in out
    assert "machine-independent" in out and f"torch {torch.__version__}" in out
    fake = {"first_ms": 50.0, "second_ms": 5.0, "dynamo_imported": False}
    monkeypatch.setattr(first_call, "_one", lambda device, threads, step: dict(fake))
    argv = ["--ga", "gc", "--cost", "--first-call", "--shape", "1,16,9,9", "--threads", "1"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "note: BUSY" in err and out.rstrip().endswith("1 thread")


# --------------------------------------------------------------------------------------------
# FLOPs of the fused op


def test_flop_formula_matches_a_hand_count() -> None:
    from gald.ops import _flops  # noqa: F401  (registered; also imported by gald.ops)

    b, c, H, W = 2, 3, 13, 10
    n = b * c * H * W
    x = torch.randn(b, c, H, W, requires_grad=True)
    logits = torch.randn(b, c, 4, 3, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        out = ld_modulate(x, logits)
    assert counter.get_total_flops() == 8 * n  # 4 multiply-adds per output element
    with FlopCounterMode(display=False) as counter:
        ld_modulate(x, logits).backward(torch.ones(b, c, H, W))
    assert counter.get_total_flops() == 8 * n + 16 * n  # forward; recomputed mask + adjoint
    with FlopCounterMode(display=False) as counter:
        ld_modulate(x, logits.detach()).sum().backward()
    assert counter.get_total_flops() == 8 * n + 8 * n  # no logits gradient: no adjoint
    del out

    # a whole LocalDistribution: torch's conv formula for the depthwise stages plus the op
    ld = gald.LocalDistribution(c).eval()
    hand, h, w = 0, H, W
    for stage in ld.branch:
        conv = stage[0]
        h = (h + 2 * conv.padding[0] - 3) // 2 + 1
        w = (w + 2 * conv.padding[1] - 3) // 2 + 1
        hand += 2 * b * c * h * w * 9  # depthwise: 9 multiply-adds per output element
    assert block.count_flops(ld, x.detach()) == hand + 8 * n


# --------------------------------------------------------------------------------------------
# The GPU check, on CPU under Triton's interpreter


def test_gpu_check_path_under_the_triton_interpreter(tmp_path) -> None:
    require_triton_interpreter()
    out = tmp_path / "ld.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [
        sys.executable,
        "-m",
        "gald.bench",
        "--ld",
        "--ga",
        "none",  # only the LD and the kernels
        "--device",
        "cpu",
        "--shape",
        "2,2,15,15",
        "--min-time",
        "0.01",
        "--rounds",
        "3",
        "--threads",
        "1",
        "--quiet",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert "block" not in res and res["config"]["ga"] == []
    ld = res["ld"]
    assert set(ld["train_step"]) >= {"authors", "gald"} and set(ld["inference"]) == {
        "authors",
        "gald",
    }
    assert all(v < 1e-4 for v in ld["checks"].values())
    assert ld["memory"]["gald"]["saved_bytes"] < ld["memory"]["authors"]["saved_bytes"]
    kernels = res["kernels"]
    try:
        import triton  # noqa: F401
    except ImportError:
        assert "triton" in kernels["skipped"]
        return
    checks = kernels["checks"]
    combos = {(c["dtype"], c["memory_format"]) for c in checks}
    assert combos == {
        (d, f) for d in ("float32", "bfloat16", "float16") for f in ("NCHW", "channels_last")
    }
    assert all(c["ok"] and c["deterministic"] is None for c in checks)  # not repeated here
    assert kernels["shape"] == [1, 2, 6, 7] and kernels["logits"] == [3, 2]  # interpreter case
    rows = kernels["bandwidth"]
    assert [(r["dtype"], r["memory_format"], r["direction"]) for r in rows] == [
        ("float32", "NCHW", "forward"),
        ("float32", "NCHW", "backward"),
    ]
    for r in rows:
        assert r["bytes"] > 0 and r["triton_GBps"] > 0 and r["copy_GBps"] > 0
    assert "Triton kernels of gald.ops.ld_modulate" in proc.stdout
    assert KERNEL_NOTE in proc.stdout and kernels["ratio_definition"] == KERNEL_NOTE


def test_ld_branch_size_matches_the_convs() -> None:
    from gald.bench.ld import ld_branch_size

    for side in (15, 16, 97, 129):
        t = torch.zeros(1, 1, side, side)
        for _ in range(3):
            t = F.conv2d(t, torch.zeros(1, 1, 3, 3), stride=2)
        assert ld_branch_size(side) == t.shape[-1]


# --------------------------------------------------------------------------------------------
# Progress line and the ablation dispatch


class _Stream:
    def __init__(self, tty: bool) -> None:
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize(
    ("out_tty", "err_tty", "enabled", "shown"),
    [
        (True, True, True, True),
        (True, False, True, False),
        (False, True, True, False),  # stdout redirected: silent
        (True, True, False, False),  # --quiet
    ],
)
def test_progress_line_only_on_a_terminal(out_tty, err_tty, enabled, shown, monkeypatch) -> None:
    from gald.bench._timing import Progress

    stream = _Stream(err_tty)
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(sys, "stdout", _Stream(out_tty))
    progress = Progress(10.0, enabled=enabled)
    progress.advance(5.0, "cgnl train step with LD")
    progress.close()
    assert ("50 %" in stream.text and "cgnl train step" in stream.text) == shown
    assert (stream.text == "") == (not shown)


def test_each_phase_of_a_run_has_its_own_progress_line(monkeypatch) -> None:
    from gald.bench._timing import Progress

    stream = _Stream(True)
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(sys, "stdout", _Stream(True))
    progress = Progress(0.0, enabled=True)
    progress.total = 10.0  # the GA table's estimate
    progress.advance(8.0, "cgnl")
    progress.close()
    progress.total += 4.0  # the next phase adds its own estimate, from zero
    progress.advance(1.0, "LD authors")
    last = stream.text.rsplit("\r", 1)[-1]
    assert " 25 % LD authors" in last  # 1 of 4 s, not 9 of 14 s


def test_ablation_options_are_forwarded(monkeypatch) -> None:
    import types

    seen: list[list[str]] = []
    fake = types.ModuleType("gald.bench.ablation")
    fake.main = lambda argv: seen.append(list(argv)) or 7  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gald.bench.ablation", fake)
    monkeypatch.setattr(gald.bench, "ablation", fake, raising=False)
    assert main(["--ablation", "--seeds", "2", "--shape", "1,2,3"]) == 7
    assert seen == [["--seeds", "2", "--shape", "1,2,3"]]


def test_options_are_not_abbreviated(capsys) -> None:
    # argparse would read "--abl" as --ablation and then run the timing benchmark
    with pytest.raises(SystemExit) as info:
        main(["--abl"])
    assert info.value.code == 2
    assert "unrecognized arguments: --abl" in capsys.readouterr().err
    from gald.bench import ablation

    with pytest.raises(SystemExit) as info:
        ablation.main(["--see", "2"])
    assert info.value.code == 2
    assert "unrecognized arguments: --see" in capsys.readouterr().err


def test_busy_note_from_cpus_in_use_and_load_average(monkeypatch) -> None:
    from gald.bench import _timing

    monkeypatch.setattr(_timing.os, "cpu_count", lambda: 4)
    # CPUs busy right now decide when known: 4 CPUs, 2 threads, 1.2 busy leaves room
    assert _timing.busy_note(2, in_use=1.2) is None
    note = _timing.busy_note(2, in_use=2.6)
    assert note is not None and "CPUs in use by other processes 2.6 of 4" in note
    assert "--threads 1" in note
    one = _timing.busy_note(1, in_use=3.6)
    assert one is not None and "--threads 1" not in one
    # unknown: the load average stands in
    monkeypatch.setattr(_timing, "load_average", lambda: 3.0)
    fallback = _timing.busy_note(2, in_use=None)
    assert fallback is not None and "1-minute load average 3.0 of 4" in fallback
    monkeypatch.setattr(_timing, "load_average", lambda: None)
    assert _timing.busy_note(2, in_use=None) is None
    # more threads than CPUs: said as such, whatever else runs
    over = _timing.busy_note(6, in_use=0.0)
    assert over is not None and "6 threads on 4 logical CPUs" in over and "--threads 4" in over
    assert "busy" not in over


def test_cpus_in_use_reads_proc_stat(monkeypatch) -> None:
    from gald.bench import _timing

    samples = iter([(100, 1000), (160, 1100)])  # 60 of 100 jiffies busy
    monkeypatch.setattr(_timing, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(_timing.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(_timing.time, "sleep", lambda s: None)
    assert _timing.cpus_in_use() == pytest.approx(1.2)
    monkeypatch.setattr(_timing, "_cpu_times", lambda: None)
    assert _timing.cpus_in_use() is None


def test_slow_candidates_are_timed_once_per_round() -> None:
    from gald.bench._timing import expected_seconds, measure_interleaved

    calls = {"slow": 0, "fast": 0}

    def slow() -> None:
        calls["slow"] += 1

    def fast() -> None:
        calls["fast"] += 1

    stats = measure_interleaved(
        {"slow": slow, "fast": fast},
        min_time=0.03,
        rounds=3,
        threads=1,
        call_s={"slow": 5.0, "fast": 1e-6},  # "slow" declared longer than a round's 10 ms
    )
    assert calls["slow"] == 3 and stats["slow"].n == 3 and stats["slow"].calls == 3
    assert len(stats["slow"].round_medians) == len(stats["fast"].round_medians) == 3
    assert calls["fast"] > 3 * 2  # blocked_autorange: a sizing call, then blocks of many calls
    assert expected_seconds(5.0, min_time=2.0, rounds=5) == pytest.approx(25.0)
    assert expected_seconds(0.1, min_time=2.0, rounds=5) == pytest.approx(5 * (0.4 + 0.1))


def test_rounds_alternate_the_order_of_the_candidates() -> None:
    """A B, B A, A B: a steady drift of the machine's speed favours neither candidate."""
    from gald.bench._timing import measure_interleaved

    order: list[str] = []
    measure_interleaved(
        {"a": lambda: order.append("a"), "b": lambda: order.append("b")},
        min_time=0.003,
        rounds=3,
        threads=1,
        call_s={"a": 1.0, "b": 1.0},  # one call per round each
    )
    assert order == ["a", "b", "b", "a", "a", "b"]


def test_docs_speed_interval_is_in_the_unit_of_the_figure() -> None:
    from gald.bench.docs import _speed

    faster = {"ratio": 2.0, "ratio_low": 1.5, "ratio_high": 8 / 3, "within_noise": False}
    assert _speed(faster) == "**2.00x faster** (95 %: 1.50–2.67)"
    slower = {"ratio": 0.5, "ratio_low": 0.4, "ratio_high": 0.625, "within_noise": False}
    assert _speed(slower) == "2.00x slower (95 %: 1.60–2.50)"


def test_rounds_meet_fresh_copies_of_the_models_and_inputs() -> None:
    from gald.bench._config import Config
    from gald.bench._timing import measure_interleaved
    from gald.bench.block import _Pair

    cfg = Config(shape=(1, 16, 17, 17), device=torch.device("cpu"), quiet=True)
    pair = _Pair("gc", cfg)
    pair.models["with LD"].eval()
    before = {n: m for n, m in pair.models.items()}
    x_before = pair.x
    fn = pair.inference("with LD")
    with torch.no_grad():
        want = fn()
    order: list[str] = []

    def relocate() -> None:
        order.append("relocate")
        pair.relocate()

    measure_interleaved(
        {"a": lambda: order.append("a")},
        min_time=0.003,
        rounds=3,
        threads=1,
        call_s={"a": 1.0},
        between_rounds=relocate,
    )
    assert order == ["a", "relocate", "a", "relocate", "a"]  # before every round but the first
    for name, model in pair.models.items():  # new storages, same weights and mode
        assert model is not before[name] and model.training == before[name].training
        for p, q in zip(model.parameters(), before[name].parameters()):
            assert p.data_ptr() != q.data_ptr() and torch.equal(p, q)
    assert pair.x.data_ptr() != x_before.data_ptr() and torch.equal(pair.x, x_before)
    torch.testing.assert_close(fn(), want, rtol=0, atol=0)  # the closure reads the new copies
    pair.train_step("without LD")()  # backward reaches the relocated input
    assert pair.xr.grad is not None and pair.xr.grad.shape == pair.x.shape


def test_ld_comparison_rounds_meet_fresh_copies(monkeypatch) -> None:
    """``run_vs_authors`` relocates its models and inputs between rounds: new storages, the
    same values, and the timed closures read the new copies."""
    from gald.bench import ld as ld_bench
    from gald.bench._config import Config
    from gald.bench._timing import measure_interleaved

    relocated: list[str] = []

    def spy(fns, *, between_rounds=None, **kwargs):
        contest = between_rounds.__self__
        models = {**contest.train, **{f"inference/{n}": m for n, m in contest.infer_models.items()}}
        params = {n: [p.detach() for p in m.parameters()] for n, m in models.items()}
        x = contest.x
        outs = {name: fn() for name, fn in fns.items()}
        between_rounds()
        for name, model in {
            **contest.train,
            **{f"inference/{n}": m for n, m in contest.infer_models.items()},
        }.items():
            for p, q in zip(model.parameters(), params[name]):
                assert p.data_ptr() != q.data_ptr() and torch.equal(p.detach(), q)
        assert contest.x.data_ptr() != x.data_ptr() and torch.equal(contest.x, x)
        for name, fn in fns.items():
            if outs[name] is not None:  # inference: the same output from the new copies
                torch.testing.assert_close(fn(), outs[name], rtol=0, atol=0)
            else:  # train step: backward reaches the relocated input
                fn()
                assert contest.inputs[name].grad is not None
            relocated.append(name)
        return measure_interleaved(fns, **kwargs)

    monkeypatch.setattr(ld_bench, "measure_interleaved", spy)
    cfg = Config(shape=(1, 16, 24, 24), device=torch.device("cpu"), quiet=True, min_time=0.01)
    res = ld_bench.run_vs_authors(cfg)
    assert relocated == [*res["train_step"], *res["inference"]]


@pytest.mark.parametrize(
    ("gflops", "text"),
    [
        (41.7234, "41.72 G"),
        (0.05461, "54.61 M"),
        (9.888e-05, "98.88 k"),
        (2.5e-7, "250"),
        (0.0, "0"),
    ],
)
def test_flops_are_written_with_a_prefix_not_an_exponent(gflops: float, text: str) -> None:
    from gald.bench._timing import format_flops

    assert format_flops(gflops) == text


def test_the_terminal_speed_cell_has_its_interval() -> None:
    from gald.bench._timing import Ratio, format_speed

    assert format_speed(Ratio(1.5, 0.1)) == "1.50x faster (95 %: 1.36–1.65)"
    assert format_speed(Ratio(0.5, 0.25)) == "2.00x slower (95 %: 1.60–2.50)"
    assert format_speed(Ratio(1.5, float("nan"))) == "1.50x faster"  # spread unknown
    assert format_speed(Ratio(1 / 735.03, 0.03)) == "735x slower (95 %: 714–757)"


def test_small_figures_are_not_written_as_zero() -> None:
    from gald.bench._timing import format_fraction, format_mib, format_rate

    assert [format_mib(b) for b in (None, 0, 1000, 400_000, 2**20 * 9.4, 2**20 * 147)] == [
        "n/a",
        "0",
        "< 0.01",
        "0.381",
        "9.4",
        "147.0",
    ]
    assert [format_rate(g) for g in (4800.0, 312.5, 4.381e-05)] == [
        "4.8 TB/s",
        "312.5 GB/s",
        "43.81 kB/s",
    ]
    assert [format_fraction(x) for x in (0.873, 0.042, 1e-6, 0.0)] == [
        "87 %",
        "4.2 %",
        "< 0.1 %",
        "0 %",
    ]


def test_the_progress_estimate_follows_each_ga_warmed_up(monkeypatch) -> None:
    """The first GA sets the first estimate; every later one replaces the guess for itself and
    for the GAs still to come (the mean of those known), so a cheap first GA does not leave the
    progress line under-estimating the rest."""
    from gald.bench import _timing

    call = {"gc": 0.001, "psp": 0.1}  # seconds per call: psp 100x the cost of gc
    current: list[str] = []
    monkeypatch.setattr(block, "time_once", lambda fn, device: call[current[-1]])
    real_pair = block._Pair

    def pair(ga: str, cfg: Config) -> object:
        current.append(ga)
        return real_pair(ga, cfg)

    totals: list[float] = []

    def measure(fns, **kwargs):  # type: ignore[no-untyped-def]
        totals.append(cfg.progress.total)
        return _timing.measure_interleaved(fns, **kwargs)

    monkeypatch.setattr(block, "_Pair", pair)
    monkeypatch.setattr(block, "measure_interleaved", measure)
    cfg = Config(shape=(1, 16, 17, 17), device=torch.device("cpu"), quiet=True, min_time=0.01)
    block.run(cfg, ["gc", "psp", "gc"])

    def per_ga(ga: str) -> float:  # 2 modes x 2 candidates
        return 4 * _timing.expected_seconds(call[ga], min_time=0.01, rounds=cfg.rounds)

    gc_s, psp_s = per_ga("gc"), per_ga("psp")
    first, second = 3 * gc_s, gc_s + psp_s + (gc_s + psp_s) / 2
    last = 2 * gc_s + psp_s  # everything known
    # measure_interleaved runs twice per GA (inference, train step)
    assert totals == pytest.approx([first, first, second, second, last, last])


def test_the_peak_of_a_train_step_starts_without_stale_gradients(monkeypatch) -> None:
    """The step frees the gradients of the timed calls before it allocates its own: counted in
    the baseline, they would lower both peaks by the size of the input and the parameters."""
    from gald.bench import block
    from gald.bench._config import Config

    stale = []

    def peak(fn, device):
        pair = fn.__closure__[next(i for i, n in enumerate(fn.__code__.co_freevars) if n == "self")]
        pair = pair.cell_contents
        grads = [pair.xr.grad, *(p.grad for m in pair.models.values() for p in m.parameters())]
        stale.append(sum(g is not None for g in grads))
        return 0

    monkeypatch.setattr(block, "peak_bytes", peak)
    cfg = Config(shape=(1, 8, 15, 15), device=torch.device("cpu"), quiet=True, min_time=0.01)
    block.run(cfg, ["gc"])
    assert stale == [0, 0]  # with and without LD


# --------------------------------------------------------------------------------------------
# interruption, partial writes and a closed standard output


def test_ctrl_c_is_one_line_and_status_130(monkeypatch, capsys) -> None:
    """Ctrl-C during a run: the progress line is closed, the thread count restored, and one
    line on stderr says so (no traceback); the ablation's main answers alike."""
    from gald.bench import ablation

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    threads = torch.get_num_threads()
    monkeypatch.setattr(block, "run", interrupted)
    assert main([*TINY, "--threads", "1"]) == 130
    assert torch.get_num_threads() == threads
    err = capsys.readouterr().err
    assert err.strip() == "python -m gald.bench: interrupted"
    monkeypatch.setattr(ablation, "run", interrupted)
    argv = ["--ablation", "--size", "16", "--batch-size", "2", "--eval-images", "2"]
    assert main([*argv, "--steps", "1", "--seeds", "1", "--channels", "8", "--quiet"]) == 130
    assert capsys.readouterr().err.strip().endswith("python -m gald.bench --ablation: interrupted")


def test_json_is_written_whole_or_not_at_all(monkeypatch, tmp_path) -> None:
    """A write that fails leaves the previous file as it was and no temporary file beside it;
    a symbolic link is written through; a path that is not a regular file is written in place."""
    from gald.bench import _args

    path = tmp_path / "r.json"
    path.write_text('{"previous": 1}')
    path.chmod(0o640)

    def full_disk(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_args.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _args.write_text(str(path), '{"new": 2}')
    assert path.read_text() == '{"previous": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    monkeypatch.undo()
    _args.write_text(str(path), '{"new": 2}')
    assert json.loads(path.read_text()) == {"new": 2}
    assert path.stat().st_mode & 0o777 == 0o640  # the old file's permissions
    link = tmp_path / "link.json"
    link.symlink_to(path)
    _args.write_text(str(link), '{"third": 3}')
    assert link.is_symlink() and json.loads(path.read_text()) == {"third": 3}
    r, w = os.pipe()
    with os.fdopen(r) as reader:
        _args.write_text(f"/proc/self/fd/{w}", "through a pipe")
        os.close(w)
        assert reader.read() == "through a pipe"


def test_ablation_json_failure_is_an_error_line(monkeypatch, tmp_path, capsys) -> None:
    from gald.bench import _args, ablation

    def full_disk(src: str, dst: object) -> None:  # the rename of the finished temporary file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_args.os, "replace", full_disk)
    argv = ["--size", "16", "--batch-size", "2", "--eval-images", "2", "--channels", "8"]
    rc = ablation.main([*argv, "--steps", "1", "--seeds", "1", "--json", str(tmp_path / "a.json")])
    assert rc == 1
    assert "error: could not write --json" in capsys.readouterr().err
    assert _args.write_text is not full_disk
    assert not (tmp_path / "a.json").exists()


def test_a_closed_stdout_does_not_lose_the_json(tmp_path) -> None:
    """``python -m gald.bench ... | head -1``: the reader goes away after one line; the run goes
    on and writes its --json, without a traceback."""
    path = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "gald.bench", *TINY, "--ga", "gc", "--json", str(path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # as head does after its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert "Traceback" not in err
    assert json.loads(path.read_text())["block"]


def test_stdout_writer_survives_a_broken_pipe() -> None:
    from gald.bench._args import Stdout

    r, w = os.pipe()
    os.close(r)
    with os.fdopen(w, "w") as stream:
        emit = Stdout(stream)
        emit("x" * 200_000)  # more than a pipe holds: the write fails on the closed reader
        emit("still fine")  # now into os.devnull


def test_a_plot_named_only_by_its_extension_is_written_there(tmp_path, monkeypatch, capsys):
    if not _has_matplotlib():
        pytest.fail("matplotlib is part of the dev extra")
    monkeypatch.chdir(tmp_path)
    assert main([*TINY, "--ga", "gc", "--plot", ".png"]) == 0
    assert (tmp_path / ".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / ".png.png").exists()


def test_json_records_the_gald_version(tiny_run) -> None:
    res, out, _ = tiny_run
    assert res["environment"]["gald"] == gald.__version__
    assert f"gald {gald.__version__}" in out
