"""``python -m gald.bench``: bad inputs fail up front (output paths, shapes too small for a
requested model, non-finite numbers), and the faster/slower verdict is one symmetric rule."""

from __future__ import annotations

import argparse
import math
import os

import pytest
import torch

from gald.bench import ablation, block
from gald.bench import ld as ld_bench
from gald.bench.__main__ import main
from gald.bench._timing import SPEEDUP_NOTE, Ratio, Stats, format_overhead, format_speed

SMALL = ["--min-time", "0.05", "--rounds", "3", "--threads", "1", "--quiet"]


@pytest.fixture
def nothing_runs(monkeypatch) -> None:
    """Fail the test if a benchmark starts: every check here must come before."""

    def fail(*args, **kwargs):
        raise AssertionError("a benchmark ran before the bad input was reported")

    monkeypatch.setattr(block, "run", fail)
    monkeypatch.setattr(ld_bench, "run_vs_authors", fail)
    monkeypatch.setattr(ablation, "run", fail)


def _error(capsys, fn, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        fn(argv)
    assert exc.value.code == 2
    return " ".join(capsys.readouterr().err.split())  # argparse may wrap


# --------------------------------------------------------------------------------------------
# --json / --plot paths


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_output_in_a_missing_directory_fails_before_the_run(
    option, tmp_path, capsys, nothing_runs
) -> None:
    path = tmp_path / "missing" / "r.out"
    err = _error(capsys, main, ["--shape", "1,16,17,17", *SMALL, option, str(path)])
    assert f"error: {option}: expected a writable file path in an existing directory" in err
    assert repr(str(path)) in err and "does not exist" in err
    assert not path.parent.exists()


@pytest.mark.parametrize("name", ["r.txt", "noext"])
def test_plot_must_be_a_png(name, tmp_path, capsys, nothing_runs) -> None:
    path = tmp_path / name
    err = _error(capsys, main, ["--shape", "1,16,17,17", *SMALL, "--plot", str(path)])
    assert "--plot: expected a path ending in .png" in err and repr(str(path)) in err


def test_output_that_is_a_directory_fails(tmp_path, capsys, nothing_runs) -> None:
    err = _error(capsys, main, ["--shape", "1,16,17,17", *SMALL, "--json", str(tmp_path)])
    assert "--json:" in err and "that is a directory" in err


def test_output_in_a_read_only_directory_fails(tmp_path, capsys, nothing_runs, monkeypatch) -> None:
    # os.access stands in for a read-only directory (CI runs as root, which writes anywhere)
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode)
    )
    err = _error(
        capsys, main, ["--shape", "1,16,17,17", *SMALL, "--json", str(tmp_path / "r.json")]
    )
    assert "--json:" in err and "is not writable" in err


