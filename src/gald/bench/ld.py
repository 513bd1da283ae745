"""The Local Distribution against the authors' formulation, and the fused op's kernels.

**LD vs the authors** (every device). The authors' ``LocalAttenModule`` written out with plain
ops: three [depthwise 3x3 stride-2 conv (padding 0, bias) -> BatchNorm -> ReLU] stages, bilinear
upsampling (``align_corners=True``), ``torch.sigmoid``, ``x + x * mask``. The library side is
``LocalDistribution(C, padding=0)`` with the same weights (the same function). Measured, with the
candidates interleaved:

- train step: train mode, forward + backward of a fixed random upstream gradient; the authors'
  module eagerly and, with ``--compile``, under ``torch.compile``; the library eagerly, with and
  without gradient checkpointing of its branch;
- inference: eval mode under ``torch.no_grad()``, the library's BatchNorms folded (``gald.fuse``);
- the bytes autograd keeps for backward (unique storages) and, on CUDA, the peak memory of a train step.

**Kernels** (on CUDA, or on CPU under Triton's interpreter, ``TRITON_INTERPRET=1``): the Triton
kernels of ``gald.ops.ld_modulate`` (``impl="triton"``) against the plain-ops formula in float64,
forward and both gradients, for float32, float16 and bfloat16, NCHW and channels_last, with a
check that the backward is bitwise reproducible; then the time of the forward and of the backward
and the bandwidth they reach (the bytes they must move over the median time) next to a
device-to-device copy of the same number of bytes (the L2 cache is not flushed: at small sizes
both run from cache).
"""

from __future__ import annotations

import copy
import functools
import math
import os
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .. import fuse
from .._layers import conv_out_size
from .._validate import first_line
from ..ld import LocalDistribution
from ..ops import ld_modulate
from ._config import DTYPES, Config
from ._timing import (
    KERNEL_NOTE,
    SPEEDUP_NOTE,
    Ratio,
    expected_seconds,
    format_fraction,
    format_mib,
    format_rate,
    format_speed,
    format_table,
    format_time,
    measure_interleaved,
    peak_bytes,
    ratio_from,
    saved_bytes,
    time_once,
)


