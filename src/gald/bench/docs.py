"""Rewrite the generated benchmark blocks of the docs from the ``--json`` runs they name.

Usage::

    python -m gald.bench --ga all --ld --json docs/data/all.json --plot docs/benchmarks.png
    python -m gald.bench.docs                # rewrites README.md and docs/{benchmarks,
                                             # performance,ld,ga}.md from the files their
                                             # markers name
    python -m gald.bench.docs --check        # exit status 1 if a block is out of date

Only the text between a start marker and the next ``<!-- bench:end -->`` is replaced; the rest
of each file is left as it is. A start marker names what goes there and the JSON file(s) it is
made from, relative to the Markdown file (``<!-- bench:start block data/all.json -->``); a
marker without a file takes the one given with ``--results``. Kinds:

- ``summary``: a short summary (the LD overhead inside GALD(cgnl), or the first GA measured,
  and where it was measured);
- ``block``: the table of every GA with and without LD;
- ``ld``: the LD against the authors' formulation (needs ``--ld``);
- ``kernels``: the Triton kernels' checks and bandwidth (needs ``--ld`` on CUDA);
- ``environment``: the machine and software;
- ``first``: the first-call latency (needs ``--first-call``);
- ``ablation``: the paired-seed ablation (``python -m gald.bench --ablation --json``);
- ``cost``: each GA alone, machine-independent (``--cost``);
- ``runs`` (several files): one line per ``--ld`` run, the LD against the authors;
- ``spread`` (several files): repeated runs of the same commands side by side, with whether
  their intervals overlap and how far apart their medians are.

Every block states the date, the device and the command, so the docs cannot drift apart; the
JSON files are kept beside the docs, so ``--check`` (run by the test suite) finds a block that
no longer matches its data.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._timing import (
    KERNEL_NOTE,
    OVERHEAD_NOTE,
    SPEEDUP_NOTE,
    format_overhead,
    format_pct,
    format_speed,
    paired_note,
    ratio_from,
)

MARKER = re.compile(
    r"(<!-- bench:start(?: (?P<kind>[a-z]+))?(?P<paths>(?: [^\s>]+\.json)*) -->\n)"
    r"(?P<body>.*?)(<!-- bench:end -->)",
    re.S,
)
DEFAULT_FILES = (
    "README.md",
    "docs/benchmarks.md",
    "docs/performance.md",
    "docs/ld.md",
    "docs/ga.md",
)


def _overhead(d: dict[str, Any]) -> str:
    return format_overhead(ratio_from(d), emphasis=True)


def _speed(d: dict[str, Any]) -> str:
    return format_speed(ratio_from(d), emphasis=True)


def _note(text: str) -> str:
    """A footnote of the terminal (``what: ...``) as a Markdown sentence: ``*what*: ....``"""
    what, _, rest = text.partition(": ")
    return f"*{what}*: {rest}."


def _table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def where(res: dict[str, Any]) -> str:
    env, cfg = res["environment"], res["config"]
    fmt = "channels_last" if cfg["channels_last"] else "NCHW"
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
        f"Measured {env['date']} on {_device(res)}, torch {env['torch']}, Python {env['python']}, "
        f"{env['threads']} thread{'s' if env['threads'] != 1 else ''}, {cfg['dtype']}, {fmt}; "
        "command: "
        f"`{res.get('command', 'python -m gald.bench')}`.{load}"
    )


def _needs(res: dict[str, Any], key: str, what: str) -> None:
    """A ``ValueError`` when ``res`` is not the kind of run a block is made from."""
    if key not in res:
        raise ValueError(f"this block needs {what}; `{_command(res)}` has none")


def _bench_run(res: dict[str, Any]) -> None:
    """A ``ValueError`` for an ablation result where a ``python -m gald.bench`` run belongs."""
    if "paired" in res:
        raise ValueError(
            f"this block is made from a python -m gald.bench run, not `{_command(res)}`"
        )


def render_summary(res: dict[str, Any]) -> str:
    _needs(res, "block", "the GA table (a run with --ga NAME or all, without --cost)")
    rows = res["block"]["rows"]
    row = next((r for r in rows if r["ga"] == "cgnl"), rows[0])  # the authors' GA first
    ov = row["overhead"]
    shape = tuple(res["config"]["shape"])
    return (
        f"LD overhead inside GALD({row['ga']}) at {shape}: inference "
        f"{_overhead(ov['inference'])}, train step {_overhead(ov['train_step'])} (~95 % "
        f"intervals); memory autograd keeps for backward {format_pct(ov['saved_bytes_ratio'])}. "
        f"{where(res)} "
        "The same command's second run (another process, other figures) and every GA in one "
        "`--ga all` run: [docs/benchmarks.md](docs/benchmarks.md)."
    )


def render_block(res: dict[str, Any]) -> str:
    _needs(res, "block", "the GA table (a run with --ga NAME or all, without --cost)")
    from .block import table

    headers, body = table(res["block"], overhead_cell=_overhead)
    shape = tuple(res["config"]["shape"])
    return (
        f"Input {shape}; times are medians [interquartile range, runs]; overheads with ~95 % "
        f"intervals. {where(res)}\n\n{_table(headers, body)}\n\n{_note(OVERHEAD_NOTE)}"
    )


_NO_LD = "_(this run was made without `--ld`)_"


def _ld_part(res: dict[str, Any]) -> dict[str, Any] | None:
    """The ``--ld`` part of a benchmark run (``None`` for a run without ``--ld``)."""
    _bench_run(res)
    return res.get("ld")


def _round_medians(values: list[float]) -> str:
    return ", ".join(f"{v:.0f}" for v in values)


def render_ld(res: dict[str, Any]) -> str:
    ld = _ld_part(res)
    if ld is None:
        return _NO_LD
    from .ld import table_vs_authors, worst_check

    headers, body = table_vs_authors(ld, speed_cell=_speed)
    return (
        f"Input {tuple(ld['shape'])} (x itself: {ld['x_bytes'] / 2**20:.1f} MiB). {where(res)}"
        f"\n\n{_table(headers, body)}\n\n{_note(SPEEDUP_NOTE)} Largest relative L2 difference to "
        "the authors' outputs "
        f"and input gradients: {worst_check(ld):.1e}."
        + "".join(f" {note}." for note in ld.get("notes", ()))
    )


def render_kernels(res: dict[str, Any]) -> str:
    _bench_run(res)
    k = res.get("kernels")
    if not k:
        return _NO_LD
    if "skipped" in k:
        return f"_Not measured in this run: {k['skipped']}._"
    from .ld import kernel_table, passed

    checks = k["checks"]
    headers, body = kernel_table(k, speed_cell=_speed)
    return (
        f"Input {tuple(k['shape'])}, logits {tuple(k['logits'])}. Correctness against float64 "
        f"plain ops: {sum(map(passed, checks))}/{len(checks)} checks passed. {where(res)}\n\n"
        f"{_table(headers, body)}\n\n{_note(KERNEL_NOTE)}"
    )


def render_environment(res: dict[str, Any]) -> str:
    env = res["environment"]
    return "\n".join(f"- {k}: {v}" for k, v in env.items())


def _command(res: dict[str, Any]) -> str:
    """The run's command without its output options (``--json``, ``--plot``, ``--quiet``)."""
    words = shlex.split(res.get("command", "python -m gald.bench"))
    kept: list[str] = []
    skip = False
    for w in words:
        if skip:
            skip = False
            continue
        if w in ("--json", "--plot"):
            skip = True
            continue
        if w == "--quiet" or w.startswith(("--json=", "--plot=")):
            continue
        kept.append(w)
    return shlex.join(kept)