def test_output_that_cannot_be_opened_fails_before_the_run(
    tmp_path, capsys, nothing_runs, monkeypatch
) -> None:
    # permissions allow it, opening does not (a read-only mount, /proc, a full quota)
    import builtins

    target = tmp_path / "r.json"
    real_open = builtins.open

    def refusing_open(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(path) == str(target):
            raise OSError(30, "Read-only file system")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    err = _error(capsys, main, ["--shape", "1,16,17,17", *SMALL, "--json", str(target)])
    assert "--json:" in err and "cannot be opened for writing: Read-only file system" in err
    assert not target.exists()


def test_ablation_json_in_a_missing_directory_fails(tmp_path, capsys, nothing_runs) -> None:
    path = tmp_path / "missing" / "a.json"
    err = _error(capsys, ablation.main, ["--json", str(path)])
    assert "--json:" in err and "does not exist" in err


# --------------------------------------------------------------------------------------------
# shapes too small for a requested model


def _runs(model: torch.nn.Module, shape: tuple[int, int, int, int]) -> bool:
    """A real (CPU) train-mode forward: the ground truth the meta dry run must match."""
    try:
        model.train()(torch.randn(shape))
    except (ValueError, RuntimeError):
        return False
    return True


def test_ld_too_small_names_the_authors_branch_and_the_smallest_shape(
    tmp_path, capsys, nothing_runs
) -> None:
    # the case of the report: the GA table ran, then --ld died and the JSON was lost
    argv = ["--shape", "1,16,17,17", *SMALL, "--ga", "cgnl,psp", "--ld"]
    err = _error(capsys, main, [*argv, "--json", str(tmp_path / "r.json")])
    assert "error: --shape 1,16,17,17 is too small" in err
    assert "--ld: the authors' LD branch needs H, W >= 23 at batch size 1" in err
    assert "Expected more than 1 value per channel" in err  # the authors' plain BatchNorm
    assert "--ga cgnl" not in err and "--ga psp" not in err  # those run at 17x17
    assert "--shape 1,16,23,23" in err and "--shape 2,16,15,15" in err
    assert not (tmp_path / "r.json").exists()
    # the sides named are the real ones, not the meta device's
    authors = ld_bench.AuthorsLD(16)
    assert _runs(authors, (1, 16, 23, 23)) and not _runs(authors, (1, 16, 22, 22))
    assert _runs(authors, (2, 16, 15, 15)) and not _runs(authors, (2, 16, 14, 14))


def test_ga_too_small_names_the_ga_instead_of_a_raw_batchnorm_error(capsys, nothing_runs) -> None:
    err = _error(capsys, main, ["--shape", "1,16,3,3", *SMALL])
    assert "--ga cgnl: GALD(cgnl) with LD needs H, W >= 9 at batch size 1" in err
    assert "--shape 1,16,9,9" in err
    model = block.build("cgnl", 16, ld=True)
    assert _runs(model, (1, 16, 9, 9)) and not _runs(model, (1, 16, 8, 8))


def test_a_channel_count_a_ga_refuses_fails_before_any_ga_runs(capsys, nothing_runs) -> None:
    err = _error(capsys, main, ["--shape", "1,4,17,17", *SMALL, "--ga", "cgnl,criss_cross"])
    assert "error: --shape 1,4,17,17: what it is asked to run cannot be built for C = 4" in err
    assert "--ga criss_cross: GALD(criss_cross) with LD cannot be built: ValueError" in err
    assert "--ga cgnl" not in err  # cgnl takes 4 channels


@pytest.mark.parametrize(
    ("shape", "why"),
    [
        ("99999999999999999999,16,17,17", "more than a tensor can index"),
        ("67108864,16,8192,8192", "the input alone needs 268,435,456 GiB, which cpu refuses"),
    ],
)
def test_an_input_too_large_to_allocate_is_named(capsys, nothing_runs, shape, why) -> None:
    err = _error(capsys, main, ["--shape", shape, *SMALL])
    assert f"error: --shape {shape}: " in err and why in err


def test_running_out_of_memory_is_an_error_not_a_traceback(monkeypatch, capsys) -> None:
    def oom(*args, **kwargs):
        raise RuntimeError(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 bytes"
        )

    monkeypatch.setattr(block, "run", oom)
    assert main(["--shape", "1,16,17,17", *SMALL]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "error: the models do not fit in the memory of cpu at --shape (1, 16, 17, 17)" in err

    def bug(*args, **kwargs):
        raise RuntimeError("a bug, not an allocation")

    monkeypatch.setattr(block, "run", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["--shape", "1,16,17,17", *SMALL])


def test_shapes_that_fit_pass_the_check() -> None:
    from gald.bench.__main__ import _too_small

    assert _too_small(["cgnl", "psp"], True, (1, 16, 23, 23)) is None
    assert _too_small(["cgnl"], True, (2, 16, 15, 15)) is None
    assert _too_small(["cgnl"], False, (2, 512, 97, 97)) is None  # meta: instant at any size
    # not square: a wide input can run where its short side alone would not
    assert _too_small(["cgnl"], True, (1, 16, 17, 40)) is None
    assert _runs(ld_bench.AuthorsLD(16), (1, 16, 17, 40))


# --------------------------------------------------------------------------------------------
# non-finite numbers


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1", "x", "3601", "1e308"])
def test_min_time_must_be_positive_and_at_most_an_hour(value, capsys, nothing_runs) -> None:
    err = _error(capsys, main, ["--shape", "1,16,17,17", f"--min-time={value}"])
    assert "argument --min-time: expected a positive number of seconds, at most 3600" in err
    assert repr(value) in err


def test_durations_are_written_in_a_readable_unit() -> None:
    from gald.bench._timing import format_duration

    assert [format_duration(s) for s in (0.2, 59, 150, 7300)] == [
        "under 1 s",
        "about 59 s",
        "about 2.5 min",
        "about 2.0 h",
    ]


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_an_empty_output_path_is_named_as_empty(option, capsys, nothing_runs) -> None:
    err = _error(capsys, main, ["--shape", "1,16,17,17", *SMALL, option, ""])
    assert (
        f"error: {option}: expected a writable file path in an existing directory, got '' " in err
    )
    assert "(an empty path)" in err
    err = _error(capsys, main, ["--shape", "1,16,17,17", *SMALL, option, "-"])
    assert "'-' is not standard output here: the tables go there; give a file name" in err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "x"])
