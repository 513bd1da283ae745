"""First-call latency: the first call of a fresh process against the second.

A user's first call of a layer pays one-time costs (lazy imports, kernel registration, the
allocator's first pages). Each measurement runs in a fresh Python process started with the
interpreter running the benchmark, so nothing the benchmark process did before is counted.
Two cases: the forward of ``gald.GALD(64)``, and its train step (forward and backward) with
gradient checkpointing on, whose ``torch.utils.checkpoint`` imports ``torch._dynamo``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

SHAPE = (1, 64, 33, 33)
"""The input of the measurement: ``gald.GALD(64)`` (the default CGNL) on it."""

CASES = {
    "forward": "gald.GALD(64): forward",
    "checkpointed_step": "gald.GALD(64) with set_grad_checkpointing(): train step",
}

_SCRIPT = """
import json, sys, time
import torch
import gald
torch.set_num_threads({threads})
shape = {shape}
block = gald.GALD(shape[1]).to({device!r})
x = torch.randn(*shape, device={device!r}, requires_grad={step})
if {step}:
    block.set_grad_checkpointing()
times = []
for _ in range(2):
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = block(x)
    if {step}:
        out.sum().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
print(json.dumps({{
    "first_ms": 1e3 * times[0],
    "second_ms": 1e3 * times[1],
    "dynamo_imported": "torch._dynamo" in sys.modules,
}}))
"""


def _one(device: str, threads: int, step: bool) -> dict[str, Any]:
    script = _SCRIPT.format(threads=threads, shape=SHAPE, device=device, step=step)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise RuntimeError(f"the first-call process failed: {done.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run(device: str, threads: int, processes: int = 3) -> dict[str, Any]:
    """Time the first and the second call of each case in ``processes`` fresh processes."""
    cases = {
        name: [_one(device, threads, name == "checkpointed_step") for _ in range(processes)]
        for name in CASES
    }
    return {
        "shape": list(SHAPE),
        "dtype": "float32",
        "memory_format": "NCHW",
        "threads": threads,
        "cases": cases,
    }


def extra_ms(runs: list[dict[str, Any]]) -> list[float]:
    """How much longer the first call took than the second, per process."""
    return [r["first_ms"] - r["second_ms"] for r in runs]


def _span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.0f} ms" if round(lo) == round(hi) else f"{lo:.0f}-{hi:.0f} ms"


def render(res: dict[str, Any]) -> str:
    lines = []
    for name, runs in res["cases"].items():
        dynamo = sum(r["dynamo_imported"] for r in runs)
        lines.append(
            f"{CASES[name]} on {tuple(res['shape'])}, {len(runs)} fresh processes: first call "
            f"{_span([r['first_ms'] for r in runs])}, second {_span([r['second_ms'] for r in runs])}"
            f", so the first is {_span(extra_ms(runs))} slower; torch._dynamo imported in "
            f"{dynamo} of {len(runs)}."
        )
    return "\n".join(lines)
