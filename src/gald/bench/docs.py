"""Rewrite the generated benchmark tables in the docs from one ``--json`` run.

Usage::

    python -m gald.bench --ga all --ld --json results.json
    python -m gald.bench.docs results.json [FILE ...]   # default: README.md docs/benchmarks.md

Only the text between a start marker and the next ``<!-- bench:end -->`` is replaced; the rest
of each file is left as it is. A start marker names what goes there:

- ``<!-- bench:start -->`` or ``<!-- bench:start summary -->``: a short summary (the LD overhead
  inside GALD(cgnl), or the first GA measured, and where it was measured);
- ``<!-- bench:start block -->``: the table of every GA with and without LD;
- ``<!-- bench:start ld -->``: the LD against the authors' formulation (needs ``--ld``);
- ``<!-- bench:start kernels -->``: the Triton kernels' checks and bandwidth (needs ``--ld`` on
  CUDA);
- ``<!-- bench:start environment -->``: the machine and software.

Every block states the date, the device and the command, so the docs cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._timing import format_overhead, format_pct, format_speed, ratio_from

MARKER = re.compile(
    r"(<!-- bench:start(?: (?P<kind>[a-z]+))? -->\n)(?P<body>.*?)(<!-- bench:end -->)", re.S
)


def _overhead(d: dict[str, Any]) -> str:
    return format_overhead(ratio_from(d), emphasis=True)


def _speed(d: dict[str, Any]) -> str:
    if ratio_from(d).verdict in ("within noise", "too noisy"):
        return format_speed(ratio_from(d))
    r, low, high = d["ratio"], d["ratio_low"], d["ratio_high"]
    if r < 1 and low is not None:  # the interval in the unit of the figure: times slower
        low, high = 1 / high, 1 / low
    half = "" if low is None else f" (95 %: {low:.2f}–{high:.2f})"
    return (f"**{r:.2f}x faster**" if r >= 1 else f"{1 / r:.2f}x slower") + half


def _table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def where(res: dict[str, Any]) -> str:
    env, cfg = res["environment"], res["config"]
    fmt = "channels_last" if cfg["channels_last"] else "NCHW"
    device = env["device_name"]
    if cfg["device"] == "cpu":
        device = f'CPU "{device}" ({env["logical_cpus"]} logical CPUs)'
    load = ""
    if cfg["device"] == "cpu":
        parts = []
        if env.get("cpus_in_use_at_start") is not None:
            parts.append(
                f"CPUs in use by other processes at the start: {env['cpus_in_use_at_start']}"
            )
        if env.get("load_average_1min") is not None:
            avg = f"1-minute load average {env['load_average_1min']} at the start"
            if env.get("load_average_1min_end") is not None:
                avg += f", {env['load_average_1min_end']} at the end"
            parts.append(avg)
        load = f" {'; '.join(parts)}." if parts else ""
    return (
        f"Measured {env['date']} on {device}, torch {env['torch']}, Python {env['python']}, "
        f"{env['threads']} thread{'s' if env['threads'] != 1 else ''}, {cfg['dtype']}, {fmt}; "
        "command: "
        f"`{res.get('command', 'python -m gald.bench')}`.{load}"
    )


def render_summary(res: dict[str, Any]) -> str:
    rows = res["block"]["rows"]
    row = next((r for r in rows if r["ga"] == "cgnl"), rows[0])  # the authors' GA first
    ov = row["overhead"]
    shape = tuple(res["config"]["shape"])
    return (
        f"LD overhead inside GALD({row['ga']}) at {shape}: inference "
        f"{_overhead(ov['inference'])}, train step {_overhead(ov['train_step'])}, bytes saved "
        f"for backward {format_pct(ov['saved_bytes_ratio'])} (~95 % intervals). {where(res)} "
        "Details: [docs/benchmarks.md](docs/benchmarks.md)."
    )


def render_block(res: dict[str, Any]) -> str:
    from .block import table

    headers, body = table(res["block"], overhead_cell=_overhead)
    shape = tuple(res["config"]["shape"])
    return (
        f"Input {shape}; times are medians [interquartile range, runs]; overheads with ~95 % "
        f"intervals. {where(res)}\n\n{_table(headers, body)}"
    )


def render_ld(res: dict[str, Any]) -> str:
    if "ld" not in res:
        return "_(this run was made without `--ld`)_"
    from .ld import table_vs_authors, worst_check

    ld = res["ld"]
    headers, body = table_vs_authors(ld, speed_cell=_speed)
    return (
        f"Input {tuple(ld['shape'])} (x itself: {ld['x_bytes'] / 2**20:.1f} MiB). {where(res)}"
        f"\n\n{_table(headers, body)}\n\nLargest relative L2 difference to the authors' outputs "
        f"and input gradients: {worst_check(ld):.1e}."
    )


def render_kernels(res: dict[str, Any]) -> str:
    k = res.get("kernels")
    if not k:
        return "_(this run was made without `--ld`)_"
    if "skipped" in k:
        return f"_Not measured in this run: {k['skipped']}._"
    from .ld import kernel_table, passed

    checks = k["checks"]
    headers, body = kernel_table(k, speed_cell=_speed)
    return (
        f"Input {tuple(k['shape'])}, logits {tuple(k['logits'])}. Correctness against float64 "
        f"plain ops: {sum(map(passed, checks))}/{len(checks)} checks passed. {where(res)}\n\n"
        f"{_table(headers, body)}"
    )


def render_environment(res: dict[str, Any]) -> str:
    env = res["environment"]
    return "\n".join(f"- {k}: {v}" for k, v in env.items())


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "summary": render_summary,
    "block": render_block,
    "ld": render_ld,
    "kernels": render_kernels,
    "environment": render_environment,
}


def rewrite(text: str, res: dict[str, Any]) -> tuple[str, int]:
    """``text`` with every marked block regenerated from ``res``; and how many were."""
    count = 0

    def sub(m: re.Match[str]) -> str:
        nonlocal count
        kind = m.group("kind") or "summary"
        if kind not in RENDERERS:
            raise ValueError(
                f"unknown bench marker kind {kind!r}; expected one of {sorted(RENDERERS)}"
            )
        count += 1
        return f"{m.group(1)}{RENDERERS[kind](res).rstrip()}\n{m.group(4)}"

    return MARKER.sub(sub, text), count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gald.bench.docs",
        description="Rewrite the marked benchmark blocks of the docs from one --json run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("results", help="the JSON written by python -m gald.bench --json")
    parser.add_argument(
        "files", nargs="*", default=["README.md", "docs/benchmarks.md"], help="files to rewrite"
    )
    args = parser.parse_args(argv)
    try:
        res = json.loads(Path(args.results).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        parser.error(f"cannot read {args.results}: {exc}")
    if "block" not in res or "environment" not in res:
        parser.error(f"{args.results} is not a python -m gald.bench --json result")
    for name in args.files:
        path = Path(name)
        text, n = rewrite(path.read_text(), res)
        path.write_text(text)
        print(f"{name}: {n} block{'s' if n != 1 else ''} rewritten", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