def test_ablation_offset_must_be_finite(value, capsys, nothing_runs) -> None:
    err = _error(capsys, main, ["--ablation", f"--offset={value}"])
    assert f"argument --offset: expected a finite number, got {value!r}" in err


def test_ablation_offset_accepts_finite_numbers(monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(ablation, "run", lambda cfg, log=print: seen.append(cfg.offset) or {})
    monkeypatch.setattr(ablation, "render", lambda res: "")
    assert ablation.main(["--offset", "-0.5", "--seeds", "1", "--steps", "1"]) == 0
    assert seen == [-0.5]


# --------------------------------------------------------------------------------------------
# one symmetric verdict for overheads and speedups


@pytest.mark.parametrize(
    ("value", "half"),
    [
        (43.46, 0.98),
        (43.46, 0.3),
        (2.0, 0.45),
        (2.0, 0.3),
        (1.3, 0.4),
        (1.05, 0.01),
        (3.0, 0.5),
        (1.2, 0.6),  # too noisy, and the interval contains 1
    ],
)
def test_a_ratio_and_its_inverse_get_the_same_verdict(value, half) -> None:
    r, inv = Ratio(value, half), Ratio(1 / value, half)
    assert r.verdict == inv.verdict
    assert r.low == pytest.approx(1 / inv.high) and r.high == pytest.approx(1 / inv.low)
    for x in (r, inv):
        speed, overhead = format_speed(x), format_overhead(x)
        assert (speed == "same within noise") == overhead.startswith("within noise")
        assert speed.startswith("too noisy") == overhead.startswith("too noisy")
        assert speed.startswith("too noisy") == (x.verdict == "too noisy")


def test_speed_of_a_huge_spread_is_not_a_figure() -> None:
    # the report: "43.46x slower" printed where the inverse said "within noise"
    slow, fast = Ratio(1 / 43.46, 0.98), Ratio(43.46, 0.98)
    assert slow.verdict == fast.verdict == "too noisy"
    assert format_speed(slow) == "too noisy (22x–86x slower)"
    assert format_speed(fast) == "too noisy (22x–86x faster)"
    assert format_overhead(fast) == "too noisy (> +1000 %)"
    # measured: a figure, and the same figure both ways
    assert format_speed(Ratio(2.0, 0.1)) == "2.00x faster (95 %: 1.82–2.20)"
    assert format_speed(Ratio(0.5, 0.1)) == "2.00x slower (95 %: 1.82–2.20)"
    assert format_speed(Ratio(0.5, math.nan)) == "2.00x slower"  # spread unknown: as before


def test_verdict_from_measured_stats_is_symmetric() -> None:
    a = Stats([0.2, 1.0, 3.0, 0.5, 2.0], round_medians=[0.3, 2.5, 0.9, 1.5, 0.6])
    b = Stats([0.05, 0.06, 0.04, 0.05, 0.05], round_medians=[0.05, 0.05, 0.05, 0.05, 0.05])
    ab, ba = Ratio.of(a, b), Ratio.of(b, a)
    assert ab.rel_halfwidth == pytest.approx(ba.rel_halfwidth)
    assert ab.verdict == ba.verdict == "too noisy"
    assert format_speed(ab).endswith("faster)") and format_speed(ba).endswith("slower)")


def test_docs_speed_uses_the_same_rule() -> None:
    from gald.bench.docs import _speed

    noisy = Ratio(1 / 43.46, 0.98).as_dict()
    assert noisy["verdict"] == "too noisy"
    assert _speed(noisy) == "too noisy (22x–86x slower)"
    assert _speed(Ratio(1.0, 0.2).as_dict()) == "same within noise"


def test_printed_interval_is_the_one_the_verdict_uses() -> None:
    # the interval is [v / (1 + h), v * (1 + h)]: a measured (bold) overhead never shows a range
    # that crosses 0, and the ends printed are the interval's own
    r = Ratio(1.2, 0.19)
    assert r.verdict == "measured" and r.low > 1.0
    assert format_overhead(r, emphasis=True) == "**+20.0 %** [+0.8, +42.8]"
    assert r.as_dict()["overhead_pct_low"] == pytest.approx(100 * (1.2 / 1.19 - 1))
    assert r.as_dict()["overhead_pct_high"] == pytest.approx(100 * (1.2 * 1.19 - 1))
    assert format_overhead(Ratio(1.05, 0.1)) == "within noise [-5, +16 %]"  # wider than 10: whole %
    assert format_overhead(Ratio(1.01, 0.02)) == "within noise [-1.0, +3.0 %]"


def test_ablation_size_too_small_to_train_fails_before_the_run(capsys, nothing_runs) -> None:
    argv = [
        "--seeds",
        "1",
        "--steps",
        "3",
        "--size",
        "16",
        "--eval-images",
        "2",
        "--batch-size",
        "1",
    ]
    err = _error(capsys, ablation.main, argv)
    assert "--size 16 with --batch-size 1: the ld variant cannot train on it" in err
    assert "sees a 1x1 map" in err and "cannot normalise a single value per channel" in err


def test_a_compile_failure_is_a_note_not_a_crash(monkeypatch, capsys) -> None:
    # inductor can fail on some inputs (an AssertionError at tiny shapes on CPU): the run goes
    # on without that candidate and says why
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("inductor failed here")

    monkeypatch.setattr(torch, "compile", lambda module, **kw: Broken())
    argv = ["--shape", "2,16,24,24", *SMALL, "--ga", "none", "--ld", "--compile", "on", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "authors, torch.compile not measured: it failed on this input" in out
    assert "inductor failed here" in out and "train step: gald" in out
    # the speedup column is the median of per-round ratios, and the table says so under it
    assert out.index(SPEEDUP_NOTE) > out.index("inference: gald (BN folded)")


def test_duplicate_gas_once_and_compile_needs_ld(capsys, nothing_runs) -> None:
    from gald.bench.__main__ import _gas, build_parser

    assert _gas(build_parser(), "psp,cgnl,psp") == ["psp", "cgnl"]
    err = _error(capsys, main, ["--shape", "1,16,17,17", *SMALL, "--compile", "on"])
    assert "--compile on times torch.compile of the authors' LD: it needs --ld" in err


def test_ablation_quiet_keeps_results_and_the_caveat(capsys) -> None:
    argv = ["--seeds", "1", "--steps", "2", "--size", "16", "--eval-images", "2", "--quiet"]
    assert ablation.main(argv) == 0
    out = capsys.readouterr().out
    assert "says little about full-size training" in out and "Per variant" in out
    assert "seed 0" not in out and "At the default size" not in out


def test_more_argument_mistakes_fail_before_the_run(tmp_path, capsys, nothing_runs) -> None:
    shape = ["--shape", "1,16,17,17", *SMALL]
    same = str(tmp_path / "r.png")
    err = _error(capsys, main, [*shape, "--json", same, "--plot", same])
    assert "--json and --plot name the same file" in err
    err = _error(capsys, main, [*shape, "--ga", "all", "--cost", "--dtype", "bfloat16"])
    assert "--cost counts float32 NCHW layers" in err
    err = _error(capsys, main, [*shape, "--ga", "all,psp"])
    assert "--ga: all and none stand alone" in err
    err = _error(capsys, main, [*shape, "--ga", "none", "--cost"])
    assert "--cost lists the GA layers of --ga" in err
    err = _error(capsys, main, [*shape, "--ga", "nope"])
    assert "or all, or none" in err


class _NeedsSide(torch.nn.Module):
    """Runs from side ``side`` up (at batch 1; ``side // 2`` at batch 2), or only on multiples
    of ``multiple`` (a constraint no size bound explains)."""

    def __init__(self, side: int = 1, multiple: int = 1, width: int = 1) -> None:
        super().__init__()
        self.side, self.multiple, self.width = side, multiple, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        need = self.side if x.shape[0] == 1 else self.side // 2
        if min(x.shape[-2:]) < need:
            raise ValueError(f"needs {need}")
        if x.shape[-1] % self.multiple:
            raise ValueError("not a multiple")
        if x.shape[-1] < self.width:
            raise ValueError("too narrow")
        return x


def test_size_search_on_synthetic_parts() -> None:
    from gald.bench._sizes import smallest_side, too_small

    big = {"big": lambda: _NeedsSide(37)}
    assert smallest_side({"m": _NeedsSide(37)}, 1, 3) == 37
    assert smallest_side({"m": _NeedsSide(37)}, 1, 3, fails_at=20) == 37
    assert smallest_side({"m": _NeedsSide(37)}, 2, 3, runs_at=37) == 18
    msg = too_small({"--a": big, "--b": {"small": lambda: _NeedsSide(5)}}, (1, 3, 20, 30))
    assert msg is not None and "--a: big needs H, W >= 37 at batch size 1 (>= 18" in msg
    assert (
        "--b" not in msg and "--shape 1,3,37,37 (or, with a batch of 2, --shape 2,3,18,18)" in msg
    )
    # a part that ran at the requested shape but not at the proposed one raises the proposal
    msg = too_small(
        {"--a": {"a": lambda: _NeedsSide(9)}, "--b": {"b": lambda: _NeedsSide(width=12)}},
        (1, 3, 5, 40),
    )
    assert msg is not None and "--b" not in msg.splitlines()[1]
    assert msg.endswith("smallest square input that runs all of it: --shape 1,3,12,12")
    # a failure that a smaller square does not have is not about the size: left to the real run
    assert too_small({"--m": {"m": lambda: _NeedsSide(1, multiple=8)}}, (1, 3, 16, 20)) is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--first-seed", str(10**20)], "--first-seed must be in [0, 2**32 - --seeds]"),
        (["--first-seed", "-1"], "--first-seed must be in [0, 2**32 - --seeds]"),
        (["--size", str(10**8)], "--size 100000000 with --batch-size 8: one batch of images"),
        (["--channels", str(10**16)], f"--channels {10**16}: the models cannot be built"),
    ],
)
def test_ablation_values_too_large_are_named(argv, message, capsys, nothing_runs) -> None:
    err = _error(capsys, main, ["--ablation", "--seeds", "1", *argv])
    assert message in err