def _machine(results: list[dict[str, Any]]) -> str:
    """Where and when several runs were made (one sentence)."""
    dates = sorted(r["environment"]["date"] for r in results)
    when = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
    machines = sorted({_device(r) for r in results})
    torches = sorted({r["environment"]["torch"] for r in results})
    return (
        f"Measured {when} on {' and '.join(machines)}, torch {', '.join(torches)}, one process "
        "per run, one after the other."
    )


def _device(res: dict[str, Any]) -> str:
    """The machine of a run (a benchmark or an ablation: both record their environment)."""
    env = res["environment"]
    if env["device"] == "cpu":
        return f'CPU "{env["device_name"]}" ({env["logical_cpus"]} logical CPUs)'
    return str(env["device_name"])


def _ms(t: dict[str, Any]) -> str:
    return f"{t['median_ms']:.3g}"


def render_runs(results: list[dict[str, Any]]) -> str:
    """One line per ``--ld`` run: the library's LD against the authors' formulation."""
    rows = []
    for res in results:
        _needs(res, "ld", "--ld results")
        ld, cfg = res["ld"], res["config"]
        train, inf, mem = ld["train_step"], ld["inference"], ld["memory"]
        base = mem["authors"]["saved_bytes"]
        ckpt = "gald, grad checkpointing"
        fmt = "channels_last" if cfg["channels_last"] else "NCHW"
        rows.append(
            [
                f"`{_command(res)}`",
                f"{cfg['dtype']}, {fmt}, {cfg['threads']} thread{'s' if cfg['threads'] != 1 else ''}",
                f"{_speed(train['gald']['speedup_vs_authors'])} "
                f"({_ms(train['gald'])} vs {_ms(train['authors'])} ms)",
                _speed(train[ckpt]["speedup_vs_authors"]),
                f"{_speed(inf['gald']['speedup_vs_authors'])} "
                f"({_ms(inf['gald'])} vs {_ms(inf['authors'])} ms)",
                f"{mem['gald']['saved_bytes'] / base:.2f}x",
                f"{mem[ckpt]['saved_bytes'] / base:.2f}x",
                res["environment"]["date"],
            ]
        )
    headers = [
        "command",
        "setting",
        "train step",
        "train, checkpointing",
        "inference (BN folded)",
        "kept for backward",
        "kept, checkpointing",
        "measured",
    ]
    shapes = sorted({tuple(r["ld"]["shape"]) for r in results})
    return (
        f"Input {', '.join(map(str, shapes))}. "
        f"{_machine(results)} Speed: times faster than the authors' formulation, the median over "
        "the rounds of the per-round ratio (95 % interval), then the two medians, whose ratio can "
        "differ from it when the machine's speed drifts during a run; kept for backward: the bytes "
        "autograd keeps between forward and backward, relative to the authors'.\n\n"
        + _table(headers, rows)
        + "\n\n"
        + _runs_range(results)
    )


