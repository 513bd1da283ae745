"""``python -m gald.bench.ablation``: does the LD change anything? A paired-seed ablation.

Three variants of one segmentation model are trained on a synthetic task (context-only large
regions plus small, locally visible objects; :mod:`gald.bench._ablation_task`) and evaluated on
a fixed held-out set:

- ``none``: the GALD head with no context module,
- ``ga``: ``GALD(..., ld=False)``, global aggregation only,
- ``ld``: ``GALD(..., ld=True)``, global aggregation then local distribution,

and, evaluated only, ``ld, gate frozen``: the trained ``ld`` model with its gate replaced by the
gate's mean per channel (measured on the held-out set). ``ld - frozen`` is what the LD's spatial
and per-sample modulation adds beyond a constant per-channel scale, which the conv after the
GALD block could absorb.

For every seed the three variants start from bitwise identical weights wherever they share a
part (checked, see :func:`gald.bench._ablation_model.check_pairing`) and see the same training
batches (checked by a checksum of the data stream). The output lists each variant's IoU on the
large regions, on the small objects and on the boundary band, the paired differences with their
spread and the number of seeds, and the gate statistics of the trained LD
(:func:`gald.ld_statistics`).

This is a small model on a synthetic task at CPU scale: what it shows says little about
full-size training (a 97x97 head map, real data, 50k steps).
"""

from __future__ import annotations

import argparse
import copy
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import first_line
from ..registry import list_ga
from ..stats import gate_range_text, ld_statistics
from ._ablation_model import VARIANTS, build_variants, freeze_gate
from ._ablation_task import (
    NUM_CLASSES,
    boundary_band,
    class_weights,
    confusion,
    make_batch,
    metrics,
)
from ._args import (
    Stdout,
    attach_negative_values,
    check_outputs,
    finite_float,
    interruptible,
    write_json,
)
from ._timing import environment, format_duration

METRICS = ("large", "small", "boundary", "miou")
COMPARISONS = (("ga", "none"), ("ld", "ga"), ("ld", "none"), ("ld", "frozen"))
ROWS = {
    "none": "none",
    "ga": "ga",
    "ld": "ld",
    "frozen": "ld, gate frozen",
}
_EVAL_SEED = 2_147_483_000
# two-sided 95 % quantiles of Student's t by degrees of freedom, rounded up in the third decimal
# (a smaller df is used between the listed ones: both err on the side of "within noise")
_T95 = {
    1: 12.707,
    2: 4.303,
    3: 3.183,
    4: 2.777,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.307,
    9: 2.263,
    10: 2.229,
    15: 2.132,
    20: 2.086,
    30: 2.043,
    60: 2.001,
}


def _signed(value: float) -> str:
    """``value`` to one decimal with its sign, and no sign for a value that rounds to zero
    (``-0.0`` would read as a loss)."""
    text = f"{value:+.1f}"
    return "0.0" if text in ("+0.0", "-0.0") else text


def t95(df: int) -> float:
    """The two-sided 95 % quantile of Student's t with ``df`` degrees of freedom (tabled)."""
    return _T95[max(k for k in _T95 if k <= df)] if df >= 1 else math.inf


def estimate_seconds(variants: Mapping[str, nn.Module], cfg: AblationConfig) -> float:
    """The run's expected duration on this machine: two training steps of a copy of every
    variant timed after one untimed step, times the steps and seeds, plus the evaluations (a
    forward costs about a third of a step). A rough figure, said before the run starts."""
    step = 0.0
    gen = torch.Generator().manual_seed(0)
    x, y = make_batch(gen, cfg.batch_size, cfg.size, large_amplitude=cfg.large_amplitude)
    for model in variants.values():
        model = copy.deepcopy(model).train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            logits = F.interpolate(model(x), size=y.shape[-2:], mode="bilinear", align_corners=True)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - start)
        step += min(times[1:])
    eval_batches = math.ceil(cfg.eval_images / cfg.batch_size)
    # the frozen-gate control is evaluated too: one more evaluation than there are variants
    evals = eval_batches * (len(variants) + 1) / len(variants)
    return cfg.seeds * (cfg.steps + evals / 3) * step


