"""The main benchmark: the cost of the LD inside GALD(CGNL), forward and forward + backward."""

from __future__ import annotations

from typing import Any

import torch

from ..block import GALD
from ._timing import format_table, median_ms


def run(shape: tuple[int, int, int, int], repeats: int, seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape)
    results: dict[str, Any] = {"shape": list(shape), "repeats": repeats, "rows": []}
    timings: dict[str, dict[str, float]] = {}
    for name, ld in (("GALD(cgnl), ld=True", True), ("GALD(cgnl), ld=False", False)):
        groups = 8 if c % 8 == 0 and (c // 2) % 8 == 0 else 1
        model = GALD(c, "cgnl", ga_kwargs={"groups": groups}, ld=ld)
        model.train()
        xr = x.clone().requires_grad_(True)

        def fwd(model: GALD = model) -> None:
            with torch.no_grad():
                model(x)

        def fwd_bwd(model: GALD = model, xr: torch.Tensor = xr) -> None:
            model(xr).sum().backward()

        timings[name] = {
            "forward_ms": median_ms(fwd, repeats=repeats),
            "forward_backward_ms": median_ms(fwd_bwd, repeats=repeats),
        }
    with_ld, without = timings["GALD(cgnl), ld=True"], timings["GALD(cgnl), ld=False"]
    for name, t in timings.items():
        results["rows"].append({"model": name, **t})
    results["ld_overhead_pct"] = {
        "forward": 100.0 * (with_ld["forward_ms"] / without["forward_ms"] - 1.0),
        "forward_backward": 100.0
        * (with_ld["forward_backward_ms"] / without["forward_backward_ms"] - 1.0),
    }
    return results


def render(results: dict[str, Any]) -> str:
    rows = [
        [r["model"], f"{r['forward_ms']:.1f}", f"{r['forward_backward_ms']:.1f}"]
        for r in results["rows"]
    ]
    ov = results["ld_overhead_pct"]
    rows.append(["LD overhead", f"{ov['forward']:+.1f}%", f"{ov['forward_backward']:+.1f}%"])
    title = f"GALD block, input {tuple(results['shape'])}, median of {results['repeats']} runs"
    return title + "\n" + format_table(["model", "forward ms", "fwd+bwd ms"], rows)