def _runs_range(results: list[dict[str, Any]]) -> str:
    """The range of each figure over the runs, so that a reader sees the worst run too."""
    ckpt = "gald, grad checkpointing"

    def span(values: list[float], unit: str, verdicts: list[str] | None = None) -> str:
        low, high = min(values), max(values)
        text = (
            f"{low:.2f}{unit}" if f"{low:.2f}" == f"{high:.2f}" else f"{low:.2f}–{high:.2f}{unit}"
        )
        unsure = [v for v in verdicts or [] if v != "measured"]
        if unsure:  # a figure the run's own table would not quote
            text += f" ({len(unsure)} of {len(values)} runs {' / '.join(sorted(set(unsure)))})"
        return text

    def speeds(kind: str, who: str) -> list[float]:
        return [r["ld"][kind][who]["speedup_vs_authors"]["ratio"] for r in results]

    def verdicts(kind: str, who: str) -> list[str]:
        return [r["ld"][kind][who]["speedup_vs_authors"]["verdict"] for r in results]

    def saved(who: str) -> list[float]:
        return [
            r["ld"]["memory"][who]["saved_bytes"] / r["ld"]["memory"]["authors"]["saved_bytes"]
            for r in results
        ]

    return (
        f"Over these {len(results)} runs, against the authors' formulation (median ratios; "
        "above 1 is faster): train step "
        f"{span(speeds('train_step', 'gald'), 'x', verdicts('train_step', 'gald'))}, with "
        f"checkpointing {span(speeds('train_step', ckpt), 'x', verdicts('train_step', ckpt))}; "
        f"inference {span(speeds('inference', 'gald'), 'x', verdicts('inference', 'gald'))}; "
        "memory kept for backward "
        f"{span(saved('gald'), 'x')}, with checkpointing {span(saved(ckpt), 'x')}."
    )


