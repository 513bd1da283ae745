r"""The plain-PyTorch kernels of the LD modulation (CPU, and the fallback on any device).

``out = x * (offset + sigmoid(A_H L A_W^T))`` with the bilinear interpolation matrices of
:mod:`gald.ops._interp`. Bilinear upsampling is separable, so the full-resolution mask is one
matrix product per memory format:

- NCHW: the logits are first interpolated along ``H`` (a small (B, C, H, w) map), then every
  output row is ``S[row] @ A_W^T``: one (B·C·H, w) x (w, W) product.
- channels_last: the logits are interpolated along ``W`` into a (B, h, W·C) map, then the rows
  of batch ``b`` are ``A_H @ T[b]``: one (H, h) x (h, W·C) product per image.

The mask is produced a chunk of rows at a time into one reused buffer of at most
``CHUNK_BYTES``, passed through an in-place sigmoid and met with ``x`` at once; the output is
the only full-resolution allocation. The bound keeps the extra memory constant whatever the
input size (on CUDA no full-size float32 mask is ever materialised) and lets a chunk stay in a
large last-level cache between the three passes over it. It is a memory bound, not a speed
knob: on CPU, chunks from 2 MiB to a whole tensor measured within a few percent of each other
(docs/performance.md).

The backward recomputes the mask chunk by chunk from the saved ``x`` and ``logits``::

    grad_x      = g * (offset + m)
    grad_logits = A_H^T (g * x * m * (1 - m)) A_W

Half-precision inputs are computed in float32 (mask, sigmoid, products, the reduction) and
rounded once. Every step is a matmul or an elementwise op in a fixed order: on CPU the results
are bitwise reproducible; on CUDA they are as deterministic as cuBLAS matmuls are (see
docs/performance.md).
"""

from __future__ import annotations

import torch

from .._amp import compute_dtype
from ._interp import interp_matrix

CHUNK_BYTES = 8 << 20
"""Upper bound on the bytes of one chunk of the float32 (float64) mask."""


