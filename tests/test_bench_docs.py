"""The generated benchmark blocks of the docs: every block names the JSON it is made from, the
committed pages match their committed data, and the multi-run kinds (``runs``, ``spread``,
``first``) compute what they state."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

import gald
from gald.bench import first_call
from gald.bench.__main__ import main as bench_main
from gald.bench.docs import (
    DEFAULT_FILES,
    MARKER,
    load,
    main,
    render_added,
    render_rounds,
    render_runs,
    render_spread,
    render_unstable,
    rewrite,
)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "docs" / "data"


@pytest.mark.parametrize("name", DEFAULT_FILES)
def test_committed_pages_match_their_data(name: str) -> None:
    path = ROOT / name
    text = path.read_text()
    markers = list(MARKER.finditer(text))
    assert markers, f"{name} has no generated block"
    for m in markers:  # every block names its data: no page depends on an unnamed run
        assert m.group("paths").split(), f"{name}: a {m.group('kind')} block names no JSON file"
    new, n = rewrite(text, base=path.parent)
    assert n == len(markers)
    assert new == text, f"{name} is out of date: run python -m gald.bench.docs"


def test_every_data_file_is_used_and_written_by_the_runs_script() -> None:
    named = set()
    for name in DEFAULT_FILES:
        path = ROOT / name
        for m in MARKER.finditer(path.read_text()):
            named |= {(path.parent / p).resolve() for p in m.group("paths").split()}
    on_disk = {p.resolve() for p in DATA.glob("*.json")}
    assert named == on_disk
    script = (ROOT / "benchmarks" / "docs_runs.sh").read_text()
    for p in on_disk:
        stem = p.stem.rstrip("0123456789").rstrip("-")
        assert f'"$d/{stem}' in script, f"{p.name} is written by no command of docs_runs.sh"
        assert load(p)["command"].startswith("python -m gald.bench ")


def _spread_pair(scale: float, shift: float) -> list[dict]:
    """Two runs of one command: the second's medians scaled, its overhead interval shifted."""
    first = load(DATA / "spread-small-1.json")
    second = copy.deepcopy(first)
    row = second["block"]["rows"][0]
    for model in row["models"].values():
        for key in ("inference", "train_step"):
            model[key]["median_ms"] *= scale
    for key in ("inference", "train_step"):
        ov = row["overhead"][key]
        for k in ("ratio", "ratio_low", "ratio_high"):
            ov[k] += shift
    return [first, second]


def test_spread_states_overlap_and_distance() -> None:
    same = render_spread(_spread_pair(1.10, 0.0))
    assert "intervals of the 2 runs overlap (inference and train step)" in same
    assert "within 10% of each other" in same
    apart = render_spread(_spread_pair(1.0, 100.0))
    assert "do not all overlap (inference nor train step)" in apart
    assert "within 0% of each other" in apart
    mixed = _spread_pair(1.0, 0.0)
    for k in ("ratio", "ratio_low", "ratio_high"):
        mixed[1]["block"]["rows"][0]["overhead"]["inference"][k] += 100.0
    said = render_spread(mixed)
    assert "overlap for the train-step overhead, not for the inference overhead" in said


def test_runs_state_the_range_over_all_runs() -> None:
    first = load(DATA / "ld-nchw-1.json")
    second = copy.deepcopy(first)
    first["ld"]["inference"]["gald"]["speedup_vs_authors"]["ratio"] = 1.5
    second["ld"]["inference"]["gald"]["speedup_vs_authors"]["ratio"] = 2.25
    second["ld"]["memory"]["gald"]["saved_bytes"] = first["ld"]["memory"]["authors"]["saved_bytes"]
    text = render_runs([first, second])
    assert "Over these 2 runs" in text
    assert "inference 1.50–2.25x" in text  # the worst run is shown, not only the best
    assert (
        f"memory kept for backward {first['ld']['memory']['gald']['saved_bytes'] / first['ld']['memory']['authors']['saved_bytes']:.2f}–1.00x"
        in text
    )
    one = render_runs([first, copy.deepcopy(first)])
    assert "inference 1.50x;" in one  # equal ends print one value