def _busy(res: dict[str, Any]) -> str:
    used = res["environment"].get("cpus_in_use_at_start")
    return "-" if used is None else f"{used:g}"


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return bool(a["ratio_low"] <= b["ratio_high"] and b["ratio_low"] <= a["ratio_high"])


def render_spread(results: list[dict[str, Any]]) -> str:
    """Repeated runs of the same commands: overheads, medians, overlap and distance."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for res in results:
        _needs(res, "block", "GA-table results")
        groups.setdefault(_command(res), []).append(res)
    rows, notes = [], []
    for command, runs in groups.items():
        firsts = []
        for i, res in enumerate(runs, 1):
            row = res["block"]["rows"][0]
            models, ov = row["models"], row["overhead"]
            firsts.append(row)
            rows.append(
                [
                    f"`{command}`" if i == 1 else "",
                    str(i),
                    _overhead(ov["inference"]),
                    _overhead(ov["train_step"]),
                    f"{_ms(models['with LD']['inference'])} / "
                    f"{_ms(models['without LD']['inference'])}",
                    f"{_ms(models['with LD']['train_step'])} / "
                    f"{_ms(models['without LD']['train_step'])}",
                    _busy(res),
                    res["environment"]["date"],
                ]
            )
        if len(runs) < 2:
            continue
        overlaps = {
            label: all(_overlap(a["overhead"][k], b["overhead"][k]) for a in firsts for b in firsts)
            for label, k in (("inference", "inference"), ("train-step", "train_step"))
        }
        if all(overlaps.values()):
            said = "overlap (inference and train step)"
        elif not any(overlaps.values()):
            said = "do not all overlap (inference nor train step)"
        else:
            yes = next(k for k, v in overlaps.items() if v)
            no = next(k for k, v in overlaps.items() if not v)
            said = f"overlap for the {yes} overhead, not for the {no} overhead"
        medians = [
            [r["models"][m][k]["median_ms"] for r in firsts]
            for m in ("with LD", "without LD")
            for k in ("inference", "train_step")
        ]
        apart = max(max(v) / min(v) - 1 for v in medians)
        notes.append(
            f"`{command}` ({firsts[0]['ga']}): the overhead intervals of the {len(runs)} runs "
            f"{said}; the runs' medians (times with and without LD) are within {apart:.0%} of "
            "each other."
        )
    headers = [
        "command",
        "run",
        "inference overhead",
        "train-step overhead",
        "inference ms (with / without LD)",
        "train step ms (with / without LD)",
        "CPUs busy at start",
        "measured",
    ]
    return (
        f"{_machine(results)} "
        f"{_note(paired_note('LD overhead', 'time with LD / without LD', 'in the same row'))} "
        '"CPUs busy": the CPUs other processes used just before the run (a busy machine makes '
        "runs disagree).\n\n"
        f"{_table(headers, rows)}\n\n" + "\n".join(f"- {n}" for n in notes)
    )


def render_first_call(res: dict[str, Any]) -> str:
    _bench_run(res)
    if "first_call" not in res:
        return "_(this run was made without `--first-call`)_"
    if "error" in res["first_call"]:
        return f"_Not measured: {res['first_call']['error']}_"
    from .first_call import render

    env = res["environment"]
    cases = render(res["first_call"]).splitlines()
    threads = res["first_call"]["threads"]
    return "\n".join(f"- {c}" for c in cases) + (
        f"\n\nMeasured {env['date']} on {_device(res)}, torch {env['torch']}, Python "
        f"{env['python']}, {threads} thread{'s' if threads != 1 else ''}, float32, NCHW; command: "
        f"`{res.get('command', 'python -m gald.bench')}`."
    )


def _undefined(value: float | None) -> bool:
    """A spread the run could not compute: ``null`` in its JSON (NaN in older files)."""
    return value is None or math.isnan(value)


def render_ablation(res: dict[str, Any]) -> str:
    """The paired-seed ablation (``python -m gald.bench --ablation --json``) as Markdown."""
    _needs(res, "paired", "--ablation results")
    from ..stats import gate_range_text
    from .ablation import METRICS, ROWS, _mean_std

    runs, cfg, env = res["runs"], res["config"], res["environment"]
    seeds = len(runs)

    def pm(values: list[float]) -> str:
        mean, std = _mean_std(values)
        return f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} ± {std:.1f}"

    headers = ["variant", "large regions", "small objects", "boundary band", "mIoU"]
    rows = [
        [label, *(pm([r[name][m] for r in runs.values()]) for m in METRICS)]
        for name, label in ROWS.items()
        if all(name in r for r in runs.values())
    ]
    paired_rows, beyond = [], []
    for key, per_metric in res["paired"].items():
        cells = [key.replace("-", " − ")]
        for m in METRICS:
            d = per_metric[m]
            std = "" if _undefined(d["std"]) else f" ± {d['std']:.1f}"
            cells.append(f"{d['mean']:+.1f}{std} ({d['wins']}/{d['n']})".replace("-", "−"))
            if not _undefined(d["ci95"]) and abs(d["mean"]) > d["ci95"]:
                beyond.append(f"{key.replace('-', ' − ')} on {'mIoU' if m == 'miou' else m}")
        paired_rows.append(cells)
    verdict = (
        "Paired 95 % intervals that exclude 0: " + ", ".join(beyond) + "."
        if beyond
        else "No paired 95 % interval excludes 0."
    )
    if seeds < 3:
        verdict = "Too few seeds for a paired interval."
    gate = ""
    if res["gate"]:
        g = res["gate"]

        def avg(key: str) -> float:
            return sum(x[key] for x in g) / len(g)

        rng = gate_range_text(g[0]["low"], g[0]["high"], g[0].get("low_included", cfg["final_act"]))
        gate = (
            f" The trained gate `offset + M` on the held-out set (range {rng}, mean over "
            f"seeds): mean {avg('mean'):.2f}, spatial CV "
            f"{avg('spatial_cv'):.1%}, {avg('channel_cv'):.2%} across channels, "
            f"{avg('sample_cv'):.1%} across samples, {avg('far_fraction'):.1%} of positions more "
            "than 5 % from their map's mean."
        )
    where_ = (
        f"Measured {env['date']} on {_device(res)}, torch {env['torch']}, {res['threads']} thread"
        f"{'s' if res['threads'] != 1 else ''}; GA {cfg['ga']}, offset {cfg['offset']:g}, "
        f"final_act={cfg['final_act']}, {cfg['steps']} steps, {seeds} seed{'s' if seeds != 1 else ''}; "
        f"{res['seconds'] / 60:.1f} min wall, {res['cpu_seconds'] / 60:.1f} min of CPU; "
        f"command: `{_command(res)}`."
    )
    return (
        f"{where_} IoU in %, mean ± std over the seeds:\n\n{_table(headers, rows)}\n\n"
        "Paired differences (IoU points, mean ± std over the same seeds; seeds where the first "
        f"is better):\n\n{_table(['comparison', 'large', 'small', 'boundary', 'mIoU'], paired_rows)}"
        f"\n\n{verdict}{gate}"
    )


def render_cost(res: dict[str, Any]) -> str:
    """Each GA alone (``python -m gald.bench --ga all --cost --json``): machine-independent."""
    _needs(res, "cost", "--cost results")
    from .cost import table

    env = res["environment"]
    headers, rows = table(res["cost"])
    return (
        f"Computed {env['date']} with torch {env['torch']}; command: `{_command(res)}`.\n\n"
        + _table(headers, rows)
    )


def render_added(res: dict[str, Any]) -> str:
    """What the LD adds to each GA in absolute time, and where its share is smallest and
    largest: the prose beside the GA table, from the same run."""
    _needs(res, "block", "the GA table (a run with --ga NAME or all, without --cost)")
    rows = res["block"]["rows"]

    def added(kind: str) -> list[float]:
        return [
            r["models"]["with LD"][kind]["median_ms"] - r["models"]["without LD"][kind]["median_ms"]
            for r in rows
        ]

    def span(values: list[float]) -> str:
        low, high = f"{min(values):.0f}", f"{max(values):.0f}"
        return f"{low} ms" if low == high else f"{low} to {high} ms"

    inference, train = added("inference"), added("train_step")
    by_share = sorted(rows, key=lambda r: r["overhead"]["inference"]["ratio"])
    k = min(3, len(rows) // 2) or 1

    def listed(part: list[dict[str, Any]]) -> str:
        items = [
            f"{r['ga']} ({format_overhead(ratio_from(r['overhead']['inference']))})" for r in part
        ]
        return ", ".join(items[:-1]) + f" and {items[-1]}" if len(items) > 1 else items[0]

    low, high = by_share[:k], by_share[-k:]

    def end(r: dict[str, Any], which: str) -> float:
        value = r["overhead"]["inference"][which]
        return math.nan if value is None else float(value)

    ends_known = not any(math.isnan(end(r, "ratio_low")) for r in low + high)
    apart = ends_known and max(end(r, "ratio_high") for r in low) < min(
        end(r, "ratio_low") for r in high
    )
    return (
        f"In the run below the LD adds {span(inference)} to an inference and {span(train)} to a "
        "train step, whichever of the "
        f"{len(rows)} GA layers it follows (the median with the LD minus the median without). "
        f"By the figures, its inference overhead is smallest next to {listed(low)} and largest "
        f"next to {listed(high)}"
        + (
            "; the two groups' intervals do not overlap."
            if apart
            else "; the intervals of the two groups overlap, so the order between them is not "
            "established by this run."
        )
    )


def render_rounds(res: dict[str, Any]) -> str:
    """The row of the GA table whose inference overhead (a median of per-round ratios) differs
    most from the ratio of its pooled medians, told round by round."""
    _needs(res, "block", "the GA table (a run with --ga NAME or all, without --cost)")

    def pooled(r: dict[str, Any]) -> float:
        m = r["models"]
        return float(
            m["with LD"]["inference"]["median_ms"] / m["without LD"]["inference"]["median_ms"]
        )

    row = max(
        res["block"]["rows"],
        key=lambda r: abs(math.log(r["overhead"]["inference"]["ratio"] / pooled(r))),
    )
    with_ld, without = (
        row["models"]["with LD"]["inference"],
        row["models"]["without LD"]["inference"],
    )
    ratios = [
        a / b for a, b in zip(with_ld["round_medians_ms"], without["round_medians_ms"], strict=True)
    ]

    return (
        f"In the GA table below, {row['ga']}'s inference overhead is "
        f"{format_pct(row['overhead']['inference']['ratio'])} next to "
        f"{with_ld['median_ms']:.1f} and {without['median_ms']:.1f} ms (a ratio of "
        f"{pooled(row):.2f}): its rounds ran at different speeds (round medians "
        f"{_round_medians(with_ld['round_medians_ms'])} ms with the LD and "
        f"{_round_medians(without['round_medians_ms'])} "
        f"ms without), and the per-round ratios were {min(ratios):.2f} to {max(ratios):.2f}, "
        f"median {row['overhead']['inference']['ratio']:.2f}."
    )


def render_unstable(res: dict[str, Any]) -> str:
    """How stable the authors' side of the LD comparison was in one run."""
    ld = _ld_part(res)
    if ld is None:
        return _NO_LD
    train, inference = ld["train_step"]["authors"], ld["inference"]["authors"]
    return (
        f"In this run the authors' train step has an interquartile range of "
        f"{train['iqr_ms']:.0f} ms around a {train['median_ms']:.0f} ms median (round medians "
        f"{_round_medians(train['round_medians_ms'])} ms) and their inference "
        f"{inference['iqr_ms']:.0f} ms around {inference['median_ms']:.0f} ms; the comparison "
        f"reads {_speed(ld['train_step']['gald']['speedup_vs_authors'])} for the train step and "
        f"{_speed(ld['inference']['gald']['speedup_vs_authors'])} for inference."
    )