class AuthorsLD(nn.Module):
    """The authors' ``LocalAttenModule`` restated with plain ops: ``x + x * sigmoid(Up(branch(x)))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            *(
                nn.Sequential(
                    nn.Conv2d(channels, channels, 3, stride=2, padding=0, groups=channels),
                    nn.BatchNorm2d(channels),
                    nn.ReLU(),
                )
                for _ in range(3)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.sigmoid(
            F.interpolate(self.branch(x), size=x.shape[-2:], mode="bilinear", align_corners=True)
        )
        return x + x * mask


def candidates(channels: int) -> dict[str, Callable[[], nn.Module]]:
    """How to build the two modules :func:`run_vs_authors` measures, by label (for the check
    of the input size, before the run)."""
    return {
        "the authors' LD branch": functools.partial(AuthorsLD, channels),
        "gald's LocalDistribution(padding=0)": functools.partial(
            LocalDistribution, channels, padding=0
        ),
    }


def ld_branch_size(side: int, stages: int = 3) -> int:
    """Side of the LD logits: ``stages`` depthwise k=3, stride-2, padding-0 convs."""
    for _ in range(stages):
        side = max(1, conv_out_size(side, 3, stride=2))
    return side


def _randomise_norms(module: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BatchNorm affine parameters and running statistics (a trained-like state)."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.5)
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a64, b64 = a.detach().double(), b.detach().double()
    return float(
        torch.linalg.vector_norm(a64 - b64) / torch.linalg.vector_norm(b64).clamp_min(1e-30)
    )


# --------------------------------------------------------------------------------------------
# LD vs the authors' formulation


class _Contest:
    """The models and tensors of the LD comparison and their timed closures.

    The closures look the models and tensors up at every call, so that :meth:`relocate` can
    replace them by copies between timing rounds (each round then meets another memory
    layout). ``infer_models`` is filled once the train-mode checks are done."""

    def __init__(
        self, train: dict[str, nn.Module], x: torch.Tensor, grad: torch.Tensor, cfg: Config
    ):
        self.train = train
        self.inputs = {name: x.detach().clone().requires_grad_(True) for name in train}
        self.infer_models: dict[str, nn.Module] = {}
        self.x, self.grad, self.cfg = x, grad, cfg

    def forward(self, name: str) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            with self.cfg.autocast():
                return self.train[name](self.inputs[name])

        return fn

    def step(self, name: str) -> Callable[[], object]:
        fwd = self.forward(name)

        def fn() -> None:
            self.train[name].zero_grad(set_to_none=True)
            self.inputs[name].grad = None
            fwd().backward(self.grad)

        return fn

    def infer(self, name: str) -> Callable[[], object]:
        def fn() -> object:
            with torch.no_grad(), self.cfg.autocast():
                return self.infer_models[name](self.x)

        return fn

    def drop(self, name: str) -> None:
        del self.train[name], self.inputs[name]

    def relocate(self) -> None:
        """Fresh copies of the models (a compiled one stays: a copy would compile again) and
        of every input tensor, with the same values."""
        for name in self.train:
            if "torch.compile" not in name:
                self.train[name] = copy.deepcopy(self.train[name])
            self.inputs[name] = self.inputs[name].detach().clone().requires_grad_(True)
        self.infer_models = {n: copy.deepcopy(m) for n, m in self.infer_models.items()}
        self.x, self.grad = self.x.clone(), self.grad.clone()


def run_vs_authors(cfg: Config) -> dict[str, Any]:
    """Train step, inference and memory of ``LocalDistribution`` against the authors' module."""
    b, c, h, w = cfg.shape
    gen = torch.Generator().manual_seed(0)
    x = cfg.tensor(b, c, h, w, generator=gen)
    grad = cfg.tensor(b, c, h, w, generator=gen)
    authors = AuthorsLD(c)
    _randomise_norms(authors, gen)
    state = copy.deepcopy(authors.state_dict())
    authors = cfg.module(authors)
    ours = LocalDistribution(c, padding=0)
    ours.load_state_dict(state)
    ours = cfg.module(ours)
    ckpt: LocalDistribution | None = None
    if hasattr(ours, "set_grad_checkpointing"):
        ckpt = copy.deepcopy(ours)
        ckpt.set_grad_checkpointing(True)

    train: dict[str, nn.Module] = {"authors": authors}
    if cfg.compile:
        train["authors, torch.compile"] = cast(nn.Module, torch.compile(copy.deepcopy(authors)))
    train["gald"] = ours
    if ckpt is not None:
        train["gald, grad checkpointing"] = ckpt
    contest = _Contest(train, x, grad, cfg)
    forward, step = contest.forward, contest.step
    inputs = contest.inputs

    for m in train.values():
        m.train()
    # one step each from the same state: outputs and input gradients agree
    checks: dict[str, float] = {}
    out_a = forward("authors")()
    out_a.backward(grad)
    ga = inputs["authors"].grad
    assert ga is not None
    notes: list[str] = []
    for name in list(train):
        if name == "authors":
            continue
        try:
            out = forward(name)()
            out.backward(grad)
        except Exception as exc:  # torch.compile of the authors' module: the compiler's error
            if "torch.compile" not in name:
                raise
            why = first_line(exc)
            notes.append(
                f"{name} not measured: it failed on this input ({type(exc).__name__}: {why})"
            )
            contest.drop(name)
            continue
        gx = inputs[name].grad
        assert gx is not None
        checks[f"train_out_rel_diff[{name}]"] = _rel_diff(out, out_a)
        checks[f"train_grad_x_rel_diff[{name}]"] = _rel_diff(gx, ga)
    del out_a, out

    train_fns = {name: step(name) for name in train}
    call_s = {}
    for name, fn in train_fns.items():
        # the first call compiles the torch.compile candidate; the quicker of the two decides
        # single-call timing (one stalled call must not decide it)
        call_s[name] = min(time_once(fn, cfg.device) for _ in range(2))

    # inference: eval mode, no autograd; the library folds its BatchNorms
    authors_eval = copy.deepcopy(authors).eval()
    fused = fuse(copy.deepcopy(ours).eval())
    contest.infer_models = {"authors": authors_eval, "gald": fused}
    infer = contest.infer

    infer_fns = {name: infer(name) for name in contest.infer_models}
    for name, fn in infer_fns.items():
        call_s[f"inference/{name}"] = min(time_once(fn, cfg.device) for _ in range(2))
    with torch.no_grad(), cfg.autocast():
        checks["inference_out_rel_diff[gald]"] = _rel_diff(fused(x), authors_eval(x))

    expected = sum(
        expected_seconds(s, min_time=cfg.min_time, rounds=cfg.rounds) for s in call_s.values()
    )
    cfg.progress.total += expected
    if expected > 20 and not cfg.quiet:
        cfg.say(f"LD vs the authors: expected duration about {expected:.0f} s")

    def on_block(name: str, r: int, prefix: str = "") -> None:
        s = call_s[prefix + name]
        cfg.progress.advance(
            expected_seconds(s, min_time=cfg.min_time, rounds=cfg.rounds) / cfg.rounds,
            f"LD {prefix}{name}",
        )

    t_train = measure_interleaved(
        train_fns,
        min_time=cfg.min_time,
        rounds=cfg.rounds,
        threads=cfg.threads,
        on_block=on_block,
        call_s={name: call_s[name] for name in train_fns},
        between_rounds=contest.relocate,
    )
    t_infer = measure_interleaved(
        infer_fns,
        min_time=cfg.min_time,
        rounds=cfg.rounds,
        threads=cfg.threads,
        on_block=functools.partial(on_block, prefix="inference/"),
        call_s={name: call_s[f"inference/{name}"] for name in infer_fns},
        between_rounds=contest.relocate,
    )

    memory: dict[str, dict[str, int | None]] = {}
    for name in train:
        # saved-tensor hooks around a compiled module would change what it compiles (and may
        # recompile it): its memory is the CUDA peak only
        sb = None if "torch.compile" in name else saved_bytes(forward(name))
        memory[name] = {"saved_bytes": sb, "peak_bytes": peak_bytes(step(name), cfg.device)}

    base_t, base_i = t_train["authors"], t_infer["authors"]
    return {
        "shape": list(cfg.shape),
        "x_bytes": x.numel() * x.element_size(),
        "train_step": {
            name: {**s.as_dict(), "speedup_vs_authors": Ratio.of(base_t, s).as_dict()}
            for name, s in t_train.items()
        },
        "inference": {
            name: {**s.as_dict(), "speedup_vs_authors": Ratio.of(base_i, s).as_dict()}
            for name, s in t_infer.items()
        },
        "memory": memory,
        "checks": checks,
        "notes": notes,
        "speedup_definition": SPEEDUP_NOTE,
    }


