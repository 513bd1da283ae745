"""``python -m gald.bench``: how results leave the process. Values in every negative form reach
their checks; the options each part of a run reads are accepted; ``--json`` is strict JSON,
written whole or not at all (or in place where a rename cannot be made); a reader that goes away
at any line loses neither the JSON nor the exit status; the footer names gald's version."""

from __future__ import annotations

import json
import math
import os
import stat
import sys

import pytest
import torch

import gald
from gald.bench import __main__ as cli
from gald.bench import _args, ablation, cost, first_call, ld
from gald.bench.__main__ import main

TINY = ["--shape", "2,8,15,15", "--min-time", "0.01", "--rounds", "3", "--threads", "1", "--quiet"]
FAKE_FIRST = {"first_ms": 50.0, "second_ms": 5.0, "dynamo_imported": False}


class _Stop(Exception):
    """Raised by check_outputs, which runs right after the unused-options rule."""


def _dry(monkeypatch, argv: list[str]) -> str:
    """'ok' when the option checks up to check_outputs accept argv, else the error line."""

    def stop(*a, **k):
        raise _Stop

    monkeypatch.setattr(cli, "check_outputs", stop)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    try:
        main(argv)
    except _Stop:
        return "ok"
    except SystemExit as exc:
        return f"refused {exc.code}"
    return "ran"


# ---------------------------------------------------------------- negative values


