"""Cost of every registered GA layer, alone and inside GALD, and the LD overhead.

For each layer: parameters, FLOPs (``torch.utils.flop_counter.FlopCounterMode``, forward),
forward and forward + backward median times, and the bytes autograd saves for backward, at the
full feature size and at the half resolution where GALD runs its GA; then ``GALD(ga_module=name)``
with and without LD at the full size, and the LD overhead in percent.
"""

from __future__ import annotations

import gc
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..block import GALD
from ..registry import create_ga, list_ga
from ._timing import format_table, median_ms, saved_bytes


def _cpu_flash_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    # torch's flop registry has the CUDA attention kernels but not the fused CPU one, which
    # would otherwise count as zero and hide the O(N^2) cost of NonLocal2d and DANet's PAM.
    return sdpa_flop_count(query, key, value)  # FlopCounterMode passes shapes


_CUSTOM_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops,
}


def _flops(model: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS)
    with counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


def _measure(model: nn.Module, x: torch.Tensor, repeats: int) -> dict[str, float]:
    model.train()
    xr = x.clone().requires_grad_(True)

    def fwd() -> None:
        with torch.no_grad():
            model(x)

    def fwd_bwd() -> None:
        model(xr).sum().backward()

    row = {
        "params": float(sum(p.numel() for p in model.parameters())),
        "gflops": _flops(model, x) / 1e9,
        "forward_ms": median_ms(fwd, repeats=repeats, warmup=1),
        "forward_backward_ms": median_ms(fwd_bwd, repeats=repeats, warmup=1),
        "saved_mb": saved_bytes(lambda: model(xr)) / 1e6,
    }
    model.zero_grad(set_to_none=True)
    gc.collect()
    return row


def run(
    shape: tuple[int, int, int, int], repeats: int, names: list[str] | None = None
) -> dict[str, Any]:
    b, c, h, w = shape
    half = ((h + 1) // 2, (w + 1) // 2)  # the GALD down conv (padding 1): ceil(H / 2)
    torch.manual_seed(0)
    x_full = torch.randn(shape)
    x_half = torch.randn(b, c, *half)
    rows: list[dict[str, Any]] = []
    for name in names or list_ga():
        ga = create_ga(name, c)
        row: dict[str, Any] = {"name": name}
        row["ga_full"] = _measure(ga, x_full, repeats)
        row["ga_half"] = _measure(ga, x_half, repeats)
        with_ld = GALD(c, name)
        without = GALD(c, name, ld=False)
        row["gald"] = _measure(with_ld, x_full, repeats)
        row["gald_no_ld"] = _measure(without, x_full, repeats)
        row["ld_overhead_pct"] = {
            key: 100.0 * (row["gald"][key] / row["gald_no_ld"][key] - 1.0)
            for key in ("forward_ms", "forward_backward_ms", "saved_mb")
        }
        rows.append(row)
        del ga, with_ld, without
        gc.collect()
    return {"shape": list(shape), "half": list(half), "repeats": repeats, "rows": rows}


def render(results: dict[str, Any]) -> str:
    hh, hw = results["half"]
    headers = [
        "GA", "params", "GFLOPs full", f"GFLOPs {hh}x{hw}", "fwd ms full", "f+b ms full",
        f"f+b ms {hh}x{hw}", "saved MB full", "GALD f+b ms", "GALD no-LD f+b ms", "LD +% f+b",
        "LD +% saved",
    ]
    table = []
    for r in results["rows"]:
        full, halfr, g, g0 = r["ga_full"], r["ga_half"], r["gald"], r["gald_no_ld"]
        table.append([
            r["name"], f"{int(full['params']):,}", f"{full['gflops']:.2f}", f"{halfr['gflops']:.2f}",
            f"{full['forward_ms']:.1f}", f"{full['forward_backward_ms']:.1f}",
            f"{halfr['forward_backward_ms']:.1f}", f"{full['saved_mb']:.1f}",
            f"{g['forward_backward_ms']:.1f}", f"{g0['forward_backward_ms']:.1f}",
            f"{r['ld_overhead_pct']['forward_backward_ms']:+.1f}%",
            f"{r['ld_overhead_pct']['saved_mb']:+.1f}%",
        ])
    title = (
        f"GA zoo, input {tuple(results['shape'])} (GA alone at full size and at {hh}x{hw}; "
        f"GALD at full size), median of {results['repeats']} runs"
    )
    return title + "\n" + format_table(headers, table)
