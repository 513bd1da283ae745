"""``python -m gald.bench``: what the Local Distribution costs, measured on this machine.

By default GALD(CGNL) with and without its Local Distribution at (2, 512, 97, 97) (a 769 crop
at output stride 8): inference and train-step times (median, IQR, runs; the two models
interleaved), the LD overhead with an approximate 95 % interval, the bytes autograd keeps for backward, peak
memory (CUDA), FLOPs and parameters. --ga picks other GA modules, --ld adds the LD against the
authors' formulation and, on CUDA (or under TRITON_INTERPRET=1), the Triton kernels' checks and
bandwidth. --ablation runs the ablation benchmark with its own options.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .._validate import first_line
from ._args import (
    Stdout,
    attach_negative_values,
    check_outputs,
    given_options,
    interruptible,
    positive_seconds,
    write_json,
)
from ._config import DTYPES, Config
from ._timing import Progress, busy_note, environment, load_average


def _shape(text: str) -> tuple[int, int, int, int]:
    try:
        parts = [int(p) for p in text.replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) != 4 or min(parts) < 1:
        raise argparse.ArgumentTypeError(
            f"expected B,C,H,W (four positive integers, e.g. 2,512,97,97), got {text!r}"
        )
    return parts[0], parts[1], parts[2], parts[3]


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(
        prog="python -m gald.bench",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        # options are spelt out: "--abl" must not quietly run the timing benchmark
        allow_abbrev=False,
    )
    # a text default: argparse converts it with ``type`` and --help shows it as typed
    parser.add_argument("--shape", type=_shape, default="2,512,97,97", help="input size B,C,H,W")
    parser.add_argument(
        "--ga",
        default="cgnl",
        metavar="NAME[,NAME...]|all|none",
        help="GA modules to measure inside GALD (names from gald.list_ga()); none skips this "
        "table (with --ld: only the LD against the authors and the kernels)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if cuda else "cpu",
        help="where to run: cuda wherever a CUDA device is available, else cpu (the default shown is this machine's)",
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="float32",
        help="compute dtype; bfloat16 and float16 run under torch.autocast",
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="models and inputs in the channels_last memory format",
    )
    parser.add_argument(
        "--threads",
        type=_int_at_least(1),
        default=torch.get_num_threads(),
        help="CPU threads (torch.set_num_threads)",
    )
    parser.add_argument(
        "--min-time",
        type=positive_seconds,
        default=2.0,
        metavar="SECONDS",
        help="measured time per model and quantity, spread over the rounds",
    )
    parser.add_argument(
        "--rounds",
        type=_int_at_least(3),
        default=5,
        help="interleaved rounds, each measuring every candidate once (at least 3: the spread "
        "needs 3 runs)",
    )
    parser.add_argument(
        "--ld",
        action="store_true",
        help="also the LD against the authors' formulation (train step, inference, memory) and, "
        "on CUDA or under TRITON_INTERPRET=1, the Triton kernels' correctness and bandwidth",
    )
    parser.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="with --ld, also time torch.compile of the authors' formulation (auto: on CUDA)",
    )
    parser.add_argument(
        "--cost",
        action="store_true",
        help="instead of timing the GA layers of --ga inside GALD, list each alone: parameters, "
        "forward FLOPs at --shape and at the size GALD runs it at, bytes autograd keeps for backward "
        "(no timing: the same on any machine)",
    )
    parser.add_argument(
        "--first-call",
        action="store_true",
        help="also the first-call latency: the first and second forward (and checkpointed "
        "train step) of gald.GALD(64) on (1, 64, 33, 33), float32 NCHW, each in 3 fresh "
        "processes on --device with --threads (--shape, --dtype and --channels-last do not apply)",
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="write every measured number and the environment to a JSON file",
    )
    parser.add_argument(
        "--plot",
        metavar="PATH",
        help="write a PNG: time and memory per GA with and without LD (needs matplotlib)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress line, duration estimate or busy-machine note on stderr",
    )
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="run the LD ablation (training on a synthetic task) instead; it has options of its "
        "own: python -m gald.bench --ablation --help",
    )
    return parser


def _ablation(argv: list[str]) -> int:
    rest = [a for a in argv if a != "--ablation"]
    from . import ablation  # type: ignore[attr-defined]

    return int(ablation.main(rest))


def _gas(parser: argparse.ArgumentParser, text: str) -> list[str]:
    from ..registry import list_ga

    known = list_ga()
    if text.strip() == "all":
        return list(known)
    if text.strip() == "none":
        return []
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        parser.error("--ga: expected NAME[,NAME...], all or none, got an empty list")
    if {"all", "none"} & set(names):
        parser.error(f"--ga: all and none stand alone, not in a list; got {text!r}")
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(
            f"--ga: unknown GA {', '.join(map(repr, unknown))}; known: {', '.join(known)}; or "
            "all, or none"
        )
    return list(dict.fromkeys(names))  # each once, in the order given


def _too_small(
    gas: list[str], ld: bool, shape: tuple[int, int, int, int], *, cost: bool = False
) -> str | None:
    """Why the models asked for cannot run at ``shape`` (checked on the meta device, before
    anything runs), or ``None``. With ``cost`` each GA runs alone, not inside GALD."""
    import functools

    from ..registry import create_ga
    from . import block
    from . import ld as ld_bench
    from ._sizes import Factories, too_small

    channels = shape[1]
    parts: dict[str, Factories]
    if cost:
        parts = {
            f"--ga {ga} --cost": {ga: functools.partial(create_ga, ga, channels)} for ga in gas
        }
    else:
        parts = {f"--ga {ga}": block.candidates(ga, channels) for ga in gas}
    if ld:
        parts["--ld"] = ld_bench.candidates(channels)
    return too_small(parts, shape)


# the options each part of a run reads (--ga, --json, --plot and --quiet apply to any run)
_MEASURED = ("--shape", "--dtype", "--channels-last", "--threads", "--min-time", "--rounds")
_RUN_PARTS = (
    "the GA table and --ld time at --shape with --device, --dtype, --channels-last, --threads, "
    "--min-time and --rounds, and --ld adds --compile",
    "--cost counts at --shape only",
    "--first-call runs its fixed layer on --device with --threads",
)


def _unused_options(given: set[str], *, gas: bool, args: argparse.Namespace) -> list[str]:
    """The options written on the command line that no part of this run reads."""
    used: set[str] = set()
    if gas and not args.cost:
        used |= {*_MEASURED, "--device"}
    if args.ld:
        used |= {*_MEASURED, "--device", "--compile"}
    if args.cost:
        used.add("--shape")
    if args.first_call:
        used |= {"--device", "--threads"}
    return [o for o in (*_MEASURED, "--device", "--compile") if o in given and o not in used]


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation that failed (CPU or CUDA), not another error."""
    text = str(exc)
    return (
        isinstance(exc, (MemoryError, torch.OutOfMemoryError))
        or "can't allocate memory" in text
        or "out of memory" in text.lower()
    )