@pytest.mark.parametrize("value", ["-Inf", "-NaN", "-INF"])
def test_negative_non_finite_values_in_any_case_reach_their_check(value, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--min-time", value])
    err = capsys.readouterr().err
    assert f"expected a positive number of seconds, at most 3600, got {value!r}" in err


def test_ablation_offset_in_leading_dot_exponent_form(monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(ablation, "run", lambda cfg, log=print: seen.append(cfg.offset) or {})
    monkeypatch.setattr(ablation, "render", lambda res: "")
    assert ablation.main(["--offset", "-.5e-1", "--seeds", "1", "--steps", "1", "--quiet"]) == 0
    assert seen == [-0.05]


# ---------------------------------------------------------------- write_text


def test_a_new_json_file_gets_the_usual_permissions(tmp_path) -> None:
    umask = os.umask(0o022)
    try:
        _args.write_text(str(tmp_path / "new.json"), "{}")
        assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o644
        assert os.umask(0o022) == 0o022  # the process umask is left as it was
    finally:
        os.umask(umask)


def test_ctrl_c_during_the_write_leaves_the_old_file_and_no_temporary(
    tmp_path, monkeypatch
) -> None:
    path = tmp_path / "r.json"
    path.write_text("old")

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(_args.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _args.write_text(str(path), "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_the_temporary_file_lies_beside_the_target(tmp_path, monkeypatch) -> None:
    """A rename is atomic only within one file system: the temporary file is made in the
    target's directory, not in $TMPDIR."""
    seen = []
    real = os.replace
    monkeypatch.setattr(_args.os, "replace", lambda s, d: seen.append((s, d)) or real(s, d))
    (tmp_path / "out").mkdir()
    _args.write_text(str(tmp_path / "out" / "r.json"), "{}")
    assert os.path.dirname(seen[0][0]) == str(tmp_path / "out")


# ---------------------------------------------------------------- strict_json


def test_strict_json_nulls_every_non_finite_float_at_any_depth() -> None:
    obj = {"a": [1.0, math.nan, (math.inf, -math.inf)], "b": math.inf, "c": {"d": [[-math.inf]]}}
    text = _args.strict_json(obj)
    assert json.loads(text) == {"a": [1.0, None, [None, None]], "b": None, "c": {"d": [[None]]}}


def test_bench_json_is_strict(tmp_path, monkeypatch) -> None:
    real = cli.environment
    monkeypatch.setattr(cli, "environment", lambda d, t: {**real(d, t), "odd": math.nan})
    out = tmp_path / "c.json"
    assert main(["--ga", "gc", "--cost", "--shape", "1,16,9,9", "--quiet", "--json", str(out)]) == 0

    def refuse(name):
        raise ValueError(name)

    assert json.loads(out.read_text(), parse_constant=refuse)["environment"]["odd"] is None


def test_ablation_json_is_strict(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(ablation, "run", lambda cfg, log=print: {"loss": [math.inf, 1.0]})
    monkeypatch.setattr(ablation, "render", lambda res: "")
    out = tmp_path / "a.json"
    argv = ["--seeds", "1", "--steps", "1", "--quiet", "--json", str(out)]
    assert ablation.main(argv) == 0
    assert json.loads(out.read_text())["loss"] == [None, 1.0]


# ---------------------------------------------------------------- unused options


@pytest.mark.parametrize(
    "argv",
    [
        ["--ga", "none", "--ld", "--compile", "off"],
        ["--ga", "none", "--ld", "--device", "cpu"],
        ["--ga", "none", "--first-call", "--device", "cpu"],
        ["--ga", "none", "--first-call", "--threads", "1"],
        ["--ga", "gc", "--cost", "--shape", "1,16,9,9"],
        ["--ga", "gc", "--device", "cpu", "--compile", "off", "--ld"],
    ],
)
def test_options_a_part_reads_are_accepted(argv, monkeypatch) -> None:
    assert _dry(monkeypatch, argv) == "ok"


def test_first_call_refuses_channels_last(monkeypatch, capsys) -> None:
    assert _dry(monkeypatch, ["--ga", "none", "--first-call", "--channels-last"]) == "refused 2"
    assert "--channels-last has no effect on what this run measures" in capsys.readouterr().err


# ---------------------------------------------------------------- the report's lines


def _stdout_closed_at(monkeypatch, module, name: str, *, before: bool = False):
    """stdout is a pipe whose reader goes away when ``module.name`` runs (after it, or before
    it with ``before``): the first write after that point meets a closed pipe, as under
    ``| head``. Returns the writer stream."""
    r, w = os.pipe()
    stream = os.fdopen(w, "w")
    monkeypatch.setattr(sys, "stdout", stream)
    real = getattr(module, name)
    closed = []

    def close_reader():
        if not closed:
            os.close(r)
            closed.append(True)

    def wrapped(*a, **k):
        if before:
            close_reader()
        res = real(*a, **k)
        close_reader()
        return res

    monkeypatch.setattr(module, name, wrapped)
    return stream


CLOSED_CASES = {
    # the reader leaves before the write under test; each write is the first to meet it
    "timing footer": ([*TINY, "--ga", "gc"], cli, "load_average", False),
    "LD table": ([*TINY, "--ga", "none", "--ld"], ld, "run_vs_authors", False),
    "kernels skipped": ([*TINY, "--ga", "none", "--ld"], ld, "kernels_runnable", False),
    "cost table": (["--ga", "gc", "--cost", "--shape", "1,16,9,9", "--quiet"], cost, "run", False),
    "counts footer": (
        ["--ga", "gc", "--cost", "--shape", "1,16,9,9", "--quiet"],
        cli,
        "load_average",
        False,
    ),
    "first-call table": (["--ga", "none", "--first-call", "--quiet"], first_call, "run", False),
}


@pytest.mark.parametrize("case", list(CLOSED_CASES))
def test_a_reader_that_goes_away_at_any_line_loses_nothing(case, tmp_path, monkeypatch) -> None:
    argv, module, name, before = CLOSED_CASES[case]
    monkeypatch.setattr(first_call, "_one", lambda device, threads, step: dict(FAKE_FIRST))
    if case == "kernels skipped":
        monkeypatch.setattr(ld, "kernels_runnable", lambda device: (False, "no GPU here"))
    stream = _stdout_closed_at(monkeypatch, module, name, before=before)
    out = tmp_path / "r.json"
    assert main([*argv, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["environment"]["gald"] == gald.__version__
    stream.flush()  # as the interpreter does at exit: the stream is usable, nothing pending fails
    stream.close()


def test_the_ablation_report_survives_a_closed_stdout(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(ablation, "render", lambda res: "the report\n" * 10)
    stream = _stdout_closed_at(monkeypatch, ablation, "run")
    out = tmp_path / "a.json"
    argv = ["--size", "16", "--batch-size", "2", "--eval-images", "2", "--channels", "8"]
    assert (
        ablation.main([*argv, "--steps", "1", "--seeds", "1", "--quiet", "--json", str(out)]) == 0
    )
    assert json.loads(out.read_text())["environment"]["gald"] == gald.__version__
    stream.flush()
    stream.close()


# ---------------------------------------------------------------- footer and JSON failure


def test_the_counts_footer_names_the_gald_version(capsys) -> None:
    assert main(["--ga", "gc", "--cost", "--shape", "1,16,9,9", "--quiet"]) == 0
    assert (
        capsys.readouterr()
        .out.rstrip()
        .endswith(f"torch {torch.__version__}, gald {gald.__version__}")
    )


def test_a_json_that_cannot_be_written_is_status_1(tmp_path, monkeypatch, capsys) -> None:
    def full_disk(src: str, dst: object) -> None:  # the rename of the finished temporary file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_args.os, "replace", full_disk)
    argv = [
        "--ga",
        "gc",
        "--cost",
        "--shape",
        "1,16,9,9",
        "--quiet",
        "--json",
        str(tmp_path / "c.json"),
    ]
    assert main(argv) == 1
    assert "error: could not write --json" in capsys.readouterr().err


def test_where_no_rename_can_be_made_the_file_is_written_in_place(tmp_path, monkeypatch) -> None:
    """A read-only directory holding a writable file, a file mounted alone into a container
    (the rename is refused: EACCES, EBUSY), a name too long for a temporary prefix: the JSON is
    written in place, as the check before the run found it could be. A full disk still leaves
    the old file as it was."""
    import errno

    path = tmp_path / "r.json"
    for code in (errno.EBUSY, errno.EACCES):
        path.write_text("old")

        def refused(src: str, dst: object, code: int = code) -> None:
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(_args.os, "replace", refused)
        _args.write_text(str(path), f"new {code}")
        assert path.read_text() == f"new {code}"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    monkeypatch.undo()

    def no_temporary(*args: object, **kwargs: object) -> tuple[int, str]:
        raise OSError(errno.ENAMETOOLONG, "File name too long")

    monkeypatch.setattr(_args.tempfile, "mkstemp", no_temporary)
    _args.write_text(str(path), "in place")
    assert path.read_text() == "in place"
    monkeypatch.undo()

    def full_disk(src: str, dst: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_args.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _args.write_text(str(path), "lost")
    assert path.read_text() == "in place"
