"""Argument checks shared by ``python -m gald.bench`` and its ablation: a bad value fails before
anything runs, with a message that names the option, what it expects and what it got."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


def finite_float(text: str) -> float:
    """An ``argparse`` type: a finite number (``nan`` and ``inf`` are refused)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


MAX_SECONDS = 3600.0


def positive_seconds(text: str) -> float:
    """An ``argparse`` type: a positive number of seconds, at most an hour (a longer minimum
    measured time per candidate is a typo, not a benchmark)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= MAX_SECONDS):
        raise argparse.ArgumentTypeError(
            f"expected a positive number of seconds, at most {MAX_SECONDS:.0f}, got {text!r}"
        )
    return value


def output_problem(path: str) -> str | None:
    """Why a file cannot be written at ``path`` (``None`` when it can), checked before a run
    so that its results are not lost at the end."""
    if not path:
        return "an empty path"
    if path == "-":
        return "'-' is not standard output here: the tables go there; give a file name"
    p = Path(path)
    if p.is_dir():
        return "that is a directory"
    parent = p.parent
    if not parent.exists():
        return f"directory {str(parent)!r} does not exist"
    if not parent.is_dir():
        return f"{str(parent)!r} is not a directory"
    if p.exists() and not os.access(p, os.W_OK):
        return "the file is not writable"
    if not p.exists() and not os.access(parent, os.W_OK | os.X_OK):
        return f"directory {str(parent)!r} is not writable"
    # permissions are not the whole story (a read-only mount, /proc, a full quota): open it
    try:
        if p.exists():
            with open(p, "a"):  # appending nothing leaves the file as it is
                pass
        else:
            with open(p, "x"):
                pass
            p.unlink()
    except OSError as exc:
        return f"it cannot be opened for writing: {exc.strerror or exc}"
    return None


def check_outputs(parser: argparse.ArgumentParser, **paths: str | None) -> None:
    """``parser.error`` for the first option (``json=...``, ``plot=...``) whose path cannot be
    written."""
    for option, path in paths.items():
        why = None if path is None else output_problem(path)
        if why is not None:
            parser.error(
                f"--{option}: expected a writable file path in an existing directory, got "
                f"{path!r} ({why})"
            )
