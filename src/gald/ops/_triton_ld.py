"""Triton kernels of the fused Local Distribution modulation (forward and backward).

The op is ``out = x * (offset + m)`` with ``m = sigmoid(Up(logits, (H, W)))``, where ``x`` is
(B, C, H, W), ``logits`` is the low-resolution (B, C, h, w) mask and ``Up`` is bilinear
interpolation exactly as ``F.interpolate(..., mode="bilinear", align_corners=...)`` computes it.

Forward: one pass over ``x``. Each program handles one 2-D tile of one (b, c) plane, recomputes
the bilinear mask of that tile in registers from the (cache-resident) low-resolution logits and
writes ``out``. Memory traffic: read ``x``, write ``out``, and the logits once per tile.

Backward: one pass over ``x`` and ``grad_out`` (``g``). With ``m`` recomputed as in the forward,

    grad_x      = g * (offset + m)
    grad_logits = Up^T(g * x * m * (1 - m))

where ``Up^T`` is the adjoint of bilinear upsampling. Up is separable, ``Up(L) = A_y L A_x^T``
with interpolation matrices ``A_y`` (H, h) and ``A_x`` (W, w), so ``Up^T(T) = A_y^T T A_x``.
For a tile of rows ``i`` and columns ``j`` only a small window of low-resolution rows and
columns receives weight, so each tile contributes ``A_y[tile, win]^T @ T[tile] @ A_x[tile, win]``,
two small matmuls (``tl.dot`` in IEEE precision) into a (WIN_H, WIN_W) window.

Determinism: the backward is **deterministic** (bitwise reproducible from run to run). One
program owns one (b, c) plane and walks its tiles in a fixed order, adding each window into the
plane's low-resolution gradient with a plain load-add-store (followed by a barrier), so there
are no atomics and no cross-program reductions. The price is parallelism: the backward runs
B·C programs, so with few planes (B·C well below a few hundred) and large H·W it cannot fill a
large GPU. When only ``grad_x`` is needed the backward is the forward kernel applied to ``g``
(``grad_x`` has the same formula as ``out`` with ``x -> g``).

Precision: interpolation, sigmoid, products and reductions run in fp32 for fp32, fp16 and bf16
inputs and in fp64 for fp64 inputs; results are rounded once to the input dtype. The source
coordinate scale is divided in IEEE round-to-nearest, as PyTorch's C++ code does; results then
match ``F.interpolate`` + ``torch.sigmoid`` to rounding (the compiler may fuse a multiply-add).

Index math (PyTorch's convention, see ``area_pixel_compute_source_index`` in ATen), for a
destination index ``d`` in an output of size ``out`` read from an input of size ``in``:

- ``align_corners=True``:  ``src = d * (in - 1) / (out - 1)``, and ``src = 0`` when ``out == 1``;
- ``align_corners=False``: ``src = max((d + 0.5) * in / out - 0.5, 0)``;

then ``i0 = min(floor(src), in - 1)``, ``i1 = i0 + (i0 < in - 1)`` (the upper neighbour clamped
to ``in - 1``), ``lambda = src - i0`` and the value is ``(1 - lambda) * v[i0] + lambda * v[i1]``.

Complexity: time O(B·C·H·W) for both directions; the backward's two window matmuls add
BH·WIN_W·(BW + WIN_H) multiply-adds per tile of BH x BW pixels (about 20 per pixel with the
default tiles and an 8x upsampling). Extra memory: O(B·C·h·w) for the fp32 (fp64) accumulation
buffer of ``grad_logits``; nothing full-resolution besides the outputs.

Reference: X. Li et al., "Global Aggregation then Local Distribution in Fully Convolutional
Networks", BMVC 2019; this is the modulation step of its Local Distribution module.

This module imports cleanly without triton; ``TRITON_AVAILABLE`` says whether the kernels exist.
"""

from __future__ import annotations

import math

import torch

from .._validate import check_feature

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # the kernels are optional (extra ``gald[triton]``)
    TRITON_AVAILABLE = False