@dataclass(frozen=True)
class AblationConfig:
    """Everything that defines one ablation run (the defaults are the CLI's)."""

    ga: str = "psp"
    seeds: int = 3
    steps: int = 300
    size: int = 96
    batch_size: int = 8
    channels: int = 32
    eval_images: int = 32
    offset: float = 2.0
    final_act: bool = True
    lr: float = 3e-3
    large_amplitude: float = 0.15
    small_weight: float = 5.0
    first_seed: int = 0


def _seed_data(seed: int) -> int:
    return seed * 7919 + 17


def _train(model: nn.Module, cfg: AblationConfig, seed: int) -> tuple[float, float]:
    """Train ``model`` in place; returns (the data checksum, the final loss).

    The global random stream (dropout inside a GA) is seeded from ``seed`` too, inside a fork
    that restores it afterwards: the variants of one seed draw the same dropout masks, whatever
    ran before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed_data(seed) + 1)
        return _train_steps(model, cfg, seed)


def _train_steps(model: nn.Module, cfg: AblationConfig, seed: int) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(_seed_data(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=cfg.steps, power=0.9)
    checksum = 0.0
    loss = torch.zeros(())
    weight = class_weights(cfg.small_weight)
    model.train()
    for _ in range(cfg.steps):
        x, y = make_batch(gen, cfg.batch_size, cfg.size, large_amplitude=cfg.large_amplitude)
        checksum += float(x.double().sum()) + float(y.sum())
        logits = model(x)
        logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=True)
        loss = F.cross_entropy(logits, y, weight=weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return checksum, float(loss.detach())


def _eval_set(cfg: AblationConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed held-out set: the same images for every seed and variant."""
    gen = torch.Generator().manual_seed(_EVAL_SEED)
    out = []
    left = cfg.eval_images
    while left > 0:
        n = min(left, cfg.batch_size)
        out.append(make_batch(gen, n, cfg.size, large_amplitude=cfg.large_amplitude))
        left -= n
    return out


