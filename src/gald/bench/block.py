"""What the Local Distribution costs inside GALD: each GA with and without the LD.

For every GA, ``GALD(C, ga)`` and ``GALD(C, ga, ld=False)`` (same seed) are measured on the same
input:

- **inference**: eval mode under ``torch.no_grad()``;
- **train step**: train mode, forward and backward of a fixed random upstream gradient;
- **saved for backward**: bytes of the unique storages autograd keeps between forward and
  backward (``torch.autograd.graph.saved_tensors_hooks``);
- **peak memory** of a train step above what was allocated before it (CUDA only);
- **FLOPs** of the forward (``torch.utils.flop_counter.FlopCounterMode``, with the formula of
  the fused ``gald::ld_modulate`` op registered by :mod:`gald.ops._flops`);
- parameters.

The two models' timings are interleaved (see :mod:`gald.bench._timing`); the LD overhead is the
median over the rounds of the per-round ratio of the two times, minus one, with an approximate
95 % interval (:data:`~gald.bench._timing.OVERHEAD_NOTE`): not the ratio of the two medians.
"""

from __future__ import annotations

import copy
import functools
import gc
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..block import GALD
from ._config import Config
from ._timing import (
    OVERHEAD_NOTE,
    Ratio,
    Stats,
    expected_seconds,
    format_duration,
    format_flops,
    format_mib,
    format_overhead,
    format_pct,
    format_table,
    format_time,
    measure_interleaved,
    peak_bytes,
    ratio_from,
    saved_bytes,
    time_once,
)

CANDIDATES = ("with LD", "without LD")


def _cpu_flash_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    # torch's flop registry has the CUDA attention kernels but not the fused CPU one, which
    # would otherwise count as zero and hide the O(N^2) cost of NonLocal2d and DANet's PAM.
    return sdpa_flop_count(query, key, value)  # FlopCounterMode passes shapes


_CUSTOM_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops,
}


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward of ``model`` (no grad), custom ops with registered formulas included."""
    from ..ops import _flops  # noqa: F401  (registers the gald::ld_modulate formula)

    counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS)
    with counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


def build(ga: str, channels: int, *, ld: bool, seed: int = 0) -> GALD:
    """``GALD(channels, ga, ld=ld)``; CGNL with 8 groups when the channels allow, else 1."""
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {}
    if ga == "cgnl" and not (channels % 8 == 0 and (channels // 2) % 8 == 0):
        kwargs["ga_kwargs"] = {"groups": 1}
    return GALD(channels, ga, ld=ld, **kwargs)


def candidates(ga: str, channels: int) -> dict[str, Callable[[], GALD]]:
    """How to build the two models measured for ``ga``, by label."""
    return {
        f"GALD({ga}) with LD": functools.partial(build, ga, channels, ld=True),
        f"GALD({ga}) without LD": functools.partial(build, ga, channels, ld=False),
    }


class _Pair:
    """The with-LD and without-LD models of one GA and their timed closures.

    :meth:`relocate` replaces the models and tensors by copies between rounds, so that each
    round meets another memory layout (the closures look them up at every call)."""

    def __init__(self, ga: str, cfg: Config) -> None:
        b, c, h, w = cfg.shape
        self.models: dict[str, GALD] = {
            "with LD": cfg.module(build(ga, c, ld=True)),
            "without LD": cfg.module(build(ga, c, ld=False)),
        }
        gen = torch.Generator().manual_seed(1)
        self.x = cfg.tensor(b, c, h, w, generator=gen)
        self.grad = cfg.tensor(b, c, h, w, generator=gen)
        self.xr = self.x.detach().clone().requires_grad_(True)
        self.cfg = cfg

    def relocate(self) -> None:
        """Fresh copies of the models (same weights, buffers and modes) and of the inputs."""
        self.models = {name: copy.deepcopy(m) for name, m in self.models.items()}
        self.x, self.grad = self.x.clone(), self.grad.clone()
        self.xr = self.x.detach().clone().requires_grad_(True)

    def inference(self, name: str) -> Callable[[], object]:
        cfg = self.cfg

        def fn() -> object:
            with torch.no_grad(), cfg.autocast():
                return self.models[name](self.x)

        return fn

    def train_forward(self, name: str) -> Callable[[], torch.Tensor]:
        cfg = self.cfg

        def fn() -> torch.Tensor:
            with cfg.autocast():
                return self.models[name](self.xr)

        return fn

    def clear_grads(self) -> None:
        """Drop the gradients of the input and of every model's parameters."""
        self.xr.grad = None
        for model in self.models.values():
            model.zero_grad(set_to_none=True)

    def train_step(self, name: str) -> Callable[[], object]:
        fwd = self.train_forward(name)

        def fn() -> None:
            self.models[name].zero_grad(set_to_none=True)
            self.xr.grad = None
            fwd().backward(self.grad)

        return fn


def _mode(models: dict[str, GALD], train: bool) -> None:
    for m in models.values():
        m.train(train)