def _with_times(res: dict, ga: str, kind: str, with_ld: list[float], without: list[float]) -> None:
    row = next(r for r in res["block"]["rows"] if r["ga"] == ga)
    for label, rounds in (("with LD", with_ld), ("without LD", without)):
        t = row["models"][label][kind]
        t["round_medians_ms"] = rounds
        t["median_ms"] = sorted(rounds)[len(rounds) // 2]
    ratios = sorted(a / b for a, b in zip(with_ld, without, strict=True))
    ratio = ratios[len(ratios) // 2]
    # a +-1 % interval: measured unless the figure is within 1 % of no difference
    row["overhead"][kind].update(ratio=ratio, ratio_low=ratio / 1.01, ratio_high=ratio * 1.01)


def test_the_sentences_beside_the_tables_follow_the_data() -> None:
    res = load(DATA / "all.json")
    for row in res["block"]["rows"]:  # every GA: 10 ms added to an inference, 30 to a step
        _with_times(res, row["ga"], "inference", [110.0] * 5, [100.0] * 5)
        _with_times(res, row["ga"], "train_step", [330.0] * 5, [300.0] * 5)
    _with_times(
        res, "gc", "inference", [30.0, 30.0, 20.0, 20.0, 40.0], [10.0, 30.0, 10.0, 20.0, 20.0]
    )
    _with_times(res, "psp", "inference", [502.5] * 5, [500.0] * 5)
    added = render_added(res)
    assert "adds 2 to 10 ms to an inference and 30 ms to a train step" in added
    assert "whichever of the 10 GA layers" in added
    # psp's +0.5 % is within its interval of no difference: the sentence says so, as the table
    assert re.search(
        r"smallest next to psp \(within noise \[-0\.5, \+1\.5 %\]\), \w+ \(\+10\.0 % "
        r"\[\+8\.9, \+11\.1\]\) and",
        added,
    )
    assert re.search(r"largest next to \w+ \(\+10\.0 %.*\) and gc \(\+100\.0 % \[", added)
    assert "the intervals of the two groups overlap" in added  # the 10 % rows are on both sides
    for row in res["block"]["rows"]:
        if row["ga"] not in ("psp", "gc"):
            _with_times(res, row["ga"], "inference", [150.0] * 5, [100.0] * 5)
    _with_times(res, "danet", "inference", [101.0] * 5, [100.0] * 5)
    _with_times(res, "aspp", "inference", [102.0] * 5, [100.0] * 5)
    _with_times(res, "cgnl", "inference", [190.0] * 5, [100.0] * 5)
    _with_times(res, "glore", "inference", [195.0] * 5, [100.0] * 5)
    assert "the two groups' intervals do not overlap" in render_added(res)
    # gc's pooled medians (30 / 20) part most from its per-round ratios (3, 1, 2, 1, 2)
    rounds = render_rounds(res)
    assert rounds.startswith(
        "In the GA table below, gc's inference overhead is +100.0 % next to 30.0 and 20.0 ms "
        "(a ratio of 1.50)"
    )
    assert "round medians 30, 30, 20, 20, 40 ms with the LD and 10, 30, 10, 20, 20 ms" in rounds
    assert "per-round ratios were 1.00 to 3.00, median 2.00" in rounds
    authors = res["ld"]["train_step"]["authors"]
    authors.update(iqr_ms=12.0, median_ms=200.0, round_medians_ms=[190.0, 200.0, 210.0])
    unstable = render_unstable(res)
    assert "an interquartile range of 12 ms around a 200 ms median" in unstable
    assert "(round medians 190, 200, 210 ms)" in unstable


def test_check_reports_a_stale_block_and_rewrite_fixes_it(tmp_path, capsys) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "r.json").write_text((DATA / "ld-nchw-1.json").read_text())
    page = tmp_path / "page.md"
    page.write_text("kept\n<!-- bench:start runs data/r.json -->\nold\n<!-- bench:end -->\n")
    assert main(["--check", str(page)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert "old" in page.read_text()  # --check writes nothing
    assert main([str(page)]) == 0
    assert "| `python -m gald.bench --ga none --ld` |" in page.read_text()
    assert main(["--check", str(page)]) == 0
    page.write_text("<!-- bench:start block -->\n<!-- bench:end -->\n")
    with pytest.raises(SystemExit) as exc:
        main(["--check", str(page)])
    assert exc.value.code == 2
    assert "names no JSON file" in capsys.readouterr().err


def test_first_call_measures_a_fresh_process(monkeypatch) -> None:
    # one real fresh process (the forward case): the measurement script runs and its output is
    # read back. It is also the check that an eager first call of the fused LD op never imports
    # torch._dynamo (torch imports it, over a second, the first time a custom op without a
    # registered fake kernel runs). The checkpointed step's script is compiled, not run: that
    # checkpointing imports the compiler is torch's doing, and its rendering is tested below.
    real = first_call._one("cpu", 1, step=False)
    assert real["first_ms"] > 0 and real["second_ms"] > 0
    assert real["dynamo_imported"] is False, "the first eager call imported torch._dynamo"
    for step in (False, True):
        script = first_call._SCRIPT.format(
            threads=1, shape=first_call.SHAPE, device="cpu", step=step
        )
        compile(script, "first_call", "exec")
    fake = {"first_ms": 900.0, "second_ms": 100.0, "dynamo_imported": True}
    monkeypatch.setattr(
        first_call, "_one", lambda device, threads, step: real if not step else dict(fake)
    )
    res = first_call.run("cpu", 1, processes=1)
    assert res["cases"]["forward"] == [real] and res["cases"]["checkpointed_step"] == [fake]
    text = first_call.render(res)
    assert "1 fresh processes" in text and "torch._dynamo imported in 0 of 1" in text
    assert "first is 800 ms slower; torch._dynamo imported in 1 of 1" in text


def test_cli_first_call_goes_to_json(tmp_path, monkeypatch) -> None:
    fake = {"first_ms": 50.0, "second_ms": 5.0, "dynamo_imported": False}
    monkeypatch.setattr(first_call, "_one", lambda device, threads, step: dict(fake))
    out = tmp_path / "r.json"
    assert bench_main(["--ga", "none", "--first-call", "--quiet", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["first_call"]["cases"]) == set(first_call.CASES)
    assert first_call.extra_ms(res["first_call"]["cases"]["forward"]) == [45.0] * 3
    new, _ = rewrite("<!-- bench:start first -->\n<!-- bench:end -->\n", res)
    assert "first call 50 ms, second 5 ms, so the first is 45 ms slower" in new


def test_cli_first_call_failure_keeps_the_other_results(tmp_path, monkeypatch, capsys) -> None:
    def fail(device, threads, step):
        raise RuntimeError("the first-call process failed: boom")

    monkeypatch.setattr(first_call, "_one", fail)
    out = tmp_path / "r.json"
    argv = ["--shape", "1,16,17,17", "--min-time", "0.02", "--rounds", "3", "--quiet"]
    assert bench_main([*argv, "--first-call", "--json", str(out)]) == 1
    res = json.loads(out.read_text())
    assert "block" in res and res["first_call"] == {"error": "the first-call process failed: boom"}
    assert "first call not measured" in capsys.readouterr().out


def test_cost_lists_each_ga_alone(tmp_path) -> None:

    out = tmp_path / "c.json"
    argv = ["--ga", "gc,psp", "--cost", "--shape", "1,16,9,9", "--quiet", "--json", str(out)]
    assert bench_main(argv) == 0
    res = json.loads(out.read_text())
    assert "block" not in res  # --cost replaces the timing table
    assert res["cost"]["inner_shape"] == [1, 16, 5, 5]  # GALD's down stage: ceil(9 / 2)
    rows = {r["ga"]: r for r in res["cost"]["rows"]}
    assert list(rows) == ["gc", "psp"]
    for name, row in rows.items():
        layer = gald.create_ga(name, 16)
        assert row["params"] == sum(p.numel() for p in layer.parameters())
        assert row["gflops"] > row["gflops_inner"] > 0 and row["saved_bytes"] > 0
    new, _ = rewrite("<!-- bench:start cost -->\n<!-- bench:end -->\n", res)
    assert "| `psp` |" in new and "kept for backward, MiB 9×9" in new


@pytest.mark.parametrize(
    ("page", "message"),
    [
        # a lost end would swallow the text up to the next block's end
        (
            "<!-- bench:start environment data/r.json -->\nhand-written\n"
            "<!-- bench:start runs data/r.json -->\n<!-- bench:end -->\n",
            "line 3: a bench:start before the bench:end",
        ),
        ("<!--bench:start runs data/r.json-->\n<!-- bench:end -->\n", "line 1: malformed marker"),
        ("<!-- bench:start runs  data/r.json -->\n<!-- bench:end -->\n", "malformed marker"),
        ("<!-- bench:start runs data/r.JSON -->\n<!-- bench:end -->\n", "malformed marker"),
        ("<!-- bench:start runs data/r.json -->\ntext\n", "line 1: a bench:start without a"),
        ("text\n<!-- bench:end -->\n", "line 2: a bench:end without a bench:start"),
        (
            "<!-- bench:start runs data/r.json data/r.json -->\n<!-- bench:end -->\n",
            "lists a file twice",
        ),
        # a file of the wrong kind for its block: named, with the file
        ("<!-- bench:start block data/r.json -->\n<!-- bench:end -->\n", "block from data/r.json"),
        (
            "<!-- bench:start ld data/a.json -->\n<!-- bench:end -->\n",
            "not `python -m gald.bench --ablation",
        ),
    ],
)
def test_malformed_pages_and_wrong_data_fail_clearly(page: str, message: str, tmp_path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "r.json").write_text((DATA / "ld-nchw-1.json").read_text())
    (tmp_path / "data" / "a.json").write_text((DATA / "ablation.json").read_text())
    with pytest.raises(ValueError, match=message):
        rewrite(page, base=tmp_path)


def test_prose_that_quotes_a_marker_is_not_one() -> None:
    text = "Write `<!-- bench:start KIND FILE... -->` and `<!-- bench:end -->` around a block.\n"
    assert rewrite(text) == (text, 0)


def test_the_benchmarks_page_lists_every_marker_kind() -> None:
    from gald.bench.docs import RENDERERS

    page = (Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md").read_text()
    listed = re.search(r"\(KIND: ([^)]*)\)", page.replace("\n", " "))
    assert listed, "docs/benchmarks.md no longer lists the marker kinds"
    assert set(re.findall(r"`(\w+)`", listed.group(1))) == set(RENDERERS)


def test_check_outside_the_repository_says_where_to_run_it(tmp_path, monkeypatch, capsys) -> None:
    from gald.bench.docs import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["--check"])
    assert exc.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no such file: README.md" in err and "run it from the repository root" in err


def test_the_runs_summary_flags_figures_the_runs_would_not_quote() -> None:
    from gald.bench.docs import _runs_range

    def run(train: float, verdict: str) -> dict:
        speed = {"speedup_vs_authors": {"ratio": train, "verdict": verdict}}
        memory = {"authors": {"saved_bytes": 100}, "gald": {"saved_bytes": 60}}
        memory["gald, grad checkpointing"] = {"saved_bytes": 40}
        kinds = {
            "train_step": {"gald": speed, "gald, grad checkpointing": speed},
            "inference": {"gald": speed},
        }
        return {"ld": {**kinds, "memory": memory}}

    text = _runs_range([run(1.6, "measured"), run(0.25, "too noisy"), run(1.7, "measured")])
    assert "train step 0.25–1.70x (1 of 3 runs too noisy)" in text
    assert "memory kept for backward 0.60x" in text
    assert "runs" not in _runs_range([run(1.6, "measured")] * 2).split("saved")[0].split(": ")[1]


def _row(ga: str, ratio: float, low: float | None, high: float | None) -> dict:
    times = {"inference": {"median_ms": 10.0}, "train_step": {"median_ms": 30.0}}
    return {
        "ga": ga,
        "models": {"with LD": times, "without LD": times},
        "overhead": {"inference": {"ratio": ratio, "ratio_low": low, "ratio_high": high}},
    }


def _added(rows) -> str:
    from gald.bench.docs import render_added

    return render_added({"block": {"rows": rows}})


def test_render_added_groups_are_disjoint():
    """With 4 GA layers, 'smallest next to' and 'largest next to' name 2 each, no layer in
    both lists."""
    text = _added(
        [
            _row("a", 1.01, 1.0, 1.02),
            _row("b", 1.02, 1.01, 1.03),
            _row("c", 1.5, 1.4, 1.6),
            _row("d", 1.6, 1.5, 1.7),
        ]
    )
    small = text.split("smallest next to ")[1].split(" and largest")[0]
    large = text.split("largest next to ")[1]
    assert "c (" not in small and "b (" not in large, text


def test_render_added_unknown_interval_is_not_called_apart():
    """A group member whose interval is unknown (None ends) cannot support 'the two
    groups' intervals do not overlap'."""
    rows = [
        _row("a", 1.01, 1.0, 1.02),
        _row("b", 1.02, None, None),
        _row("c", 1.03, 1.02, 1.04),
        _row("d", 1.5, 1.4, 1.6),
        _row("e", 1.6, 1.5, 1.7),
        _row("f", 1.7, 1.6, 1.8),
    ]
    assert "do not overlap" not in _added(rows)


def test_render_added_touching_intervals_overlap():
    """Closed intervals that share an end overlap."""
    rows = [_row("a", 1.01, 1.0, 1.2), _row("b", 1.4, 1.2, 1.6)]
    assert "do not overlap" not in _added(rows)