@interruptible("python -m gald.bench")
def main(argv: list[str] | None = None) -> int:
    argv = attach_negative_values(list(sys.argv[1:] if argv is None else argv))
    if "--ablation" in argv:
        return _ablation(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    gas = _gas(parser, args.ga)
    if args.cost and not gas:
        parser.error("--cost lists the GA layers of --ga: it needs --ga NAME[,NAME...] or all")
    if args.cost and (args.dtype != "float32" or args.channels_last):
        parser.error(
            "--cost counts float32 NCHW layers (FLOPs do not depend on the format; bytes follow "
            "the dtype): drop --dtype and --channels-last"
        )
    if not gas and not args.ld and not args.first_call:
        parser.error("--ga none measures nothing without --ld or --first-call")
    if args.cost and args.plot:
        parser.error("--plot draws the timing table, which --cost replaces")
    if args.compile == "on" and not args.ld:
        parser.error("--compile on times torch.compile of the authors' LD: it needs --ld")
    if not gas and args.plot:
        parser.error("--plot draws the GA table: it needs --ga NAME[,NAME...] or all, not none")
    unused = _unused_options(given_options(argv), gas=bool(gas), args=args)
    if unused:
        parser.error(
            f"{', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect on what this "
            "run measures ("
            + "; ".join(_RUN_PARTS)
            + "): drop "
            + ("it" if len(unused) == 1 else "them")
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            "--device cuda: no CUDA device is available here (torch "
            f"{torch.__version__}, torch.cuda.is_available() is False); use --device cpu"
        )
    check_outputs(parser, json=args.json, plot=args.plot)
    if args.json and args.plot and Path(args.json).resolve() == Path(args.plot).resolve():
        parser.error(f"--json and --plot name the same file {args.json!r}; give two paths")
    if args.plot and not args.plot.lower().endswith(".png"):
        parser.error(
            f"--plot: expected a path ending in .png (the figure is a PNG), got {args.plot!r}"
        )
    if args.plot:
        from ._plot import plot_available

        ok, why = plot_available()
        if not ok:
            parser.error(f"--plot: {why}")
    from ._sizes import input_problem

    unallocatable = input_problem(args.shape, DTYPES[args.dtype], torch.device(args.device))
    if unallocatable is not None:
        parser.error(f"--shape {','.join(map(str, args.shape))}: {unallocatable}")
    # --cost runs each GA alone, not inside GALD
    problem = _too_small(gas, args.ld, args.shape, cost=args.cost)
    if problem:
        parser.error(problem)

    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    progress = Progress(0.0, enabled=not args.quiet)

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    cfg = Config(
        shape=args.shape,
        device=device,
        dtype=DTYPES[args.dtype],
        channels_last=args.channels_last,
        threads=args.threads,
        min_time=args.min_time,
        rounds=args.rounds,
        compile=args.compile == "on" or (args.compile == "auto" and device.type == "cuda"),
        quiet=args.quiet,
        progress=progress,
        say=say,
    )
    env = environment(device, args.threads)
    # --cost alone times nothing: no note on competing processes, no threads in the footer
    timing = (bool(gas) and not args.cost) or args.ld or args.first_call
    note = (
        busy_note(args.threads, env["cpus_in_use_at_start"])
        if timing and device.type == "cpu"
        else None
    )
    if note and not args.quiet:
        say(note)
    out: dict[str, Any] = {
        "command": " ".join(["python -m gald.bench", *map(shlex.quote, argv)]),
        "environment": env,
        "config": {
            "shape": list(cfg.shape),
            "ga": gas,
            "device": args.device,
            "dtype": args.dtype,
            "channels_last": cfg.channels_last,
            "threads": cfg.threads,
            "min_time_s": cfg.min_time,
            "rounds": cfg.rounds,
            "compile": cfg.compile,
        },
    }
    emit = Stdout()
    cfg_text = cfg.describe()
    status = 0
    try:
        from . import block

        out["durations_s"] = {}
        if gas and not args.cost:
            started = time.perf_counter()
            res = block.run(cfg, gas)
            progress.close()
            out["block"] = res
            out["durations_s"]["block"] = round(time.perf_counter() - started, 1)
            emit(block.render(res, cfg_text))
        if args.ld:
            from . import ld

            started = time.perf_counter()
            res = ld.run_vs_authors(cfg)
            progress.close()
            out["ld"] = res
            out["durations_s"]["ld"] = round(time.perf_counter() - started, 1)
            if gas:
                emit()
            emit(ld.render_vs_authors(res, cfg_text))
            ok, why = ld.kernels_runnable(device)
            if ok:
                started = time.perf_counter()
                res = ld.run_kernels(cfg)
                progress.close()
                out["kernels"] = res
                out["durations_s"]["kernels"] = round(time.perf_counter() - started, 1)
                emit()
                emit(ld.render_kernels(res, cfg.describe(kernels=True)))
                if not all(ld.passed(c) for c in res["checks"]):
                    status = 1
            else:
                out["kernels"] = {"skipped": why}
                emit(f"\nTriton kernels not measured: {why}")
        if args.cost:
            from . import cost

            started = time.perf_counter()
            out["cost"] = cost.run(gas, args.shape)
            out["durations_s"]["cost"] = round(time.perf_counter() - started, 1)
            if args.ld:
                emit()
            emit(cost.render(out["cost"]))
        if args.first_call:
            from . import first_call

            started = time.perf_counter()
            if gas or args.ld:
                emit()
            try:
                out["first_call"] = first_call.run(args.device, args.threads)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:  # keep the other results
                out["first_call"] = {"error": str(exc)}
                emit(f"first call not measured: {exc}")
                status = 1
            else:
                emit(first_call.render(out["first_call"]))
            out["durations_s"]["first_call"] = round(time.perf_counter() - started, 1)
    except (RuntimeError, MemoryError) as exc:
        if not _out_of_memory(exc):
            raise
        progress.close()
        print(
            f"python -m gald.bench: error: the models do not fit in the memory of {device} at "
            f"--shape {cfg.shape}: {first_line(exc)}; try a smaller --shape",
            file=sys.stderr,
        )
        return 2
    finally:
        progress.close()
        torch.set_num_threads(threads_before)

    env["load_average_1min_end"] = load_average()
    if timing:
        emit(
            f"\n{env['date']}, {env['device_name']}, torch {env['torch']}, gald {env['gald']}, "
            f"{env['threads']} thread{'s' if env['threads'] != 1 else ''}"
        )
    else:  # counts that hold on any machine: when and with which torch they were made
        emit(f"\n{env['date']}, torch {env['torch']}, gald {env['gald']}")
    if args.json and not write_json(args.json, out):
        status = 1
    if args.plot:
        from ._plot import plot

        try:
            plot(out, args.plot)
            say(f"wrote {args.plot}")
        except OSError as exc:
            print(f"error: could not write --plot {args.plot!r}: {exc}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