def _speed(d: dict[str, Any]) -> str:
    return format_speed(ratio_from(d))


def _mem_ratio(a: int | None, b: int | None) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}x"


def table_vs_authors(
    res: dict[str, Any], *, speed_cell: Callable[[dict[str, Any]], str] | None = None
) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of :func:`run_vs_authors`'s results; ``speed_cell`` formats a speedup
    (default: plain text). The terminal and the generated docs share this one table."""
    speed = speed_cell or _speed
    mem = res["memory"]
    base = mem["authors"]
    cuda = any(m["peak_bytes"] is not None for m in mem.values())
    headers = ["", "time", "vs authors", "kept for backward, MiB", "kept vs authors"]
    if cuda:
        headers += ["peak MiB", "peak vs authors"]
    rows = []
    for name, t in res["train_step"].items():
        m = mem[name]
        ours = name != "authors"
        line = [
            f"train step: {name}",
            format_time(t),
            speed(t["speedup_vs_authors"]) if ours else "baseline",
            format_mib(m["saved_bytes"]),
            _mem_ratio(m["saved_bytes"], base["saved_bytes"]) if ours else "baseline",
        ]
        if cuda:
            line += [
                format_mib(m["peak_bytes"]),
                _mem_ratio(m["peak_bytes"], base["peak_bytes"]) if ours else "baseline",
            ]
        rows.append(line)
    for name, t in res["inference"].items():
        label = "gald (BN folded)" if name == "gald" else name
        line = [
            f"inference: {label}",
            format_time(t),
            speed(t["speedup_vs_authors"]) if name != "authors" else "baseline",
            "",
            "",
        ]
        line += ["", ""] if cuda else []
        rows.append(line)
    return headers, rows


def worst_check(res: dict[str, Any]) -> float:
    """The largest relative L2 difference of :func:`run_vs_authors`'s checks."""
    return max(res["checks"].values()) if res["checks"] else 0.0


