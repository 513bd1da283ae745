"""Check and time the Triton kernels of the fused Local Distribution op on a CUDA device.

For every shape and dtype this script

1. checks the kernels against the plain-ops reference
   ``x * (offset + sigmoid(F.interpolate(logits, (H, W), mode="bilinear")))`` and its autograd
   backward (fp32 against fp32; fp16/bf16 against the fp32 reference on the same rounded inputs),
   at the benchmark shape and at a few edge shapes (H or W = 1, logits larger than x, 1x1
   logits, both ``align_corners``), and checks that the backward is bitwise reproducible;
2. times the forward and the backward (both gradients) with CUDA events, the L2 cache flushed
   before every timed run, and reports the bandwidth they reach: bytes they must move (read
   ``x``/``grad_out``/``logits``, write the outputs) divided by the median time, next to a
   device-to-device copy moving the same number of bytes (reading and writing half each).
   The goal of issue 3 is >= 80 % of the copy.

Usage::

    python benchmarks/ld_cuda.py                      # default shapes, fp32 / bf16 / fp16
    python benchmarks/ld_cuda.py --shape 2,512,97,97 --dtypes fp32 --json ld_cuda.json

Without a CUDA device (or without triton) it prints why and exits with status 0, having
measured nothing. The exit status is 1 when a correctness check fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The default benchmark shapes: a 769 crop at output stride 8 (the paper's setting), the whole
# 1024x2048 Cityscapes image at output stride 8, a larger batch, and a large square map.
DEFAULT_SHAPES = ((2, 512, 97, 97), (2, 512, 129, 257), (8, 512, 97, 97), (4, 256, 256, 256))
# Edge cases checked for correctness only: (B, C, H, W, h, w).
EDGE_CASES = (
    (1, 3, 1, 7, 2, 3),
    (1, 3, 5, 1, 3, 2),
    (2, 3, 6, 5, 11, 9),
    (2, 4, 33, 70, 1, 1),
    (1, 2, 70, 130, 9, 17),
)
# Tolerances relative to the largest reference magnitude: one rounding of the result for the
# forward and grad_x, a few more for the reduced grad_logits.
# fp16/bf16 are computed in fp32 and rounded once (half an ulp: 2**-9 for bf16, 2**-12 for fp16).
RTOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
RTOL_REDUCED = {torch.float32: 1e-4, torch.bfloat16: 8e-3, torch.float16: 1e-3}
L2_FLUSH_BYTES = 256 * 2**20


def ld_branch_size(side: int, stages: int = 3) -> int:
    """Side of the LD mask logits: ``stages`` depthwise k=3, stride-2, padding-0 convs."""
    for _ in range(stages):
        side = max(1, (side - 3) // 2 + 1)
    return side


def parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = [int(p) for p in text.replace("x", ",").split(",") if p.strip()]
    if len(parts) != 4 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"--shape must be B,C,H,W with positive ints, got {text!r}")
    return parts[0], parts[1], parts[2], parts[3]


def reference(
    x: torch.Tensor, logits: torch.Tensor, offset: float, align_corners: bool
) -> torch.Tensor:
    mask = torch.sigmoid(
        F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=align_corners)
    )
    return x * (offset + mask)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().item()
    return (got.float() - want.float()).abs().max().item() / max(scale, 1e-30)


def check(
    kernels: Any,
    shape: tuple[int, int, int, int, int, int],
    dtype: torch.dtype,
    offset: float,
    align_corners: bool,
    seed: int = 0,
    device: str = "cuda",
) -> dict[str, Any]:
    """Forward and backward of the kernels against the fp32 reference; bitwise reproducibility."""
    b, c, H, W, h, w = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(b, c, H, W, device=device, generator=gen).to(dtype)
    logits = torch.randn(b, c, h, w, device=device, generator=gen).to(dtype)
    g = torch.randn(b, c, H, W, device=device, generator=gen).to(dtype)

    xr = x.float().requires_grad_()
    lr = logits.float().requires_grad_()
    want = reference(xr, lr, offset, align_corners)
    want_gx, want_gl = torch.autograd.grad(want, (xr, lr), g.float())

    out = kernels.ld_modulate_fwd_triton(x, logits, offset, align_corners)
    gx, gl = kernels.ld_modulate_bwd_triton(g, x, logits, offset, align_corners, True, True)
    gx2, gl2 = kernels.ld_modulate_bwd_triton(g, x, logits, offset, align_corners, True, True)
    gx_only, _ = kernels.ld_modulate_bwd_triton(g, x, logits, offset, align_corners, True, False)
    _, gl_only = kernels.ld_modulate_bwd_triton(g, x, logits, offset, align_corners, False, True)

    errs = {
        "out": _rel_err(out, want),
        "grad_x": _rel_err(gx, want_gx),
        "grad_logits": _rel_err(gl, want_gl),
    }
    ok = (
        out.dtype == dtype
        and gx.dtype == dtype
        and gl.dtype == dtype
        and errs["out"] <= RTOL[dtype]
        and errs["grad_x"] <= RTOL[dtype]
        and errs["grad_logits"] <= RTOL_REDUCED[dtype]
    )
    deterministic = torch.equal(gl, gl2) and torch.equal(gx, gx2)
    flags_ok = torch.equal(gx_only, gx) and torch.equal(gl_only, gl)
    return {
        "shape": list(shape),
        "dtype": str(dtype).removeprefix("torch."),
        "offset": offset,
        "align_corners": align_corners,
        "rel_err": errs,
        "ok": bool(ok and flags_ok),
        "deterministic": bool(deterministic),
    }


def cuda_median_ms(fn: Callable[[], Any], *, repeats: int, warmup: int) -> float:
    """Median time of ``fn()`` in ms with CUDA events, the L2 cache flushed before each run."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        flush.zero_()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_ms(nbytes: int, *, repeats: int, warmup: int) -> float:
    """Time of a device-to-device copy that moves ``nbytes`` in all (reads and writes half)."""
    half = max(1, nbytes // 2)
    src = torch.empty(half, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return cuda_median_ms(lambda: dst.copy_(src), repeats=repeats, warmup=warmup)


def bench(
    kernels: Any,
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    *,
    align_corners: bool,
    repeats: int,
    warmup: int,
) -> list[dict[str, Any]]:
    b, c, H, W = shape
    h, w = ld_branch_size(H), ld_branch_size(W)
    x = torch.randn(b, c, H, W, device="cuda").to(dtype)
    logits = torch.randn(b, c, h, w, device="cuda").to(dtype)
    g = torch.randn_like(x)
    n, n_low, isz = x.numel(), logits.numel(), x.element_size()

    def fwd() -> Any:
        return kernels.ld_modulate_fwd_triton(x, logits, 1.0, align_corners)

    def bwd() -> Any:
        return kernels.ld_modulate_bwd_triton(g, x, logits, 1.0, align_corners, True, True)

    xr = x.detach().requires_grad_()
    lr = logits.detach().requires_grad_()

    def ref_fwd() -> Any:
        with torch.no_grad():
            return reference(x, logits, 1.0, align_corners)

    def ref_bwd() -> Any:
        out = reference(xr, lr, 1.0, align_corners)
        return torch.autograd.grad(out, (xr, lr), g)

    rows = []
    # forward: read x and logits, write out; backward: read g, x, logits, write grad_x, grad_logits
    for name, fn, ref_fn, nbytes in (
        ("forward", fwd, ref_fwd, (2 * n + n_low) * isz),
        ("backward", bwd, ref_bwd, (3 * n + 2 * n_low) * isz),
    ):
        t = cuda_median_ms(fn, repeats=repeats, warmup=warmup)
        t_copy = copy_ms(nbytes, repeats=repeats, warmup=warmup)
        t_ref = cuda_median_ms(ref_fn, repeats=repeats, warmup=warmup)
        gbs = nbytes / t / 1e6
        copy_gbs = nbytes / t_copy / 1e6
        rows.append(
            {
                "shape": list(shape),
                "logits": [h, w],
                "dtype": str(dtype).removeprefix("torch."),
                "direction": name,
                "bytes": nbytes,
                "kernel_ms": t,
                "kernel_GBps": gbs,
                "copy_ms": t_copy,
                "copy_GBps": copy_gbs,
                "fraction_of_copy": gbs / copy_gbs,
                "reference_ms": t_ref,
                "speedup_vs_reference": t_ref / t,
            }
        )
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    headers = ["shape", "dtype", "pass", "kernel ms", "GB/s", "copy GB/s", "% of copy", "ref ms", "x ref"]
    body = [
        [
            "x".join(map(str, r["shape"])),
            r["dtype"],
            r["direction"],
            f"{r['kernel_ms']:.3f}",
            f"{r['kernel_GBps']:.0f}",
            f"{r['copy_GBps']:.0f}",
            f"{100 * r['fraction_of_copy']:.1f}",
            f"{r['reference_ms']:.3f}",
            f"{r['speedup_vs_reference']:.2f}",
        ]
        for r in rows
    ]
    widths = [max(len(hd), *(len(line[i]) for line in body)) for i, hd in enumerate(headers)]
    out = [" | ".join(hd.ljust(wd) for hd, wd in zip(headers, widths))]
    out.append("-+-".join("-" * wd for wd in widths))
    out += [" | ".join(cell.ljust(wd) for cell, wd in zip(line, widths)) for line in body]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/ld_cuda.py", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=parse_shape, action="append", help="B,C,H,W (repeatable)")
    parser.add_argument("--dtypes", default="fp32,bf16,fp16", help="comma list of fp32,bf16,fp16")
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs first")
    parser.add_argument(
        "--align-corners", type=int, choices=(0, 1), default=1, help="timed setting (checks use both)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    dtypes = []
    for name in args.dtypes.split(","):
        if name.strip() not in DTYPES:
            parser.error(f"--dtypes: unknown dtype {name!r}, expected some of {sorted(DTYPES)}")
        dtypes.append(DTYPES[name.strip()])
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")

    if not torch.cuda.is_available():
        print("ld_cuda: no CUDA device is available; nothing was checked or measured.", file=sys.stderr)
        return 0
    from gald.ops import _triton_ld as kernels

    if not kernels.TRITON_AVAILABLE:
        print("ld_cuda: triton is not installed (pip install 'gald[triton]'); nothing measured.", file=sys.stderr)
        return 0

    shapes = args.shape or list(DEFAULT_SHAPES)
    checks = []
    for dtype in dtypes:
        for b, c, H, W in shapes:
            for ac in (True, False):
                checks.append(check(kernels, (b, c, H, W, ld_branch_size(H), ld_branch_size(W)), dtype, 1.0, ac))
        for i, case in enumerate(EDGE_CASES):
            for ac in (True, False):
                for offset in (0.0, 2.0):
                    checks.append(check(kernels, case, dtype, offset, ac, seed=i + 1))
    failed = [r for r in checks if not (r["ok"] and r["deterministic"])]
    worst: dict[str, dict[str, float]] = {}
    for r in checks:
        d = worst.setdefault(r["dtype"], {})
        for k, v in r["rel_err"].items():
            d[k] = max(d.get(k, 0.0), v)
    print(f"correctness: {len(checks) - len(failed)}/{len(checks)} checks passed; worst relative errors:")
    for name, d in worst.items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.2e}" for k, v in d.items()))
    for r in failed:
        print(f"  FAILED: {r}", file=sys.stderr)

    rows = []
    for dtype in dtypes:
        for shape in shapes:
            rows += bench(
                kernels,
                shape,
                dtype,
                align_corners=bool(args.align_corners),
                repeats=args.repeats,
                warmup=args.warmup,
            )
    print()
    print(render(rows))

    if args.json:
        import triton

        result = {
            "machine": {
                "gpu": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "triton": triton.__version__,
                "cuda": torch.version.cuda,
                "python": platform.python_version(),
                "date": time.strftime("%Y-%m-%d"),
            },
            "checks": checks,
            "bench": rows,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
