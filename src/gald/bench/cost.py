"""What each GA layer costs alone, independently of the machine: parameters, forward FLOPs at
the input size and at the size ``GALD`` runs it at, and the bytes autograd keeps for backward.

These figures depend on the layer's definition and the input shape only (no timing), so they
hold on any device; ``python -m gald.bench --ga all --cost`` recomputes them.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .._layers import conv_out_size
from ..registry import create_ga
from ._timing import format_flops, format_mib, saved_bytes
from .block import count_flops


def inner_side(side: int) -> int:
    """The side ``GALD`` hands its GA: the depthwise 3x3 stride-2 ``down`` stage, padding 1."""
    return conv_out_size(side, 3, stride=2, padding=1)


def run(gas: list[str], shape: tuple[int, int, int, int]) -> dict[str, Any]:
    """Parameters, GFLOPs at ``shape`` and at the inner size, and saved bytes at ``shape``."""
    b, c, h, w = shape
    inner = (b, c, inner_side(h), inner_side(w))
    rows = []
    for name in gas:
        torch.manual_seed(0)
        layer = create_ga(name, c).eval()
        x, x_inner = torch.randn(shape), torch.randn(inner)
        flops, flops_inner = count_flops(layer, x), count_flops(layer, x_inner)
        layer.train()  # what autograd keeps in a training step
        rows.append(
            {
                "ga": name,
                "params": sum(p.numel() for p in layer.parameters()),
                "gflops": flops / 1e9,
                "gflops_inner": flops_inner / 1e9,
                "saved_bytes": saved_bytes(functools.partial(layer, x)),
            }
        )
    return {"shape": list(shape), "inner_shape": list(inner), "rows": rows}


def table(res: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows shared by the terminal and the docs."""
    h, w = res["shape"][2:]
    hi, wi = res["inner_shape"][2:]
    headers = [
        "GA",
        "params",
        f"FLOPs {h}×{w}",
        f"FLOPs {hi}×{wi}",
        f"kept for backward, MiB {h}×{w}",
    ]
    rows = [
        [
            f"`{r['ga']}`",
            f"{r['params']:,}",
            format_flops(r["gflops"]),
            format_flops(r["gflops_inner"]),
            format_mib(r["saved_bytes"]),
        ]
        for r in res["rows"]
    ]
    return headers, rows


def render(res: dict[str, Any]) -> str:
    from ._timing import format_table

    headers, rows = table(res)
    plain = [[cell.strip("`") for cell in row] for row in rows]
    return (
        f"Each GA alone, input {tuple(res['shape'])} (GALD runs it at "
        f"{tuple(res['inner_shape'])}); machine-independent\n{format_table(headers, plain)}"
    )