def _one(render: Callable[[dict[str, Any]], str]) -> Callable[[list[dict[str, Any]]], str]:
    def wrapped(results: list[dict[str, Any]]) -> str:
        if len(results) != 1:
            raise ValueError(f"this block is made from one JSON file, got {len(results)}")
        return render(results[0])

    return wrapped


RENDERERS: dict[str, Callable[[list[dict[str, Any]]], str]] = {
    "summary": _one(render_summary),
    "block": _one(render_block),
    "ld": _one(render_ld),
    "kernels": _one(render_kernels),
    "environment": _one(render_environment),
    "first": _one(render_first_call),
    "ablation": _one(render_ablation),
    "cost": _one(render_cost),
    "added": _one(render_added),
    "rounds": _one(render_rounds),
    "unstable": _one(render_unstable),
    "runs": render_runs,
    "spread": render_spread,
}


def load(path: Path) -> dict[str, Any]:
    """A ``python -m gald.bench --json`` result; ``ValueError`` naming the file otherwise."""
    try:
        res = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not isinstance(res, dict) or "environment" not in res or "config" not in res:
        raise ValueError(f"{path} is not a python -m gald.bench --json result")
    return res


def rewrite(
    text: str, res: dict[str, Any] | None = None, *, base: Path | None = None
) -> tuple[str, int]:
    """``text`` with every marked block regenerated; and how many were.

    A marker's JSON files are read relative to ``base`` (the Markdown file's folder); a marker
    that names none takes ``res``.
    """
    _check_markers(text)
    count = 0

    def sub(m: re.Match[str]) -> str:
        nonlocal count
        kind = m.group("kind") or "summary"
        if kind not in RENDERERS:
            raise ValueError(
                f"unknown bench marker kind {kind!r}; expected one of {sorted(RENDERERS)}"
            )
        paths = m.group("paths").split()
        if len(set(paths)) != len(paths):
            raise ValueError(f"the {kind} marker lists a file twice: {' '.join(paths)}")
        if paths:
            results = [load((base or Path(".")) / p) for p in paths]
        elif res is not None:
            results = [res]
        else:
            raise ValueError(f"the {kind} marker names no JSON file and no --results was given")
        try:
            body = RENDERERS[kind](results).rstrip()
        except ValueError as exc:
            raise ValueError(
                f"the {kind} block from {' '.join(paths) or '--results'}: {exc}"
            ) from exc
        count += 1
        return f"{m.group(1)}{body}\n{m.group(5)}"

    return MARKER.sub(sub, text), count