@torch.no_grad()
def _evaluate(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    model.eval()
    conf_all = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    conf_bnd = torch.zeros_like(conf_all)
    for x, y in data:
        logits = F.interpolate(model(x), size=y.shape[-2:], mode="bilinear", align_corners=True)
        pred = logits.argmax(1)
        band = boundary_band(y)
        conf_all += confusion(pred, y)
        conf_bnd += confusion(pred[band], y[band])
    return metrics(conf_all, conf_bnd)


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return mean, std


def paired_differences(
    runs: dict[int, dict[str, dict[str, float]]],
) -> dict[str, dict[str, dict[str, Any]]]:
    """For each comparison ``a-b`` and metric: the per-seed differences, their mean, sample
    std, standard error, range, number of seeds and number of seeds where ``a`` was better."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for a, b in COMPARISONS:
        if any(a not in r or b not in r for r in runs.values()):
            continue
        key = f"{a}-{b}"
        out[key] = {}
        for metric in METRICS:
            diffs = [runs[s][a][metric] - runs[s][b][metric] for s in sorted(runs)]
            mean, std = _mean_std(diffs)
            n = len(diffs)
            out[key][metric] = {
                "diffs": diffs,
                "mean": mean,
                "std": std,
                "sem": std / math.sqrt(n) if n > 1 else math.nan,
                "ci95": t95(n - 1) * std / math.sqrt(n) if n > 1 else math.nan,
                "min": min(diffs),
                "max": max(diffs),
                "n": n,
                "wins": sum(d > 0 for d in diffs),
            }
    return out


def run(cfg: AblationConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the ablation; returns a JSON-ready dict (see :func:`render`)."""
    data = _eval_set(cfg)
    runs: dict[int, dict[str, dict[str, float]]] = {}
    gates: list[dict[str, Any]] = []
    checksums: dict[int, dict[str, float]] = {}
    started = time.perf_counter()
    cpu_started = time.process_time()
    total = cfg.seeds * len(VARIANTS)
    done = 0
    for seed in range(cfg.first_seed, cfg.first_seed + cfg.seeds):
        models = build_variants(
            seed,
            ga=cfg.ga,
            channels=cfg.channels,
            num_classes=NUM_CLASSES,
            offset=cfg.offset,
            final_act=cfg.final_act,
        )
        runs[seed], checksums[seed] = {}, {}
        for name in VARIANTS:
            model = models[name]
            t0 = time.perf_counter()
            checksums[seed][name], loss = _train(model, cfg, seed)
            result = _evaluate(model, data)
            result["train_s"] = time.perf_counter() - t0
            result["final_loss"] = loss
            runs[seed][name] = result
            if name == "ld":
                gate = next(iter(ld_statistics(model, data).values()))
                gates.append({"seed": seed, **gate.as_dict()})
                runs[seed]["frozen"] = _evaluate(freeze_gate(model, gate.channel_mean), data)
            done += 1
            elapsed = time.perf_counter() - started
            log(
                f"  seed {seed} {name:>4}: large {result['large']:5.1f}  small "
                f"{result['small']:5.1f}  boundary {result['boundary']:5.1f}  "
                f"({result['train_s']:.0f} s; {format_duration(elapsed / done * (total - done))} "
                "left)"
            )
        if len(set(checksums[seed].values())) != 1:
            raise RuntimeError(f"seed {seed}: the variants saw different training data")
    return {
        "config": asdict(cfg),
        "runs": {str(s): r for s, r in runs.items()},
        "paired": paired_differences(runs),
        "gate": gates,
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
        "threads": torch.get_num_threads(),
    }


def _pm(mean: float, std: float) -> str:
    return f"{mean:6.1f} ± {std:4.1f}" if not math.isnan(std) else f"{mean:6.1f}       "


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render(res: dict[str, Any]) -> str:
    """The report: per-variant IoU, paired differences, the trained gate, and how to read it."""
    cfg = res["config"]
    runs = res["runs"]
    seeds = len(runs)
    out = [
        f"Per variant: IoU % on the held-out set, mean ± std over {seeds} seed(s)",
    ]
    rows = [["variant", "large regions", "small objects", "boundary band", "mIoU"]]
    for name, label in ROWS.items():
        if any(name not in r for r in runs.values()):
            continue
        cells = [label]
        for metric in METRICS:
            cells.append(_pm(*_mean_std([runs[s][name][metric] for s in runs])))
        rows.append(cells)
    out.append(_table(rows))
    small = [runs[s][name]["small"] for s in runs for name in ROWS if name in runs[s]]
    if small and max(small) < 1.0:
        out.append(
            "Note: no variant learned the small objects (IoU under 1 % for every variant and "
            f"seed after {cfg['steps']} steps), so the comparison says nothing about them; run "
            "the default --steps."
        )
    out.append("")
    out.append(
        "Paired differences (same seed = same initial weights and data), IoU points: "
        "mean ± std [min, max], seeds better / n"
    )
    rows = [["comparison", *METRICS, "verdict"]]
    for key, per_metric in res["paired"].items():
        cells = [key]
        verdicts = []
        for metric in METRICS:
            d = per_metric[metric]
            std = "" if math.isnan(d["std"]) else f" ± {d['std']:.1f}"
            cells.append(
                f"{_signed(d['mean'])}{std} [{_signed(d['min'])}, {_signed(d['max'])}] "
                f"{d['wins']}/{d['n']}"
            )
            if not math.isnan(d["ci95"]) and abs(d["mean"]) > d["ci95"]:
                verdicts.append(metric)
        if seeds < 3:
            cells.append(f"too few seeds to tell (--seeds 3 or more; {seeds} here)")
        else:
            cells.append(
                "95% CI excludes 0: " + ", ".join(verdicts)
                if verdicts
                else "all within noise (95% CI)"
            )
        rows.append(cells)
    out.append(_table(rows))
    if res["gate"]:
        out.append("")
        g = res["gate"]
        rng = gate_range_text(g[0]["low"], g[0]["high"], g[0].get("low_included", cfg["final_act"]))

        def avg(key: str) -> float:
            return statistics.fmean(x[key] for x in g)

        out.append(
            f"Gate offset + M of the trained LD on the held-out set (range {rng}, mean over "
            f"seeds): mean {avg('mean'):.3f}, min {min(x['min'] for x in g):.3f}, "
            f"max {max(x['max'] for x in g):.3f}, spatial CV {avg('spatial_cv'):.2%}, "
            f"channel CV {avg('channel_cv'):.2%}, sample CV {avg('sample_cv'):.2%}, "
            f"positions >5% off their map's mean {avg('far_fraction'):.2%}"
        )
    out += [
        "",
        "How to read this:",
        "- These numbers are evidence from this run only: a synthetic task, a "
        f"{cfg['size'] // 4}x{cfg['size'] // 4} head map, {cfg['steps']} steps, {seeds} seed(s).",
        "  A result at this scale says little about full-size training (a 97x97 head map, real",
        "  data, tens of thousands of steps); neither a gain nor a null result here confirms or",
        "  refutes the paper's claim that the LD protects small patterns from over-smoothing.",
        "- '95% CI excludes 0': the paired t interval of the mean difference over the seeds does",
        "  not contain 0. With few seeds and several metrics that is a screen, not a proof.",
        "- 'ld, gate frozen' is the trained ld model with its gate replaced by the gate's mean per",
        "  channel; if ld-frozen is within noise, the LD's spatial modulation did nothing here",
        "  beyond a constant per-channel scale, which the conv after the GALD block can absorb.",
        f"Time: {res['seconds'] / 60:.1f} min wall, {res['cpu_seconds'] / 60:.1f} min of CPU "
        f"({res.get('threads', '?')} thread(s)).",
    ]
    return "\n".join(out)


def _parser() -> argparse.ArgumentParser:
    d = AblationConfig()
    p = argparse.ArgumentParser(
        prog="python -m gald.bench --ablation",
        description="Paired-seed ablation of the GALD head's context slot: none / GA / GA + LD "
        "on a synthetic segmentation task (CPU scale; says little about full-size training).",
        allow_abbrev=False,
    )
    p.add_argument("--ga", default=d.ga, choices=list_ga(), help=f"GA module (default {d.ga})")
    p.add_argument("--seeds", type=int, default=d.seeds, help=f"paired seeds (default {d.seeds})")
    p.add_argument("--first-seed", type=int, default=d.first_seed, help="first seed (default 0)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"training steps (default {d.steps})")
    p.add_argument(
        "--size",
        type=int,
        default=d.size,
        help=f"image side in pixels; the head map is a quarter of it (default {d.size})",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument("--channels", type=int, default=d.channels, help=f"width (default {d.channels})")
    p.add_argument(
        "--eval-images",
        type=int,
        default=d.eval_images,
        help=f"held-out images (default {d.eval_images})",
    )
    p.add_argument(
        "--offset", type=finite_float, default=d.offset, help=f"LD offset (default {d.offset})"
    )
    p.add_argument(
        "--final-act",
        action=argparse.BooleanOptionalAction,
        default=d.final_act,
        help="ReLU before the LD sigmoid (default: on, as the authors)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's own setting); 1 suffers least when other "
        "processes compete for the cores",
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument(
        "--quiet", action="store_true", help="no per-seed progress lines or duration estimate"
    )
    return p


@interruptible("python -m gald.bench --ablation")
def main(argv: list[str] | None = None) -> int:
    argv = attach_negative_values(list(sys.argv[1:] if argv is None else argv))
    parser = _parser()
    args = parser.parse_args(argv)
    emit = Stdout()
    for name in ("seeds", "steps", "batch_size", "channels", "eval_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.size < 8:
        parser.error(f"--size must be >= 8, got {args.size}")
    check_outputs(parser, json=args.json)
    cfg = AblationConfig(
        ga=args.ga,
        seeds=args.seeds,
        steps=args.steps,
        size=args.size,
        batch_size=args.batch_size,
        channels=args.channels,
        eval_images=args.eval_images,
        offset=args.offset,
        final_act=args.final_act,
        first_seed=args.first_seed,
    )
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if not 0 <= cfg.first_seed <= 2**32 - cfg.seeds:
        parser.error(
            f"--first-seed must be in [0, 2**32 - --seeds] = [0, {2**32 - cfg.seeds}], got "
            f"{cfg.first_seed}"
        )
    try:  # a GA that cannot take this width fails here, before anything runs
        variants = build_variants(
            cfg.first_seed,
            ga=cfg.ga,
            channels=cfg.channels,
            num_classes=NUM_CLASSES,
            offset=cfg.offset,
            final_act=cfg.final_act,
        )
    except (ValueError, TypeError) as e:
        parser.error(f"--ga {cfg.ga} with --channels {cfg.channels}: {e}")
    except (RuntimeError, MemoryError) as e:  # e.g. an allocation refused
        parser.error(f"--channels {cfg.channels}: the models cannot be built ({first_line(e)})")
    # one training-mode forward of a zero batch per variant (BatchNorm needs more than one
    # value per channel at the LD's coarsest stage): a size that cannot train fails now
    try:
        probe = torch.zeros(cfg.batch_size, 3, cfg.size, cfg.size)
    except (RuntimeError, MemoryError) as e:
        parser.error(
            f"--size {cfg.size} with --batch-size {cfg.batch_size}: one batch of images cannot "
            f"be allocated ({first_line(e)})"
        )
    for name, model in variants.items():
        try:
            with torch.no_grad():
                model.train()(probe)
        except (ValueError, RuntimeError, MemoryError) as e:
            why = first_line(e)
            parser.error(
                f"--size {cfg.size} with --batch-size {cfg.batch_size}: the {name} variant "
                f"cannot train on it ({why}); use a larger --size or --batch-size"
            )
    threads_before = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        estimate = 0.0 if args.quiet else estimate_seconds(variants, cfg)
        emit(
            f"LD ablation: {len(VARIANTS)} variants (none / ga / ld) x {cfg.seeds} seed(s) x "
            f"{cfg.steps} steps, GA {cfg.ga}, image {cfg.size}x{cfg.size} (head map "
            f"{cfg.size // 4}x{cfg.size // 4}), width {cfg.channels}, batch {cfg.batch_size}, "
            f"LD offset {cfg.offset:g}, final_act={cfg.final_act}, "
            f"{torch.get_num_threads()} thread(s)."
        )
        if not args.quiet:  # on stderr, as the timing benchmark's estimate
            print(
                f"Expected duration on this machine: {format_duration(estimate)} (from a few "
                "timed training steps of each variant).",
                file=sys.stderr,
                flush=True,
            )
        emit(
            "A result at this scale (small synthetic task, CPU-sized model) says little about "
            "full-size training."
        )
        env = environment(torch.device("cpu"), torch.get_num_threads())
        # per-seed progress on stderr (stdout holds the report), on a terminal only, as the
        # timing benchmark's progress line
        shown = not args.quiet and sys.stdout.isatty() and sys.stderr.isatty()
        res = run(
            cfg,
            log=(lambda line: print(line, file=sys.stderr)) if shown else (lambda line: None),
        )
    finally:
        torch.set_num_threads(threads_before)
    res["command"] = " ".join(["python -m gald.bench --ablation", *map(shlex.quote, argv)])
    res["environment"] = env
    emit()
    emit(render(res))
    # strict JSON (an undefined spread with one seed, or a diverged loss, is null)
    if args.json and not write_json(args.json, res):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