def render_vs_authors(res: dict[str, Any], cfg_text: str) -> str:
    title = (
        f"Local Distribution vs the authors' formulation, input {tuple(res['shape'])}, "
        f"{cfg_text} (x itself: {res['x_bytes'] / 2**20:.4g} MiB)"
    )
    foot = (
        f"{SPEEDUP_NOTE}\n"
        "largest relative L2 difference to the authors' outputs and input gradients: "
        f"{worst_check(res):.1e}"
    )
    foot += "".join(f"\n{note}" for note in res.get("notes", ()))
    return f"{title}\n{format_table(*table_vs_authors(res))}\n{foot}"


# --------------------------------------------------------------------------------------------
# The Triton kernels of the fused op

# Tolerances relative to the largest reference magnitude: one rounding of the result for the
# forward and grad_x, a few more for the reduced grad_logits.
RTOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
RTOL_REDUCED = {torch.float32: 1e-4, torch.bfloat16: 8e-3, torch.float16: 1e-3}
# Extra correctness shapes on CUDA, (B, C, H, W, h, w): H or W = 1, logits larger than x, 1x1.
EDGE_CASES = ((1, 3, 1, 7, 2, 3), (1, 3, 5, 1, 3, 2), (2, 3, 6, 5, 11, 9), (2, 4, 33, 70, 1, 1))


