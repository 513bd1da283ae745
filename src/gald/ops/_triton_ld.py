"""Triton kernels of the fused Local Distribution modulation (forward and backward).

The op is ``out = x * (offset + m)`` with ``m = sigmoid(Up(logits, (H, W)))``, where ``x`` is
(B, C, H, W), ``logits`` is the low-resolution (B, C, h, w) mask and ``Up`` is bilinear
interpolation exactly as ``F.interpolate(..., mode="bilinear", align_corners=...)`` computes it.

Layouts: every kernel takes the strides of every tensor, so NCHW, channels_last and strided
views are read and written in place (no ``.contiguous()`` copies). The tiles follow the memory
order of ``x``: for NCHW a program covers a (rows x columns) tile of one (b, c) plane; for
channels_last a (columns x channels) tile of one (b, row), so both read coalesced memory.
Outputs are ``torch.empty_like`` of the matching input (same strides for dense inputs).

Forward: one pass over ``x``. Each program recomputes the bilinear mask of its tile in
registers from the (cache-resident) logits and writes ``out``. Memory traffic: read ``x``,
write ``out``, the logits once per tile.

Backward: one pass over ``x`` and ``grad_out`` (``g``). With ``m`` recomputed as in the forward,

    grad_x      = g * (offset + m)
    grad_logits = A_H^T (g * x * m * (1 - m)) A_W

(``Up(L) = A_H L A_W^T`` with the (H, h) and (W, w) interpolation matrices). The kernel writes
``grad_x`` and reduces ``T = g * x * m * (1 - m)`` along ``W``: ``U = T A_W``, a (B, C, H, w)
map (stored (B, H, w, C) for channels_last) in fp32. A program owns a block of rows (NCHW) or
of channels of one row (channels_last) and walks the columns in tiles; a tile of ``BLOCK_J``
columns touches a window of at most ``WIN`` low-resolution columns, so its contribution is one
small ``tl.dot`` with the dense (BLOCK_J, WIN) slice of ``A_W``, added into the window with a
load-add-store. The remaining small product ``A_H^T U`` is one batched matmul on the host.

Determinism: a program is the only one touching its rows of ``U`` and visits its tiles in a
fixed order; there are no atomics, so the kernels are bitwise reproducible. The host matmul is a
cuBLAS call (deterministic for a given GPU and library; it runs in TF32 if the user enabled TF32
matmuls, ``torch.backends.cuda.matmul.allow_tf32``).

Precision: interpolation, sigmoid, products and reductions run in fp32 for fp32, fp16 and bf16
inputs and in fp64 for fp64 inputs; results are rounded once to the input dtype. The source
coordinate scale is divided in IEEE round-to-nearest, as PyTorch's C++ code does.

Index math (PyTorch's convention, see ``area_pixel_compute_source_index`` in ATen), for a
destination index ``d`` in an output of size ``out`` read from an input of size ``in``:

- ``align_corners=True``:  ``src = d * (in - 1) / (out - 1)``, and ``src = 0`` when ``out == 1``;
- ``align_corners=False``: ``src = max((d + 0.5) * in / out - 0.5, 0)``;

then ``i0 = min(floor(src), in - 1)``, ``i1 = i0 + (i0 < in - 1)`` (the upper neighbour clamped
to ``in - 1``), ``lambda = src - i0`` and the value is ``(1 - lambda) * v[i0] + lambda * v[i1]``.

Launches run under ``torch.cuda.device(x.device)``, so tensors on any GPU work whatever the
current device is.

Complexity: time O(B·C·H·W) for both directions (the backward's window product adds ``WIN``
multiply-adds per element, 16 for an 8x upsampling); extra memory O(B·C·H·w) for ``U``.

Reference: X. Li et al., "Global Aggregation then Local Distribution in Fully Convolutional
Networks", BMVC 2019; this is the modulation step of its Local Distribution module.

This module imports cleanly without triton; ``TRITON_AVAILABLE`` says whether the kernels exist.
The public entry points for callers outside the op (benchmarks, checks) are
:func:`ld_modulate_fwd_triton` and :func:`ld_modulate_bwd_triton`.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .._amp import autocast_off, compute_dtype
from .._validate import check_feature
from ._interp import interp_matrix

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # the kernels are optional (extra ``gald[triton]``)
    TRITON_AVAILABLE = False

__all__ = [
    "TRITON_AVAILABLE",
    "ld_modulate_bwd_triton",
    "ld_modulate_fwd_triton",
    "unsupported_dtype",
]

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# ``tl.dot`` of float64 (the backward's window product) compiles from triton 3.5 on
_FP64_MIN_TRITON = (3, 5)


def _triton_version() -> tuple[int, int]:
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def unsupported_dtype(dtype: torch.dtype) -> str | None:
    """Why the installed triton cannot run the kernels in ``dtype``, or ``None`` if it can."""
    if dtype not in _SUPPORTED_DTYPES:
        return f"x must be float32, float64, float16 or bfloat16, got {dtype}"
    if dtype == torch.float64 and TRITON_AVAILABLE and _triton_version() < _FP64_MIN_TRITON:
        need = ".".join(map(str, _FP64_MIN_TRITON))
        return (
            f"float64 needs triton >= {need} (tl.dot of float64), this is triton "
            f"{triton.__version__}"
        )
    return None


# Forward tiles: up to this many elements along the contiguous axis, about this many per program.
_FWD_MAX_INNER = 128
_FWD_TILE_ELEMS = 2048
# Backward tiles: ``tl.dot`` needs every dimension >= 16.
_BWD_MIN_BLOCK = 16
_BWD_MAX_BLOCK = 64  # columns per tile, and channels per program for channels_last
_BWD_MAX_ROWS = 32  # rows per program for NCHW
# the backward's low-resolution window: the (BLOCK_J, WIN) weight tile and its tl.dot live in
# shared memory, which a window grown with the logits' width would exhaust (logits over about
# 8x wider than x); such a backward runs the torch kernel instead (see bwd_window_fits)
_BWD_MAX_WIN = 128
_NUM_WARPS = 4


if TRITON_AVAILABLE:
    # The kernels call only triton.language *builtins* (no tl.sigmoid, ...: those are themselves
    # @triton.jit functions, compiled or interpreted depending on TRITON_INTERPRET at the time
    # triton was imported), so a copy of this module loaded with TRITON_INTERPRET=1 runs in the
    # interpreter even when triton was imported without it (see the tests).

    @triton.jit
    def _div_rn(a, b):
        """``a / b`` rounded to nearest, as C++ computes it (fp32 ``/`` may be approximate)."""
        if a.dtype == tl.float64:
            return a / b  # fp64 division is IEEE; the precise-division op exists for fp32 only
        return tl.fdiv(a, b, ieee_rounding=True)

    @triton.jit
    def _source_index(dst, in_size, out_size, ALIGN_CORNERS: tl.constexpr, CDT: tl.constexpr):
        """Bilinear source neighbours ``(i0, i1)`` and weight ``lambda`` of the indices ``dst``
        (int32, any shape) along an axis of output size ``out_size`` and input size ``in_size``."""
        d = tl.cast(dst, CDT)
        in_f = tl.cast(in_size, CDT)
        if ALIGN_CORNERS:
            # when out == 1 the only d is 0 and src = 0 whatever the scale: max() avoids 0/0
            den = tl.cast(tl.maximum(out_size - 1, 1), CDT)
            scale = _div_rn(in_f - 1.0, den)
            src = scale * d
        else:
            scale = _div_rn(in_f, tl.cast(out_size, CDT))
            src = tl.maximum(scale * (d + 0.5) - 0.5, 0.0)
        # src >= 0, so truncation is floor; clamp the lower neighbour into the input
        i0 = tl.minimum(src.to(tl.int32), in_size - 1)
        i1 = i0 + (i0 < in_size - 1).to(tl.int32)
        lam = tl.minimum(tl.maximum(src - i0.to(CDT), 0.0), 1.0)
        return i0, i1, lam

    @triton.jit
    def _tile_mask(
        l_ptr,
        b,
        c,
        i,
        j,
        valid,
        h,
        w,
        H,
        W,
        slb,
        slc,
        slh,
        slw,
        ALIGN_CORNERS: tl.constexpr,
        CDT: tl.constexpr,
    ):
        """``sigmoid(Up(logits))`` at the (broadcastable) indices ``b, c, i, j``, in ``CDT``.

        Same summation order as ATen: ``(1-ly)*((1-lx)*v00 + lx*v01) + ly*((1-lx)*v10 + lx*v11)``.
        """
        y0, y1, ly = _source_index(i, h, H, ALIGN_CORNERS, CDT)
        x0, x1, lx = _source_index(j, w, W, ALIGN_CORNERS, CDT)
        base = b.to(tl.int64) * slb + c.to(tl.int64) * slc
        r0 = base + y0.to(tl.int64) * slh
        r1 = base + y1.to(tl.int64) * slh
        c0 = x0.to(tl.int64) * slw
        c1 = x1.to(tl.int64) * slw
        v00 = tl.load(l_ptr + r0 + c0, mask=valid, other=0.0).to(CDT)
        v01 = tl.load(l_ptr + r0 + c1, mask=valid, other=0.0).to(CDT)
        v10 = tl.load(l_ptr + r1 + c0, mask=valid, other=0.0).to(CDT)
        v11 = tl.load(l_ptr + r1 + c1, mask=valid, other=0.0).to(CDT)
        z = (1.0 - ly) * ((1.0 - lx) * v00 + lx * v01) + ly * ((1.0 - lx) * v10 + lx * v11)
        return 1.0 / (1.0 + tl.exp(-z))

    @triton.jit
    def _offsets(b, c, i, j, sb, sc, sh, sw):
        """64-bit element offsets of the (broadcastable) indices for the given strides."""
        return b.to(tl.int64) * sb + c.to(tl.int64) * sc + i.to(tl.int64) * sh + j.to(tl.int64) * sw

    # Sizes are never specialised (H == 1 or w == 1 are legal and common enough that they must
    # not multiply compilations); strides are, so a unit stride is known to the compiler.
    @triton.jit(do_not_specialize=["C", "H", "W", "h", "w", "tiles_a", "tiles_b"])
    def _ld_fwd_kernel(
        x_ptr,
        l_ptr,
        out_ptr,
        off_ptr,
        C,
        H,
        W,
        h,
        w,
        sxb,
        sxc,
        sxh,
        sxw,
        sob,
        soc,
        soh,
        sow,
        slb,
        slc,
        slh,
        slw,
        tiles_a,
        tiles_b,
        ALIGN_CORNERS: tl.constexpr,
        CDT: tl.constexpr,
        CHANNELS_INNER: tl.constexpr,
        BLOCK_A: tl.constexpr,
        BLOCK_B: tl.constexpr,
    ):
        """``out = x * (offset + sigmoid(Up(logits)))`` on one (BLOCK_A, BLOCK_B) tile.

        NCHW tiles (``CHANNELS_INNER`` false): rows x columns of one (b, c) plane.
        channels_last tiles: columns x channels of one (b, row).
        """
        pid = tl.program_id(0)
        outer = pid // (tiles_a * tiles_b)
        tile = pid % (tiles_a * tiles_b)
        ra = (tile // tiles_b) * BLOCK_A + tl.arange(0, BLOCK_A)
        rb = (tile % tiles_b) * BLOCK_B + tl.arange(0, BLOCK_B)
        if CHANNELS_INNER:
            b = outer // H
            i = outer % H
            j = ra[:, None]
            c = rb[None, :]
            valid = (j < W) & (c < C)
        else:
            b = outer // C
            c = outer % C
            i = ra[:, None]
            j = rb[None, :]
            valid = (i < H) & (j < W)
        m = _tile_mask(l_ptr, b, c, i, j, valid, h, w, H, W, slb, slc, slh, slw, ALIGN_CORNERS, CDT)
        xv = tl.load(x_ptr + _offsets(b, c, i, j, sxb, sxc, sxh, sxw), mask=valid, other=0.0)
        out = xv.to(CDT) * (tl.load(off_ptr).to(CDT) + m)
        o_idx = _offsets(b, c, i, j, sob, soc, soh, sow)
        tl.store(out_ptr + o_idx, out.to(out_ptr.dtype.element_ty), mask=valid)

    @triton.jit(do_not_specialize=["C", "H", "W", "h", "w", "blocks"])
    def _ld_bwd_kernel(
        g_ptr,
        x_ptr,
        l_ptr,
        gx_ptr,
        u_ptr,
        off_ptr,
        C,
        H,
        W,
        h,
        w,
        sgb,
        sgc,
        sgh,
        sgw,
        sxb,
        sxc,
        sxh,
        sxw,
        sob,
        soc,
        soh,
        sow,
        slb,
        slc,
        slh,
        slw,
        blocks,
        ALIGN_CORNERS: tl.constexpr,
        CDT: tl.constexpr,
        CHANNELS_INNER: tl.constexpr,
        NEED_X_GRAD: tl.constexpr,
        BLOCK_A: tl.constexpr,
        BLOCK_J: tl.constexpr,
        WIN: tl.constexpr,
    ):
        """``grad_x`` (optional) and ``U = (g * x * m * (1 - m)) A_W`` for one block.

        NCHW: a program owns ``BLOCK_A`` rows of one (b, c) plane; ``u_ptr`` is a zeroed
        contiguous (B, C, H, w) buffer. channels_last: ``BLOCK_A`` channels of one (b, row);
        ``u_ptr`` is a zeroed contiguous (B, H, w, C) buffer. Columns are visited in a fixed
        order, each tile adding into a window of ``WIN`` low-resolution columns.
        """
        pid = tl.program_id(0)
        outer = pid // blocks
        blk = pid % blocks
        ra = blk * BLOCK_A + tl.arange(0, BLOCK_A)
        kw = tl.arange(0, WIN)
        off = tl.load(off_ptr).to(CDT)
        if CHANNELS_INNER:
            b = outer // H
            i = outer % H
        else:
            b = outer // C
            c = outer % C
        for jt in range(0, W, BLOCK_J):
            rj = jt + tl.arange(0, BLOCK_J)
            if CHANNELS_INNER:
                j = rj[:, None]
                c = ra[None, :]
                valid = (j < W) & (c < C)
            else:
                i = ra[:, None]
                j = rj[None, :]
                valid = (i < H) & (j < W)
            m = _tile_mask(
                l_ptr, b, c, i, j, valid, h, w, H, W, slb, slc, slh, slw, ALIGN_CORNERS, CDT
            )
            gv = tl.load(g_ptr + _offsets(b, c, i, j, sgb, sgc, sgh, sgw), mask=valid, other=0.0)
            gv = gv.to(CDT)
            if NEED_X_GRAD:
                gx = gv * (off + m)
                gx_idx = _offsets(b, c, i, j, sob, soc, soh, sow)
                tl.store(gx_ptr + gx_idx, gx.to(gx_ptr.dtype.element_ty), mask=valid)
            xv = tl.load(x_ptr + _offsets(b, c, i, j, sxb, sxc, sxh, sxw), mask=valid, other=0.0)
            # d out / d z = x * m * (1 - m); zero outside the tensor (g and x load as 0)
            t = gv * xv.to(CDT) * m * (1.0 - m)
            # the window of low-resolution columns this tile reaches starts at its first
            # column's lower neighbour (the host's WIN covers the rest)
            q0, _, _ = _source_index(jt, w, W, ALIGN_CORNERS, CDT)
            x0, x1, lx = _source_index(rj, w, W, ALIGN_CORNERS, CDT)
            q = q0 + kw
            if CHANNELS_INNER:
                # A_W[tile, window]^T as a dense (WIN, BLOCK_J) matrix; part is (WIN, BLOCK_A)
                awt = tl.where(kw[:, None] == (x0 - q0)[None, :], 1.0 - lx[None, :], 0.0)
                awt += tl.where(kw[:, None] == (x1 - q0)[None, :], lx[None, :], 0.0)
                part = tl.dot(awt.to(CDT), t, input_precision="ieee", out_dtype=CDT)
                u_idx = ((b.to(tl.int64) * H + i) * w + q[:, None]) * C + ra[None, :]
                u_mask = (q < w)[:, None] & (ra < C)[None, :]
            else:
                # A_W[tile, window] as a dense (BLOCK_J, WIN) matrix; part is (BLOCK_A, WIN)
                aw = tl.where((x0 - q0)[:, None] == kw[None, :], 1.0 - lx[:, None], 0.0)
                aw += tl.where((x1 - q0)[:, None] == kw[None, :], lx[:, None], 0.0)
                part = tl.dot(t, aw.to(CDT), input_precision="ieee", out_dtype=CDT)
                u_idx = (outer.to(tl.int64) * H + ra[:, None]) * w + q[None, :]
                u_mask = (ra < H)[:, None] & (q < w)[None, :]
            acc = tl.load(u_ptr + u_idx, mask=u_mask, other=0.0)
            tl.store(u_ptr + u_idx, acc + part, mask=u_mask)
            # the next tile's window overlaps this one and may sit on other threads
            tl.debug_barrier()


def _compute_dtype(dtype: torch.dtype) -> object:
    """The Triton spelling of :func:`gald._amp.compute_dtype` (the one place that decides)."""
    return {torch.float32: tl.float32, torch.float64: tl.float64}[compute_dtype(dtype)]


def _offset_tensor(offset: float, x: torch.Tensor) -> torch.Tensor:
    """``offset`` as a one-element tensor of the compute dtype on the device of ``x``.

    A Python float kernel argument is passed as fp32, which would round ``offset`` for fp64
    inputs; a pointer to a value of the compute dtype keeps it exact for every dtype.
    """
    return torch.full((1,), offset, dtype=compute_dtype(x.dtype), device=x.device)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _channels_inner(t: torch.Tensor) -> bool:
    """Whether ``t`` is laid out channels-last (tiles then run along channels)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _scale(in_size: int, out_size: int, align_corners: bool) -> float:
    """How many input pixels one output pixel step spans (host copy of the kernel's scale)."""
    if align_corners:
        return (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    return in_size / out_size


def _window(block: int, in_size: int, out_size: int, align_corners: bool) -> int:
    """Low-res window (power of two, >= 16) that covers every neighbour of ``block`` outputs.

    ``block`` consecutive outputs have sources spread over ``(block - 1) * scale``; the floor adds
    at most one index, the upper neighbour one more, and one more covers rounding in ``src``.
    """
    span = math.ceil((block - 1) * _scale(in_size, out_size, align_corners)) + 3
    return max(_BWD_MIN_BLOCK, _pow2(min(span, in_size + 2)))


def bwd_window_fits(W: int, w: int, align_corners: bool) -> bool:
    """Whether the Triton backward takes logits ``w`` columns wide for an ``x`` ``W`` wide: its
    window of logits columns stays within :data:`_BWD_MAX_WIN` (up to about 8x wider)."""
    return _window(_BWD_MIN_BLOCK, w, W, align_corners) <= _BWD_MAX_WIN


def _bwd_tiles(C: int, H: int, W: int, w: int, align_corners: bool, channels_inner: bool):
    """(BLOCK_A, BLOCK_J, WIN) of the backward; the column tile shrinks when windows grow."""
    block_j = min(max(_pow2(W), _BWD_MIN_BLOCK), _BWD_MAX_BLOCK)
    # downsampling (w > W) widens the window: keep the (BLOCK_J, WIN) weight matrix bounded
    while block_j > _BWD_MIN_BLOCK and _window(block_j, w, W, align_corners) > block_j:
        block_j //= 2
    along = C if channels_inner else H
    block_a = min(
        max(_pow2(along), _BWD_MIN_BLOCK), _BWD_MAX_BLOCK if channels_inner else _BWD_MAX_ROWS
    )
    return block_a, block_j, _window(block_j, w, W, align_corners)


def _check(
    tensors: dict[str, torch.Tensor], x: torch.Tensor, logits: torch.Tensor, who: str
) -> None:
    check_feature(x, None, name="x", who=who)
    check_feature(logits, None, name="logits", who=who)
    reason = unsupported_dtype(x.dtype)
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{who}: {reason}")
    if reason is not None:  # a supported dtype this triton cannot compile
        raise RuntimeError(f"{who}: {reason}; use impl='torch'")
    if logits.shape[:2] != x.shape[:2]:
        raise ValueError(
            f"{who}: logits must be (B, C, h, w) with the (B, C) of x = {tuple(x.shape[:2])}, "
            f"got shape {tuple(logits.shape)}"
        )
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != x.dtype:
            raise TypeError(f"{who}: {name} must have the dtype of x ({x.dtype}), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(
                f"{who}: {name} must be on the device of x ({x.device}), got {t.device}"
            )


def _require_triton(who: str) -> None:
    if not TRITON_AVAILABLE:
        raise RuntimeError(f"{who}: triton is not installed (pip install 'gald[triton]')")


def _interpreted() -> bool:
    """Whether this module's kernels run in Triton's interpreter (``TRITON_INTERPRET=1``)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_ld_fwd_kernel, InterpretedFunction)


def _require_device(x: torch.Tensor, who: str) -> None:
    if not x.is_cuda and not _interpreted():
        raise RuntimeError(
            f"{who}: the Triton kernels run on CUDA tensors (or on CPU under Triton's "
            f"interpreter, TRITON_INTERPRET=1), got a tensor on {x.device}; use impl='torch'"
        )


def _on_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make the device of ``x`` current while launching (the interpreter runs on CPU tensors)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def ld_modulate_fwd_triton(
    x: torch.Tensor, logits: torch.Tensor, offset: float, align_corners: bool
) -> torch.Tensor:
    """Triton forward of ``x * (offset + sigmoid(Up(logits, x.shape[-2:])))``.

    Args:
        x: (B, C, H, W) tensor, fp32, fp64, fp16 or bf16, any strides.
        logits: (B, C, h, w) tensor of the dtype and device of ``x``, any strides.
        offset: the constant added to the mask.
        align_corners: the ``F.interpolate`` flag of ``Up``.

    Returns:
        ``torch.empty_like(x)`` filled with the result (the memory format of ``x``).
    """
    who = "ld_modulate_fwd_triton"
    _check({"x": x, "logits": logits}, x, logits, who)
    _require_triton(who)
    _require_device(x, who)
    out = torch.empty_like(x)
    with _on_device(x):
        _launch_fwd(x, logits, out, float(offset), bool(align_corners))
    return out


def _launch_fwd(
    x: torch.Tensor, logits: torch.Tensor, out: torch.Tensor, offset: float, align_corners: bool
) -> None:
    """``out = x * (offset + sigmoid(Up(logits)))``; tiles follow the layout of ``out``."""
    b, c, H, W = x.shape
    h, w = logits.shape[-2:]
    if out.numel() == 0:
        return
    channels_inner = _channels_inner(out)
    if channels_inner:  # (columns x channels) tiles of one (b, row)
        block_b = min(_pow2(c), _FWD_MAX_INNER)
        block_a = min(_pow2(W), max(1, _FWD_TILE_ELEMS // block_b))
        tiles_a, tiles_b, outer = triton.cdiv(W, block_a), triton.cdiv(c, block_b), b * H
    else:  # (rows x columns) tiles of one (b, c) plane
        block_b = min(_pow2(W), _FWD_MAX_INNER)
        block_a = min(_pow2(H), max(1, _FWD_TILE_ELEMS // block_b))
        tiles_a, tiles_b, outer = triton.cdiv(H, block_a), triton.cdiv(W, block_b), b * c
    _ld_fwd_kernel[(outer * tiles_a * tiles_b,)](
        x,
        logits,
        out,
        _offset_tensor(offset, x),
        c,
        H,
        W,
        h,
        w,
        *x.stride(),
        *out.stride(),
        *logits.stride(),
        tiles_a,
        tiles_b,
        ALIGN_CORNERS=align_corners,
        CDT=_compute_dtype(x.dtype),
        CHANNELS_INNER=channels_inner,
        BLOCK_A=block_a,
        BLOCK_B=block_b,
        num_warps=_NUM_WARPS,
        enable_fp_fusion=True,
    )


def ld_modulate_bwd_triton(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    logits: torch.Tensor,
    offset: float,
    align_corners: bool,
    need_x_grad: bool,
    need_logits_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Triton backward of :func:`ld_modulate_fwd_triton`; returns ``(grad_x, grad_logits)``.

    ``grad_x = grad_out * (offset + m)`` and ``grad_logits = Up^T(grad_out * x * m * (1 - m))``
    with ``m = sigmoid(Up(logits))`` recomputed (nothing full-resolution is saved). Either is
    ``None`` when not requested. ``grad_logits`` is accumulated in fp32 (fp64 for fp64 inputs)
    without atomics. ``grad_x`` is ``empty_like(x)``, ``grad_logits`` ``empty_like(logits)``.

    Args:
        grad_out: (B, C, H, W), dtype and device of ``x``, any strides.
        x: (B, C, H, W), fp32, fp64, fp16 or bf16, any strides.
        logits: (B, C, h, w), dtype and device of ``x``, any strides.
        offset: the constant added to the mask in the forward.
        align_corners: the ``F.interpolate`` flag of ``Up``.
        need_x_grad: compute ``grad_x``.
        need_logits_grad: compute ``grad_logits``.
    """
    who = "ld_modulate_bwd_triton"
    _check({"grad_out": grad_out, "x": x, "logits": logits}, x, logits, who)
    if grad_out.shape != x.shape:
        raise ValueError(
            f"{who}: grad_out must have the shape of x {tuple(x.shape)}, "
            f"got {tuple(grad_out.shape)}"
        )
    _require_triton(who)
    _require_device(x, who)
    offset = float(offset)
    align_corners = bool(align_corners)
    grad_x = torch.empty_like(x) if need_x_grad else None
    if not need_logits_grad:
        if grad_x is not None:
            # grad_x has the forward's formula with x replaced by grad_out
            with _on_device(x):
                _launch_fwd(grad_out, logits, grad_x, offset, align_corners)
        return grad_x, None

    b, c, H, W = x.shape
    h, w = logits.shape[-2:]
    if not bwd_window_fits(W, w, align_corners):
        raise ValueError(
            f"{who}: logits {w} columns wide for an x {W} wide need a backward window over "
            f"{_BWD_MAX_WIN} columns; the op runs the torch kernel for such a backward"
        )
    grad_logits = torch.empty_like(logits)
    channels_inner = _channels_inner(x)
    acc = compute_dtype(x.dtype)
    u_shape = (b, H, w, c) if channels_inner else (b, c, H, w)
    u = torch.zeros(u_shape, dtype=acc, device=x.device)
    with _on_device(x):
        if x.numel() > 0:
            block_a, block_j, win = _bwd_tiles(c, H, W, w, align_corners, channels_inner)
            blocks = triton.cdiv(c if channels_inner else H, block_a)
            outer = b * H if channels_inner else b * c
            _ld_bwd_kernel[(outer * blocks,)](
                grad_out,
                x,
                logits,
                grad_x if grad_x is not None else x,  # never written when NEED_X_GRAD is False
                u,
                _offset_tensor(offset, x),
                c,
                H,
                W,
                h,
                w,
                *grad_out.stride(),
                *x.stride(),
                *(grad_x.stride() if grad_x is not None else x.stride()),
                *logits.stride(),
                blocks,
                ALIGN_CORNERS=align_corners,
                CDT=_compute_dtype(x.dtype),
                CHANNELS_INNER=channels_inner,
                NEED_X_GRAD=grad_x is not None,
                BLOCK_A=block_a,
                BLOCK_J=block_j,
                WIN=win,
                num_warps=_NUM_WARPS,
                enable_fp_fusion=True,
            )
        # the reduction along H: (h, H) @ U, one batched product of small maps
        a_h = interp_matrix(H, h, align_corners=align_corners, dtype=acc, device=x.device)
        with autocast_off(x.device.type):
            if channels_inner:
                red = torch.matmul(a_h.t(), u.view(b, H, w * c)).view(b, h, w, c)
                grad_logits.copy_(red.permute(0, 3, 1, 2))
            else:
                grad_logits.copy_(torch.matmul(a_h.t(), u))
    return grad_x, grad_logits