def run(cfg: Config, gas: list[str]) -> dict[str, Any]:
    """Measure every GA in ``gas`` with and without LD; the results as plain data."""
    rows: list[dict[str, Any]] = []
    known: list[float] = []  # the expected duration of each GA warmed up so far
    for i, ga in enumerate(gas):
        pair = _Pair(ga, cfg)
        need = pair.models["with LD"].min_size
        if min(cfg.shape[2:]) < need:
            raise ValueError(f"GALD({ga}) needs H and W of at least {need}")
        row: dict[str, Any] = {"ga": ga, "models": {}}
        for name, m in pair.models.items():
            row["models"][name] = {"params": sum(p.numel() for p in m.parameters())}

        # warm-up (two calls each), which also gives the duration estimate
        call_s: dict[str, float] = {}
        for key, train in (("inference", False), ("train_step", True)):
            _mode(pair.models, train)
            for name in CANDIDATES:
                fn = pair.train_step(name) if train else pair.inference(name)
                # the quicker of the two decides single-call timing: one stalled call must
                # not turn a fast candidate into one timed by a single call per round
                call_s[f"{key}/{name}"] = min(time_once(fn, cfg.device) for _ in range(2))
        expected = sum(
            expected_seconds(s, min_time=cfg.min_time, rounds=cfg.rounds) for s in call_s.values()
        )
        known.append(expected)
        # the GAs still to come are guessed at the mean of those warmed up so far: the progress
        # line's estimate sharpens as the run goes
        cfg.progress.total = sum(known) + sum(known) / len(known) * (len(gas) - i - 1)
        if i == 0 and cfg.progress.total > 20 and not cfg.quiet:
            how = f" (from the warm-up of {ga}, the first GA)" if len(gas) > 1 else ""
            cfg.say(f"expected duration: {format_duration(cfg.progress.total)}{how}")

        def on_block(
            name: str, r: int, key: str = "", ga: str = ga, call_s: dict[str, float] = call_s
        ) -> None:
            cfg.progress.advance(
                expected_seconds(call_s[f"{key}/{name}"], min_time=cfg.min_time, rounds=cfg.rounds)
                / cfg.rounds,
                f"{ga} {key.replace('_', ' ')} {name}",
            )

        timed: dict[str, dict[str, Stats]] = {}
        for key, train in (("inference", False), ("train_step", True)):
            _mode(pair.models, train)
            fns = {n: (pair.train_step(n) if train else pair.inference(n)) for n in CANDIDATES}
            timed[key] = measure_interleaved(
                fns,
                min_time=cfg.min_time,
                rounds=cfg.rounds,
                threads=cfg.threads,
                on_block=functools.partial(on_block, key=key),
                call_s={n: call_s[f"{key}/{n}"] for n in CANDIDATES},
                between_rounds=pair.relocate,
            )

        _mode(pair.models, True)
        for name in CANDIDATES:
            entry = row["models"][name]
            entry["inference"] = timed["inference"][name].as_dict()
            entry["train_step"] = timed["train_step"][name].as_dict()
            entry["saved_bytes"] = saved_bytes(pair.train_forward(name))
            pair.clear_grads()  # the step frees them: not in the baseline of the peak
            entry["peak_bytes"] = peak_bytes(pair.train_step(name), cfg.device)
            pair.models[name].eval()
            entry["gflops"] = count_flops(pair.models[name], pair.x) / 1e9
            pair.models[name].train()
        w, wo = row["models"]["with LD"], row["models"]["without LD"]
        row["overhead"] = {
            key: Ratio.of(timed[key]["with LD"], timed[key]["without LD"]).as_dict()
            for key in ("inference", "train_step")
        }
        row["overhead"]["saved_bytes_ratio"] = _safe_ratio(w["saved_bytes"], wo["saved_bytes"])
        row["overhead"]["peak_bytes_ratio"] = (
            _safe_ratio(w["peak_bytes"], wo["peak_bytes"]) if w["peak_bytes"] is not None else None
        )
        row["overhead"]["gflops_ratio"] = _safe_ratio(w["gflops"], wo["gflops"])
        rows.append(row)
        del pair
        gc.collect()
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
    return {"shape": list(cfg.shape), "rows": rows, "overhead_definition": OVERHEAD_NOTE}


def _safe_ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _overhead(d: dict[str, Any]) -> str:
    return format_overhead(ratio_from(d))


def table(
    results: dict[str, Any], *, overhead_cell: Callable[[dict[str, Any]], str] | None = None
) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of :func:`run`'s results: per GA, the model with and without LD and the
    LD overhead. ``overhead_cell`` formats an overhead (default: plain text); the terminal and
    the generated docs share this one table."""
    fmt_overhead = overhead_cell or _overhead
    cuda = any(r["models"]["with LD"]["peak_bytes"] is not None for r in results["rows"])
    headers = ["GA", "LD", "inference", "train step", "kept for backward, MiB"]
    headers += ["peak MiB"] if cuda else []
    headers += ["FLOPs", "params"]
    body: list[list[str]] = []
    for r in results["rows"]:
        for name in CANDIDATES:
            m = r["models"][name]
            line = [
                r["ga"],
                "yes" if name == "with LD" else "no",
                format_time(m["inference"]),
                format_time(m["train_step"]),
                format_mib(m["saved_bytes"]),
            ]
            line += [format_mib(m["peak_bytes"])] if cuda else []
            line += [format_flops(m["gflops"]), f"{m['params']:,}"]
            body.append(line)
        ov = r["overhead"]
        line = [
            r["ga"],
            "LD overhead",
            fmt_overhead(ov["inference"]),
            fmt_overhead(ov["train_step"]),
            format_pct(ov["saved_bytes_ratio"]),
        ]
        line += [format_pct(ov["peak_bytes_ratio"])] if cuda else []
        line += [format_pct(ov["gflops_ratio"]), ""]
        body.append(line)
    return headers, body


def render(results: dict[str, Any], cfg_text: str) -> str:
    """The table of :func:`run`'s results, for the terminal, with what its overhead is."""
    title = (
        f"GALD with and without LD, input {tuple(results['shape'])}, {cfg_text}; "
        "median [IQR, runs], overhead with a ~95 % interval"
    )
    return f"{title}\n{format_table(*table(results))}\n{OVERHEAD_NOTE}"


__all__ = ["build", "candidates", "count_flops", "render", "run", "table"]