__all__ = ["TRITON_AVAILABLE", "ld_modulate_bwd_triton", "ld_modulate_fwd_triton"]

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# Forward tiles: a whole row up to this width, and about this many pixels per program.
_FWD_MAX_BLOCK_W = 128
_FWD_TILE_PIXELS = 2048
# Backward tiles: ``tl.dot`` needs every dimension >= 16; the window matmuls grow with the tile.
_BWD_MIN_BLOCK = 16
_BWD_MAX_BLOCK_W = 64
_BWD_TILE_PIXELS = 2048
# 8 warps keep both kernels free of register spills on sm_80/sm_90 with the tiles above (ptxas:
# forward about 73 registers per thread in fp32, backward about 128 in fp32 and 236 in fp64).
# Multiply-adds may be fused (Triton's default until 3.9, stated so it does not change with it).
_NUM_WARPS = 8


if TRITON_AVAILABLE:
    # The kernels call only triton.language *builtins* (no tl.min, tl.sigmoid, ...: those are
    # themselves @triton.jit functions, compiled or interpreted depending on TRITON_INTERPRET at
    # the time triton was imported), so a copy of this module loaded with TRITON_INTERPRET=1
    # runs in the interpreter even when triton was imported without it (see the tests).

    @triton.jit
    def _div_rn(a, b):
        """``a / b`` rounded to nearest, as C++ computes it (fp32 ``/`` may be approximate)."""
        if a.dtype == tl.float64:
            return a / b  # fp64 division is IEEE; the precise-division op exists for fp32 only
        return tl.fdiv(a, b, ieee_rounding=True)

    @triton.jit
    def _source_index(dst, in_size, out_size, ALIGN_CORNERS: tl.constexpr, CDT: tl.constexpr):
        """Bilinear source neighbours ``(i0, i1)`` and weight ``lambda`` of each index in ``dst``.

        ``dst`` is an int32 tensor (or scalar) of destination indices along one axis (size
        ``out_size``) of the output; ``in_size`` is the matching input size. Arithmetic is in
        ``CDT``.
        """
        d = tl.cast(dst, CDT)
        in_f = tl.cast(in_size, CDT)
        if ALIGN_CORNERS:
            # src = d * (in - 1) / (out - 1). When out == 1 the only d is 0, so src = 0 whatever
            # the scale is; dividing by max(out - 1, 1) avoids a 0/0 without a branch.
            den = tl.cast(tl.maximum(out_size - 1, 1), CDT)
            scale = _div_rn(in_f - 1.0, den)
            src = scale * d
        else:
            # src = (d + 0.5) * in / out - 0.5, clamped at 0 (no negative coordinates).
            scale = _div_rn(in_f, tl.cast(out_size, CDT))
            src = tl.maximum(scale * (d + 0.5) - 0.5, 0.0)
        # src >= 0, so truncation is floor; clamp the lower neighbour into the input.
        i0 = tl.minimum(src.to(tl.int32), in_size - 1)
        # The upper neighbour is i0 + 1 except on the last input row/column.
        i1 = i0 + (i0 < in_size - 1).to(tl.int32)
        lam = tl.minimum(tl.maximum(src - i0.to(CDT), 0.0), 1.0)
        return i0, i1, lam

    @triton.jit
    def _upsampled_sigmoid(
        l_base,
        y0,
        y1,
        ly,
        x0,
        x1,
        lx,
        w,
        valid,
        CDT: tl.constexpr,
    ):
        """``sigmoid`` of the bilinear interpolation of one logits plane on a tile.

        ``(y0, y1, ly)`` are (BH,) row neighbours/weights, ``(x0, x1, lx)`` (BW,) column ones;
        ``l_base`` points at the plane, whose rows have ``w`` elements. Same summation order as
        ATen: ``(1-ly)*((1-lx)*v00 + lx*v01) + ly*((1-lx)*v10 + lx*v11)``.
        """
        r0 = (y0 * w)[:, None]
        r1 = (y1 * w)[:, None]
        c0 = x0[None, :]
        c1 = x1[None, :]
        v00 = tl.load(l_base + r0 + c0, mask=valid, other=0.0).to(CDT)
        v01 = tl.load(l_base + r0 + c1, mask=valid, other=0.0).to(CDT)
        v10 = tl.load(l_base + r1 + c0, mask=valid, other=0.0).to(CDT)
        v11 = tl.load(l_base + r1 + c1, mask=valid, other=0.0).to(CDT)
        wx1 = lx[None, :]
        wx0 = 1.0 - wx1
        wy1 = ly[:, None]
        wy0 = 1.0 - wy1
        z = wy0 * (wx0 * v00 + wx1 * v01) + wy1 * (wx0 * v10 + wx1 * v11)
        return 1.0 / (1.0 + tl.exp(-z))

    # Sizes are never specialised on the value 1 (H == 1 or h == 1 are legal and must not turn
    # the size arguments into compile-time constants); alignment specialisation stays on.
    @triton.jit(do_not_specialize=["H", "W", "h", "w", "tiles_w", "tiles_per_plane"])
    def _ld_fwd_kernel(
        x_ptr,
        l_ptr,
        out_ptr,
        off_ptr,
        H,
        W,
        h,
        w,
        tiles_w,
        tiles_per_plane,
        ALIGN_CORNERS: tl.constexpr,
        CDT: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_W: tl.constexpr,
    ):
        """``out = x * (offset + sigmoid(Up(logits)))`` on one (BLOCK_H, BLOCK_W) tile."""
        pid = tl.program_id(0)
        plane = pid // tiles_per_plane
        tile = pid % tiles_per_plane
        rows = (tile // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)
        cols = (tile % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)
        valid = (rows < H)[:, None] & (cols < W)[None, :]
        # 64-bit plane offsets: B*C*H*W may exceed 2**31 even when one plane does not.
        x_base = plane.to(tl.int64) * H * W
        l_base = l_ptr + plane.to(tl.int64) * h * w

        y0, y1, ly = _source_index(rows, h, H, ALIGN_CORNERS, CDT)
        x0, x1, lx = _source_index(cols, w, W, ALIGN_CORNERS, CDT)
        m = _upsampled_sigmoid(l_base, y0, y1, ly, x0, x1, lx, w, valid, CDT)

        idx = x_base + (rows * W)[:, None] + cols[None, :]
        xv = tl.load(x_ptr + idx, mask=valid, other=0.0).to(CDT)
        out = xv * (tl.load(off_ptr).to(CDT) + m)
        tl.store(out_ptr + idx, out.to(out_ptr.dtype.element_ty), mask=valid)

    @triton.jit(do_not_specialize=["H", "W", "h", "w"])
    def _ld_bwd_kernel(
        g_ptr,
        x_ptr,
        l_ptr,
        gx_ptr,
        gl_ptr,
        off_ptr,
        H,
        W,
        h,
        w,
        ALIGN_CORNERS: tl.constexpr,
        CDT: tl.constexpr,
        NEED_X_GRAD: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_W: tl.constexpr,
        WIN_H: tl.constexpr,
        WIN_W: tl.constexpr,
    ):
        """Backward of one (b, c) plane: ``grad_x`` (optional) and the low-res ``grad_logits``.

        ``gl_ptr`` is a zero-initialised ``CDT`` buffer of shape (B, C, h, w); this program is
        the only one touching its plane, and it visits the tiles in a fixed order.
        """
        plane = tl.program_id(0).to(tl.int64)
        x_base = plane * H * W
        l_base = l_ptr + plane * h * w
        gl_base = gl_ptr + plane * h * w
        off = tl.load(off_ptr).to(CDT)
        kh = tl.arange(0, WIN_H)
        kw = tl.arange(0, WIN_W)
        for r in range(0, H, BLOCK_H):
            rows = r + tl.arange(0, BLOCK_H)
            y0, y1, ly = _source_index(rows, h, H, ALIGN_CORNERS, CDT)
            # Source rows grow with the output row, so the tile's window starts at its first
            # row's lower neighbour and (by the host's choice of WIN_H) holds all the others.
            p0, _, _ = _source_index(r, h, H, ALIGN_CORNERS, CDT)
            # A_y[tile, window]^T as a dense (WIN_H, BLOCK_H) matrix: two non-zeros per column
            # (they add up when y0 == y1, as in ATen's backward).
            ayt = tl.where(kh[:, None] == (y0 - p0)[None, :], 1.0 - ly[None, :], 0.0)
            ayt += tl.where(kh[:, None] == (y1 - p0)[None, :], ly[None, :], 0.0)
            ayt = ayt.to(CDT)
            for c in range(0, W, BLOCK_W):
                cols = c + tl.arange(0, BLOCK_W)
                valid = (rows < H)[:, None] & (cols < W)[None, :]
                x0, x1, lx = _source_index(cols, w, W, ALIGN_CORNERS, CDT)
                m = _upsampled_sigmoid(l_base, y0, y1, ly, x0, x1, lx, w, valid, CDT)

                idx = x_base + (rows * W)[:, None] + cols[None, :]
                gv = tl.load(g_ptr + idx, mask=valid, other=0.0).to(CDT)
                if NEED_X_GRAD:
                    gx = gv * (off + m)
                    tl.store(gx_ptr + idx, gx.to(gx_ptr.dtype.element_ty), mask=valid)
                xv = tl.load(x_ptr + idx, mask=valid, other=0.0).to(CDT)
                # d out / d z = x * m * (1 - m); zero outside the plane (g and x load as 0).
                t = gv * xv * m * (1.0 - m)

                q0, _, _ = _source_index(c, w, W, ALIGN_CORNERS, CDT)
                # A_x[tile, window] as a dense (BLOCK_W, WIN_W) matrix.
                ax = tl.where((x0 - q0)[:, None] == kw[None, :], 1.0 - lx[:, None], 0.0)
                ax += tl.where((x1 - q0)[:, None] == kw[None, :], lx[:, None], 0.0)
                ax = ax.to(CDT)
                u = tl.dot(t, ax, input_precision="ieee", out_dtype=CDT)  # (BLOCK_H, WIN_W)
                win = tl.dot(ayt, u, input_precision="ieee", out_dtype=CDT)  # (WIN_H, WIN_W)

                prow = p0 + kh
                qcol = q0 + kw
                wmask = (prow < h)[:, None] & (qcol < w)[None, :]
                wptr = gl_base + (prow * w)[:, None] + qcol[None, :]
                acc = tl.load(wptr, mask=wmask, other=0.0)
                tl.store(wptr, acc + win, mask=wmask)
                # The next tile's window overlaps this one and may sit on other threads.
                tl.debug_barrier()


def _compute_dtype(dtype: torch.dtype) -> object:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _offset_tensor(offset: float, x: torch.Tensor) -> torch.Tensor:
    """``offset`` as a one-element tensor of the compute dtype on the device of ``x``.

    A Python float kernel argument is passed as fp32, which would round ``offset`` for fp64
    inputs; a pointer to a value of the compute dtype keeps it exact for every dtype.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.full((1,), offset, dtype=acc, device=x.device)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


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


def _check(
    tensors: dict[str, torch.Tensor], x: torch.Tensor, logits: torch.Tensor, who: str
) -> None:
    check_feature(x, None, name="x", who=who)
    check_feature(logits, None, name="logits", who=who)
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"{who}: x must be float32, float64, float16 or bfloat16, got {x.dtype}"
        )
    if logits.shape[:2] != x.shape[:2]:
        raise ValueError(
            f"{who}: logits must be (B, C, h, w) with the (B, C) of x = {tuple(x.shape[:2])}, "
            f"got shape {tuple(logits.shape)}"
        )
    if logits.shape[-2] < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{who}: logits must have h, w >= 1, got shape {tuple(logits.shape)}")
    if x.shape[-2] * x.shape[-1] >= 2**31:
        # Offsets inside one plane are 32-bit (the plane offset itself is 64-bit).
        raise ValueError(
            f"{who}: one (H, W) plane of x must have fewer than 2**31 elements, "
            f"got shape {tuple(x.shape)}"
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
        if not t.is_contiguous():
            raise ValueError(
                f"{who}: {name} must be a contiguous NCHW tensor, got shape {tuple(t.shape)} "
                f"with strides {t.stride()}"
            )


def _require_triton(who: str) -> None:
    if not TRITON_AVAILABLE:
        raise RuntimeError(f"{who}: triton is not installed (pip install 'gald[triton]')")


def ld_modulate_fwd_triton(
    x: torch.Tensor, logits: torch.Tensor, offset: float, align_corners: bool
) -> torch.Tensor:
    """Triton forward of ``x * (offset + sigmoid(Up(logits, x.shape[-2:])))``.

    Args:
        x: contiguous (B, C, H, W) tensor, fp32, fp64, fp16 or bf16.
        logits: contiguous (B, C, h, w) tensor of the dtype and device of ``x``.
        offset: the constant added to the mask.
        align_corners: the ``F.interpolate`` flag of ``Up``.

    Returns:
        A new (B, C, H, W) tensor of the dtype of ``x``.
    """
    who = "ld_modulate_fwd_triton"
    _check({"x": x, "logits": logits}, x, logits, who)
    _require_triton(who)
    return _launch_fwd(x, logits, float(offset), bool(align_corners))


def _launch_fwd(
    x: torch.Tensor, logits: torch.Tensor, offset: float, align_corners: bool
) -> torch.Tensor:
    b, c, H, W = x.shape
    h, w = logits.shape[-2:]
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    block_w = min(_pow2(W), _FWD_MAX_BLOCK_W)
    block_h = min(_pow2(H), max(1, _FWD_TILE_PIXELS // block_w))
    tiles_w = triton.cdiv(W, block_w)
    tiles_per_plane = triton.cdiv(H, block_h) * tiles_w
    grid = (b * c * tiles_per_plane,)
    _ld_fwd_kernel[grid](
        x,
        logits,
        out,
        _offset_tensor(offset, x),
        H,
        W,
        h,
        w,
        tiles_w,
        tiles_per_plane,
        ALIGN_CORNERS=align_corners,
        CDT=_compute_dtype(x.dtype),
        BLOCK_H=block_h,
        BLOCK_W=block_w,
        num_warps=_NUM_WARPS,
        enable_fp_fusion=True,
    )
    return out


def _bwd_tiles(H: int, W: int, h: int, w: int, align_corners: bool) -> tuple[int, ...]:
    """(BLOCK_H, BLOCK_W, WIN_H, WIN_W) for the backward; tiles shrink when windows grow."""
    block_w = min(max(_pow2(W), _BWD_MIN_BLOCK), _BWD_MAX_BLOCK_W)
    block_h = min(max(_pow2(H), _BWD_MIN_BLOCK), max(_BWD_MIN_BLOCK, _BWD_TILE_PIXELS // block_w))
    # Downsampling (h > H) widens the window: keep the (WIN, BLOCK) weight matrices bounded.
    while block_h > _BWD_MIN_BLOCK and _window(block_h, h, H, align_corners) > block_h:
        block_h //= 2
    while block_w > _BWD_MIN_BLOCK and _window(block_w, w, W, align_corners) > block_w:
        block_w //= 2
    return (
        block_h,
        block_w,
        _window(block_h, h, H, align_corners),
        _window(block_w, w, W, align_corners),
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
    and is deterministic: one program per (b, c) plane, tiles added in a fixed order, no atomics.

    Args:
        grad_out: contiguous (B, C, H, W), dtype and device of ``x``.
        x: contiguous (B, C, H, W), fp32, fp64, fp16 or bf16.
        logits: contiguous (B, C, h, w), dtype and device of ``x``.
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
    offset = float(offset)
    align_corners = bool(align_corners)
    if not need_logits_grad:
        # grad_x has the forward's formula with x replaced by grad_out: reuse its tiling.
        return (_launch_fwd(grad_out, logits, offset, align_corners) if need_x_grad else None), None

    b, c, H, W = x.shape
    h, w = logits.shape[-2:]
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    grad_logits = torch.zeros((b, c, h, w), dtype=acc_dtype, device=x.device)
    grad_x = torch.empty_like(x) if need_x_grad else None
    if x.numel() > 0:
        block_h, block_w, win_h, win_w = _bwd_tiles(H, W, h, w, align_corners)
        _ld_bwd_kernel[(b * c,)](
            grad_out,
            x,
            logits,
            grad_x if grad_x is not None else x,  # never written when NEED_X_GRAD is False
            grad_logits,
            _offset_tensor(offset, x),
            H,
            W,
            h,
            w,
            ALIGN_CORNERS=align_corners,
            CDT=_compute_dtype(x.dtype),
            NEED_X_GRAD=need_x_grad,
            BLOCK_H=block_h,
            BLOCK_W=block_w,
            WIN_H=win_h,
            WIN_W=win_w,
            num_warps=_NUM_WARPS,
            enable_fp_fusion=True,
        )
    return grad_x, grad_logits.to(logits.dtype)