def kernels_runnable(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton kernels can run on ``device`` here, and why not."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False, "the Triton kernels run on CUDA, or on CPU under TRITON_INTERPRET=1"
    try:
        t = torch.zeros(1, 1, 2, 2, device=device)
        ld_modulate(t, t[..., :1, :1].contiguous(), impl="triton")
    except Exception as exc:  # Triton's failures vary: compiler, driver, assertion, compilation
        return False, f"impl='triton' does not run here: {type(exc).__name__}: {exc}"
    return True, ""


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().item()
    return (got.double() - want.double()).abs().max().item() / max(scale, 1e-30)


def check_kernel(
    case: tuple[int, int, int, int, int, int],
    dtype: torch.dtype,
    channels_last: bool,
    device: torch.device,
    *,
    align_corners: bool = True,
    offset: float = 1.0,
    seed: int = 0,
    repeat_backward: bool = True,
) -> dict[str, Any]:
    """Triton forward and backward against the float64 plain-ops formula on the same inputs;
    with ``repeat_backward``, whether a second backward is bitwise equal (else ``None``)."""
    b, c, H, W, h, w = case
    gen = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(b, c, H, W, generator=gen).to(device, dtype).contiguous(memory_format=fmt)
    lg = torch.randn(b, c, h, w, generator=gen).to(device, dtype).contiguous(memory_format=fmt)
    g = torch.randn(b, c, H, W, generator=gen).to(device, dtype).contiguous(memory_format=fmt)

    x64 = x.double().requires_grad_()
    l64 = lg.double().requires_grad_()
    want = x64 * (
        offset
        + torch.sigmoid(
            F.interpolate(l64, size=(H, W), mode="bilinear", align_corners=align_corners)
        )
    )
    want_gx, want_gl = torch.autograd.grad(want, (x64, l64), g.double())

    xr = x.detach().requires_grad_()
    lr = lg.detach().requires_grad_()
    out = ld_modulate(xr, lr, offset, align_corners=align_corners, impl="triton")
    gx, gl = torch.autograd.grad(out, (xr, lr), g, retain_graph=repeat_backward)
    deterministic = None
    if repeat_backward:
        gx2, gl2 = torch.autograd.grad(out, (xr, lr), g)
        deterministic = bool(torch.equal(gx, gx2) and torch.equal(gl, gl2))
    errs = {
        "out": _rel_err(out, want),
        "grad_x": _rel_err(gx, want_gx),
        "grad_logits": _rel_err(gl, want_gl),
    }
    ok = (
        out.dtype == dtype
        and gx.dtype == dtype
        and gl.dtype == dtype
        and out.is_contiguous(memory_format=fmt)
        and errs["out"] <= RTOL[dtype]
        and errs["grad_x"] <= RTOL[dtype]
        and errs["grad_logits"] <= RTOL_REDUCED[dtype]
    )
    return {
        "case": list(case),
        "dtype": str(dtype).removeprefix("torch."),
        "memory_format": "channels_last" if channels_last else "NCHW",
        "align_corners": align_corners,
        "offset": offset,
        "rel_err": errs,
        "ok": bool(ok),
        "deterministic": deterministic,
    }


# On CUDA the bandwidth is also measured at a size where the kernels, not the Python launch
# overhead, set the time: a batch of 8 whole Cityscapes images at output stride 8.
LARGE_SHAPE = (8, 512, 129, 257)
# Under the interpreter every program runs in Python: one tiny case (B, C, H, W, h, w).
INTERPRETER_CASE = (1, 2, 6, 7, 3, 2)


def passed(check: dict[str, Any]) -> bool:
    """A kernel check passed: within tolerance, and reproducible where that was checked."""
    return bool(check["ok"]) and check["deterministic"] is not False


def run_kernels(cfg: Config) -> dict[str, Any]:
    """Correctness of the Triton kernels, then their time and bandwidth against a copy.

    On CUDA: every dtype and memory format, at ``cfg.shape`` with both ``align_corners`` and at
    a few edge shapes; timed at ``cfg.shape`` and at :data:`LARGE_SHAPE`. Under the interpreter
    (CPU): :data:`INTERPRETER_CASE` only, every dtype and memory format checked (reproducibility
    is not: the interpreter runs programs one after the other), float32 NCHW timed (those times
    measure the interpreter, not the kernels).
    """
    cuda = cfg.device.type == "cuda"
    b, c, H, W = cfg.shape
    h, w = ld_branch_size(H), ld_branch_size(W)
    if not cuda:
        b, c, H, W, h, w = INTERPRETER_CASE
    checks = []
    for dtype in DTYPES.values():
        for cl in (False, True):
            checks.append(
                check_kernel((b, c, H, W, h, w), dtype, cl, cfg.device, repeat_backward=cuda)
            )
            if cuda:
                checks.append(
                    check_kernel(
                        (b, c, H, W, h, w), dtype, cl, cfg.device, align_corners=False, offset=2.0
                    )
                )
                for i, case in enumerate(EDGE_CASES):
                    checks.append(check_kernel(case, dtype, cl, cfg.device, seed=i + 1))
    cfg.progress.advance(0.0, "kernel checks done")

    skipped = []
    if cuda:
        shapes = [cfg.shape]
        large = large_shape_room(cfg.device)
        if large is None:
            shapes.append(LARGE_SHAPE)
        elif cfg.shape != LARGE_SHAPE:
            skipped.append(large)
        timed = [
            (shape, dtype, cl)
            for shape in dict.fromkeys(shapes)
            for dtype in DTYPES.values()
            for cl in (False, True)
        ]
    else:
        timed = [((b, c, H, W), torch.float32, False)]  # the logits: ld_branch_size(H), (W)
    # three candidates (kernel, plain ops, copy) and two directions per configuration
    expected = 6 * len(timed) * cfg.min_time * 1.2
    cfg.progress.total += expected
    if expected > 20 and not cfg.quiet:
        cfg.say(f"Triton kernels: expected duration about {expected:.0f} s")
    rows = []
    for shape, dtype, cl in timed:
        rows += _bandwidth(cfg, shape, dtype, cl)
    return {
        "shape": [b, c, H, W],
        "logits": [h, w],
        "interpreted": not cuda,  # the times then measure Triton's interpreter
        "checks": checks,
        "bandwidth": rows,
        "skipped": skipped,
        "ratio_definition": KERNEL_NOTE,
    }


# The bandwidth rows keep x, the logits, the incoming gradient, two outputs with their autograd
# graphs and the reference's float32 mask alive at once: about 16 float32 copies of x at most.
LARGE_SHAPE_COPIES = 16


def large_shape_room(device: torch.device) -> str | None:
    """``None`` when the bandwidth rows at :data:`LARGE_SHAPE` fit in the free memory of
    ``device``, else why they are skipped."""
    need = LARGE_SHAPE_COPIES * math.prod(LARGE_SHAPE) * 4
    free, _ = torch.cuda.mem_get_info(device)
    if free >= need:
        return None
    return (
        f"bandwidth at {'x'.join(map(str, LARGE_SHAPE))} skipped: it needs about "
        f"{need / 2**30:.1f} GiB of device memory, {free / 2**30:.1f} GiB are free"
    )


def _bandwidth(
    cfg: Config, shape: tuple[int, int, int, int], dtype: torch.dtype, channels_last: bool
) -> list[dict[str, Any]]:
    b, c, H, W = shape
    h, w = ld_branch_size(H), ld_branch_size(W)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator(device=cfg.device).manual_seed(0)

    def randn(*size: int) -> torch.Tensor:
        t = torch.randn(*size, generator=gen, device=cfg.device, dtype=dtype)
        return t.contiguous(memory_format=fmt)

    x, lg, g = randn(b, c, H, W), randn(b, c, h, w), randn(b, c, H, W)
    n, n_low, isz = x.numel(), lg.numel(), x.element_size()
    xr, lr = x.detach().requires_grad_(), lg.detach().requires_grad_()
    out_k = ld_modulate(xr, lr, impl="triton")
    out_r = ld_modulate(xr, lr, impl="reference")

    def kernel_fwd() -> object:
        with torch.no_grad():
            return ld_modulate(x, lg, impl="triton")

    def ref_fwd() -> object:
        with torch.no_grad():
            return ld_modulate(x, lg, impl="reference")

    def kernel_bwd() -> object:
        return torch.autograd.grad(out_k, (xr, lr), g, retain_graph=True)

    def ref_bwd() -> object:
        return torch.autograd.grad(out_r, (xr, lr), g, retain_graph=True)

    rows = []
    # forward: read x and logits, write out; backward: read g, x, logits, write both gradients
    for direction, fn, ref, nbytes in (
        ("forward", kernel_fwd, ref_fwd, (2 * n + n_low) * isz),
        ("backward", kernel_bwd, ref_bwd, (3 * n + 2 * n_low) * isz),
    ):
        src = torch.empty(max(1, nbytes // 2), dtype=torch.uint8, device=cfg.device)
        dst = torch.empty_like(src)
        fns: dict[str, Callable[[], object]] = {
            "triton": fn,
            "plain ops": ref,
            "copy": functools.partial(dst.copy_, src),
        }
        for f in fns.values():
            f()
        t = measure_interleaved(fns, min_time=cfg.min_time, rounds=cfg.rounds, threads=cfg.threads)
        tk, tc = t["triton"], t["copy"]
        rows.append(
            {
                "shape": list(shape),
                "dtype": str(dtype).removeprefix("torch."),
                "memory_format": "channels_last" if channels_last else "NCHW",
                "direction": direction,
                "bytes": nbytes,
                "triton": tk.as_dict(),
                "plain_ops": t["plain ops"].as_dict(),
                "copy": tc.as_dict(),
                "triton_GBps": nbytes / tk.median / 1e9,
                "copy_GBps": nbytes / tc.median / 1e9,
                "fraction_of_copy": Ratio.of(tc, tk).as_dict(),
                "speedup_vs_plain_ops": Ratio.of(t["plain ops"], tk).as_dict(),
            }
        )
        cfg.progress.advance(3 * cfg.min_time * 1.2, f"bandwidth {direction}")
    return rows


def render_kernels(res: dict[str, Any], cfg_text: str) -> str:
    checks = res["checks"]
    failed = [r for r in checks if not passed(r)]
    worst: dict[str, dict[str, float]] = {}
    for r in checks:
        d = worst.setdefault(r["dtype"], {})
        for k, v in r["rel_err"].items():
            d[k] = max(d.get(k, 0.0), v)
    lines = [
        f"Triton kernels of gald.ops.ld_modulate, input {tuple(res['shape'])}, logits "
        f"{tuple(res['logits'])}, {cfg_text}",
        f"correctness against float64 plain ops: {len(checks) - len(failed)}/{len(checks)} checks "
        "passed (NCHW and channels_last, forward and both gradients"
        + (", backward reproducible" if any(c["deterministic"] for c in checks) else "")
        + "); largest relative errors:",
    ]
    for name, d in worst.items():
        lines.append(f"  {name}: " + ", ".join(f"{k} {v:.1e}" for k, v in d.items()))
    for r in failed:
        lines.append(f"  FAILED: {r}")
    if res.get("interpreted"):
        lines.append(
            "times under Triton's interpreter (TRITON_INTERPRET=1, CPU): they measure the "
            "interpreter running the kernels in Python, not the kernels"
        )
    lines.extend(res.get("skipped", []))
    lines.append(format_table(*kernel_table(res)))
    lines.append(KERNEL_NOTE)
    return "\n".join(lines)


def kernel_table(
    res: dict[str, Any], *, speed_cell: Callable[[dict[str, Any]], str] | None = None
) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the kernels' bandwidth from :func:`run_kernels`'s results;
    ``speed_cell`` formats a speedup (default: plain text)."""
    speed = speed_cell or _speed
    headers = [
        "shape",
        "dtype",
        "format",
        "direction",
        "triton",
        "bandwidth",
        "copy",
        "of copy",
        "plain ops",
        "triton vs plain",
    ]
    body = [
        [
            "x".join(map(str, r["shape"])),
            r["dtype"],
            r["memory_format"],
            r["direction"],
            format_time(r["triton"]),
            format_rate(r["triton_GBps"]),
            format_rate(r["copy_GBps"]),
            format_fraction(r["fraction_of_copy"]["ratio"]),
            format_time(r["plain_ops"]),
            speed(r["speedup_vs_plain_ops"]),
        ]
        for r in res["bandwidth"]
    ]
    return headers, body


__all__ = [
    "AuthorsLD",
    "check_kernel",
    "kernel_table",
    "kernels_runnable",
    "render_kernels",
    "render_vs_authors",
    "run_kernels",
    "run_vs_authors",
    "table_vs_authors",
]