def test_the_rounds_interval_covers_95_percent_of_normal_noise() -> None:
    """Paired per-round log ratios drawn around a known ratio: the interval of ``Ratio.of``
    holds it about 95 % of the time at the round counts people use (the large-sample formula
    held it 82 % of the time at 3 rounds and 87 % at 5)."""
    import random

    from gald.bench._timing import median_q95

    gen = random.Random(0)
    for rounds in (3, 5, 8, 31):
        hits, reps = 0, 4000
        for _ in range(reps):
            a = [2.0 * math.exp(gen.gauss(0.0, 0.1)) for _ in range(rounds)]
            r = Ratio.of(
                Stats(a, round_medians=a), Stats([1.0] * rounds, round_medians=[1.0] * rounds)
            )
            hits += r.low <= 2.0 <= r.high
        assert 0.93 <= hits / reps <= 0.97, (rounds, hits / reps)
    assert median_q95(30) > median_q95(31) > median_q95(60) > 1.96 * 1.2533 / math.sqrt(60)
    with pytest.raises(ValueError, match="n must be at least 3, got 2"):
        median_q95(2)


def test_cost_checks_each_ga_alone_before_anything_runs(capsys, nothing_runs) -> None:
    err = _error(capsys, main, ["--ga", "dualgcn,gc", "--cost", "--shape", "1,64,3,3"])
    assert "--ga dualgcn --cost: dualgcn needs H, W >= 9 at batch size 1" in err
    assert "--ga gc" not in err  # gc alone runs at 3x3