def _layout(t: torch.Tensor) -> torch.memory_format | None:
    if t.is_contiguous():
        return torch.contiguous_format
    if t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def _rows_per_chunk(row_elems: int, dtype: torch.dtype) -> int:
    itemsize = torch.finfo(dtype).bits // 8
    return max(1, CHUNK_BYTES // max(1, row_elems * itemsize))


def _apply_gain(base: torch.Tensor, m: torch.Tensor, offset: float, out: torch.Tensor) -> None:
    """``out = base * (offset + m)``; ``m`` may be modified."""
    if offset == 1.0:
        torch.addcmul(base, base, m, out=out)
    elif offset == 0.0:
        torch.mul(base, m, out=out)
    else:
        m.add_(offset)
        torch.mul(base, m, out=out)


def _sigmoid_grad_times(
    g: torch.Tensor, x: torch.Tensor, m: torch.Tensor, out: torch.Tensor
) -> None:
    """``out = g * x * m * (1 - m)`` in ``out``'s dtype (half inputs are multiplied in fp32)."""
    if g.dtype == out.dtype:
        torch.mul(g, x, out=out)
    else:
        out.copy_(g)
        out.mul_(x)
    torch.ops.aten.sigmoid_backward.grad_input(out, m, grad_input=out)


class _Plan:
    """Shapes, compute dtype, memory format and the interpolation matrices of one call."""

    def __init__(self, x: torch.Tensor, logits: torch.Tensor, align_corners: bool) -> None:
        b, c, hh, ww = x.shape
        h, w = logits.shape[-2:]
        self.cdt = compute_dtype(x.dtype)
        self.a_h = interp_matrix(hh, h, align_corners=align_corners, dtype=self.cdt, device=x.device)
        self.a_w = interp_matrix(ww, w, align_corners=align_corners, dtype=self.cdt, device=x.device)
        self.shape = (b, c, hh, ww, h, w)
        fmt = _layout(x)
        self.fmt = fmt if fmt is not None else torch.contiguous_format
        self.channels_last = self.fmt == torch.channels_last

    def rows_nchw(self, logits: torch.Tensor) -> torch.Tensor:
        """``A_H @ L`` for every (b, c), as (B·C·H, w) rows."""
        b, c, hh, _, _, w = self.shape
        return torch.matmul(self.a_h, logits.to(self.cdt)).reshape(b * c * hh, w)

    def rows_nhwc(self, logits: torch.Tensor) -> torch.Tensor:
        """``L @ A_W^T`` laid out channels-last: (B, h, W·C)."""
        b, c, _, ww, h, _ = self.shape
        lg = logits.to(self.cdt).permute(0, 2, 3, 1)  # (B, h, w, C)
        return torch.matmul(self.a_w, lg).reshape(b, h, ww * c)


def _as_rows(t: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """A view of a tensor in ``plan.fmt``: (B·C·H, W) for NCHW, (B, H, W·C) for channels_last."""
    b, c, hh, ww, _, _ = plan.shape
    if plan.channels_last:
        return t.permute(0, 2, 3, 1).reshape(b, hh, ww * c)
    return t.view(b * c * hh, ww)


def _chunks(plan: _Plan) -> list[tuple[int, int, int]]:
    """(batch, first row, end row) of every chunk; NCHW has one 'batch' of B·C·H rows."""
    b, c, hh, ww, _, _ = plan.shape
    if plan.channels_last:
        step = _rows_per_chunk(ww * c, plan.cdt)
        return [(bi, r, min(r + step, hh)) for bi in range(b) for r in range(0, hh, step)]
    rows = b * c * hh
    step = _rows_per_chunk(ww, plan.cdt)
    return [(0, r, min(r + step, rows)) for r in range(0, rows, step)]


def _work_buffer(like: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """A buffer of the largest chunk's mask in the compute dtype."""
    _, c, _, ww, _, _ = plan.shape
    chunks = _chunks(plan)
    rows = max(r1 - r0 for _, r0, r1 in chunks)
    row_elems = ww * c if plan.channels_last else ww
    return torch.empty(rows, row_elems, dtype=plan.cdt, device=like.device)


def _mask_chunk(plan: _Plan, small: torch.Tensor, bi: int, r0: int, r1: int, m: torch.Tensor) -> None:
    """``m = sigmoid(Up(L))`` on rows ``r0:r1`` (of image ``bi`` in channels_last)."""
    if plan.channels_last:
        torch.mm(plan.a_h[r0:r1], small[bi], out=m)
    else:
        torch.mm(small[r0:r1], plan.a_w.t(), out=m)
    m.sigmoid_()


def forward(
    x: torch.Tensor, logits: torch.Tensor, offset: float, align_corners: bool
) -> torch.Tensor:
    """``x * (offset + sigmoid(Up(logits)))``; the output has the memory format of ``x``."""
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    plan = _Plan(x, logits, align_corners)
    work = out if _layout(out) == plan.fmt else torch.empty_like(x, memory_format=plan.fmt)
    xr = _as_rows(x.contiguous(memory_format=plan.fmt), plan)
    orow = _as_rows(work, plan)
    small = plan.rows_nhwc(logits) if plan.channels_last else plan.rows_nchw(logits)
    buf = _work_buffer(x, plan)
    for bi, r0, r1 in _chunks(plan):
        m = buf[: r1 - r0]
        _mask_chunk(plan, small, bi, r0, r1, m)
        if plan.channels_last:
            _apply_gain(xr[bi, r0:r1], m, offset, orow[bi, r0:r1])
        else:
            _apply_gain(xr[r0:r1], m, offset, orow[r0:r1])
    if work is not out:
        out.copy_(work)
    return out


def backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    logits: torch.Tensor,
    offset: float,
    align_corners: bool,
    need_x: bool,
    need_logits: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`forward` w.r.t. ``x`` and ``logits`` (``None`` where not needed)."""
    gx = torch.empty_like(x) if need_x else None
    gl = torch.empty_like(logits) if need_logits else None
    if not (need_x or need_logits):
        return gx, gl
    if x.numel() == 0:
        if gl is not None:
            gl.zero_()
        return gx, gl
    plan = _Plan(x, logits, align_corners)
    b, c, hh, ww, h, w = plan.shape
    xr = _as_rows(x.contiguous(memory_format=plan.fmt), plan)
    gr = _as_rows(grad.contiguous(memory_format=plan.fmt), plan)
    gx_work = None
    if gx is not None:
        gx_work = gx if _layout(gx) == plan.fmt else torch.empty_like(x, memory_format=plan.fmt)
    gxr = _as_rows(gx_work, plan) if gx_work is not None else None
    small = plan.rows_nhwc(logits) if plan.channels_last else plan.rows_nchw(logits)
    buf = _work_buffer(x, plan)
    tmp = torch.empty_like(buf) if need_logits else None
    dev = x.device
    # the reduction along the axis the chunks run over: A_H^T (...) per image in channels_last
    # (B, h, W·C), or (...) A_W per row in NCHW (B·C·H, w)
    if plan.channels_last:
        acc = torch.zeros(b, h, ww * c, dtype=plan.cdt, device=dev) if need_logits else None
    else:
        acc = torch.empty(b * c * hh, w, dtype=plan.cdt, device=dev) if need_logits else None
    for bi, r0, r1 in _chunks(plan):
        k = r1 - r0
        m = buf[:k]
        _mask_chunk(plan, small, bi, r0, r1, m)
        if plan.channels_last:
            g_rows, x_rows = gr[bi, r0:r1], xr[bi, r0:r1]
        else:
            g_rows, x_rows = gr[r0:r1], xr[r0:r1]
        if tmp is not None and acc is not None:
            d = tmp[:k]
            _sigmoid_grad_times(g_rows, x_rows, m, d)
            if plan.channels_last:
                acc[bi].addmm_(plan.a_h[r0:r1].t(), d)
            else:
                torch.mm(d, plan.a_w, out=acc[r0:r1])
        if gxr is not None:
            target = gxr[bi, r0:r1] if plan.channels_last else gxr[r0:r1]
            _apply_gain(g_rows, m, offset, target)
    if gl is not None and acc is not None:
        if plan.channels_last:
            # (w, W) @ (B, h, W, C) -> (B, h, w, C)
            red = torch.matmul(plan.a_w.t(), acc.view(b, h, ww, c)).permute(0, 3, 1, 2)
        else:
            # (h, H) @ (B, C, H, w) -> (B, C, h, w)
            red = torch.matmul(plan.a_h.t(), acc.view(b, c, hh, w))
        gl.copy_(red)
    if gx is not None and gx_work is not None and gx_work is not gx:
        gx.copy_(gx_work)
    return gx, gl