def _check_markers(text: str) -> None:
    """Every line that mentions ``bench:start`` or ``bench:end`` is a well-formed marker, and
    starts and ends alternate: a typo or a lost end would otherwise skip a block silently, or
    swallow the text up to the next block's end."""
    start = re.compile(r"<!-- bench:start(?: [a-z]+)?(?: [^\s>]+\.json)* -->")
    open_line = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not (line.startswith("<!--") and "bench:" in line):
            continue  # prose that quotes a marker (in backticks) is not one
        if "bench:start" in line:
            if not start.fullmatch(line):
                raise ValueError(f"line {number}: malformed marker {line!r}")
            if open_line is not None:
                raise ValueError(
                    f"line {number}: a bench:start before the bench:end of line {open_line}'s"
                )
            open_line = number
        elif "bench:end" in line:
            if line != "<!-- bench:end -->":
                raise ValueError(f"line {number}: malformed marker {line!r}")
            if open_line is None:
                raise ValueError(f"line {number}: a bench:end without a bench:start")
            open_line = None
    if open_line is not None:
        raise ValueError(f"line {open_line}: a bench:start without a bench:end")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gald.bench.docs",
        description="Rewrite the marked benchmark blocks of the docs from the --json runs "
        "their markers name.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "files", nargs="*", default=list(DEFAULT_FILES), help="Markdown files to rewrite"
    )
    parser.add_argument("--results", metavar="PATH", help="the JSON for markers that name no file")
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit with status 1 if a block differs from its data",
    )
    args = parser.parse_args(argv)
    if missing := [f for f in args.files if not Path(f).is_file()]:
        hint = (
            "; run it from the repository root (where README.md and docs/ are) or pass the files"
            if args.files == list(DEFAULT_FILES)
            else ""
        )
        parser.error(f"no such file: {', '.join(missing)} (in {Path.cwd()}){hint}")
    res = None
    try:
        if args.results is not None:
            res = load(Path(args.results))
        stale = []
        for name in args.files:
            path = Path(name)
            old = path.read_text()
            text, n = rewrite(old, res, base=path.parent)
            if text != old:
                stale.append(name)
                if not args.check:
                    path.write_text(text)
            verb = "checked" if args.check else "rewritten"
            print(f"{name}: {n} block{'s' if n != 1 else ''} {verb}", file=sys.stderr)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
