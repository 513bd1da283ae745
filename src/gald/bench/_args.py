"""The command-line plumbing shared by ``python -m gald.bench`` and its ablation: argument checks
(a bad value fails before anything runs, with a message that names the option, what it expects
and what it got) and the way results leave the process (the report on stdout, a ``--json`` file
written whole or not at all, Ctrl-C answered with one line)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO


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


_NEGATIVE_VALUE = re.compile(r"-(\d|\.\d|inf|nan)", re.IGNORECASE)


def attach_negative_values(argv: list[str]) -> list[str]:
    """``--offset -1e-3`` as ``--offset=-1e-3``: argparse reads a value that starts with a dash
    and is not a plain negative number (``-1e-3``, ``-inf``, ``-1,64,33,33``) as an unknown option
    and answers "expected one argument", hiding the message about the value itself."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        following = argv[i + 1] if i + 1 < len(argv) else ""
        if arg.startswith("--") and "=" not in arg and _NEGATIVE_VALUE.match(following):
            out.append(f"{arg}={following}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def given_options(argv: list[str]) -> set[str]:
    """The long options written on the command line (``--min-time 3`` and ``--min-time=3``)."""
    return {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}


def _write_in_place(path: str | Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


# a rename refused for the place, not for the data: the file is then written in place, as the
# check before the run found it could be (a read-only directory, a file bind-mounted alone)
_RENAME_REFUSED = (errno.EACCES, errno.EPERM, errno.EBUSY, errno.EXDEV, errno.EROFS)


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: into a temporary file beside it, then
    renamed over it (with the old file's permissions), so a failed write (a full disk) neither
    leaves a truncated file nor destroys the one that was there. Where no temporary file can be
    made beside it or renamed over it (a read-only directory holding a writable file, a file
    mounted alone into a container, a name too long for a prefix), and for a path that is not a
    regular file (``/dev/stdout``, a pipe), the file is written in place."""
    if os.path.exists(path) and not os.path.isfile(path):
        _write_in_place(path, text)
        return
    target = Path(os.path.realpath(path))  # through a symbolic link, not over it
    if target.exists():
        mode = target.stat().st_mode & 0o7777
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError:
        _write_in_place(target, text)
        return
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if exc.errno not in _RENAME_REFUSED:
            raise
        _write_in_place(target, text)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: str, results: Any) -> bool:
    """``results`` as strict JSON into the ``--json`` file (see :func:`write_text`), saying on
    stderr that it was written or why it could not be (the path was checked before the run;
    something may have changed since). Whether it was written."""
    try:
        write_text(path, strict_json(results))
    except OSError as exc:
        print(f"error: could not write --json {path!r}: {exc}", file=sys.stderr)
        return False
    print(f"wrote {path}", file=sys.stderr, flush=True)
    return True


class Stdout:
    """The report's lines on standard output; when the reader goes away (``| head``), the rest
    goes to ``os.devnull`` and the run goes on, so that its ``--json`` and ``--plot`` are still
    written."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = sys.stdout if stream is None else stream

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        try:
            print(*args, file=self.stream, flush=True, **kwargs)
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)


def interruptible(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """A ``main`` that answers Ctrl-C with one line on stderr and exit status 130 (its own
    ``finally`` clauses run first), not a traceback."""

    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args: Any, **kwargs: Any) -> int:
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt:
                print(f"\n{prog}: interrupted", file=sys.stderr, flush=True)
                return 130

        return run

    return decorate


def strict_json(obj: Any) -> str:
    """``obj`` as strict JSON (indented): every non-finite float (an undefined spread, a
    diverged loss) becomes ``null``, as JSON has no NaN or infinity."""

    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    return json.dumps(finite(obj), indent=2, allow_nan=False)