def test_the_large_bandwidth_shape_is_skipped_where_it_does_not_fit(monkeypatch) -> None:
    """The GPU check times the kernels at a large shape only where the rows fit in the free
    device memory, and says so instead of running out of memory on a small card."""
    from gald.bench import ld

    need = ld.LARGE_SHAPE_COPIES * math.prod(ld.LARGE_SHAPE) * 4
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (need, 80 * 2**30))
    assert ld.large_shape_room(torch.device("cuda", 0)) is None
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (need - 1, 8 * 2**30))
    why = ld.large_shape_room(torch.device("cuda", 0))
    assert why is not None and "8x512x129x257 skipped: it needs about 8.1 GiB" in why
    res = {"checks": [], "bandwidth": [], "skipped": [why], "shape": [1, 2, 3, 4], "logits": [1, 1]}
    assert why in ld.render_kernels(res, "cfg")


@pytest.mark.parametrize("n", [31, 32, 45, 60])
def test_median_q95_above_its_table_matches_a_simulation(n: int) -> None:
    """The 95 % half-width of the median in units of 1.4826 * MAD, simulated with 200 000
    normal samples of size n, against the fitted formula used above the simulated table."""
    from gald.bench._timing import median_q95

    gen = torch.Generator().manual_seed(n)
    x = torch.randn(200_000, n, generator=gen, dtype=torch.float64)
    centre = x.quantile(0.5, dim=1, keepdim=True)  # the mean of the two middle ones for even n
    mad = (x - centre).abs().quantile(0.5, dim=1)
    simulated = float((centre.squeeze(1).abs() / (1.4826 * mad)).quantile(0.95))
    assert median_q95(n) == pytest.approx(simulated, rel=0.015)


def test_run_kernels_reports_a_skipped_large_shape(monkeypatch):
    """On a GPU without room for the large shape, the skip is said in the results."""
    from gald.bench import ld as ld_bench
    from gald.bench._config import Config

    monkeypatch.setattr(ld_bench, "check_kernel", lambda *a, **k: {"ok": True})
    monkeypatch.setattr(ld_bench, "large_shape_room", lambda device: "large skipped: no room")
    monkeypatch.setattr(ld_bench, "_bandwidth", lambda *a, **k: [])
    cfg = Config(shape=(2, 8, 33, 33), device=torch.device("cuda", 0), quiet=True)
    res = ld_bench.run_kernels(cfg)
    assert res["skipped"] == ["large skipped: no room"]


def test_finite_float_refuses_infinity():
    """--offset inf is refused like nan."""
    from gald.bench._args import finite_float

    for text in ("inf", "-inf", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a finite number"):
            finite_float(text)


def test_output_problem_dash_and_directory(tmp_path):
    """ "-" is refused as an output path, and a directory is named as one (not reported as a
    failure to open it)."""
    from gald.bench._args import output_problem

    assert "not standard output" in output_problem("-")
    assert output_problem(str(tmp_path)) == "that is a directory"
