r"""The plain-PyTorch kernels of the LD modulation (CPU, and the fallback on any device).

``out = x * (offset + sigmoid(Up(logits)))``. Bilinear upsampling is separable,
``Up(L) = A_H L A_W^T`` with the interpolation matrices of :mod:`gald.ops._interp`, so the mask is
two small matmuls and its adjoint (the backward reduction) two more; the same scheme serves both
memory formats, each cut into chunks that are dense in memory:

- NCHW: the chunks are planes of the (B·C, H, W) view. The logits are first interpolated along
  ``W`` (a small (B·C, h, W) map ``S = L A_W^T``); the mask of a chunk of planes is then one
  batched matmul ``A_H S``. The backward reduces along ``W`` with one matmul per chunk,
  ``A_W^T (g x m (1 - m))^T`` (as a wide (w, rows) product: about 20 % faster on CPU than the
  tall-and-skinny (rows, w) one), and along ``H`` with one small matmul at the end.
- channels_last: the chunks are image rows of the (B·H, W, C) view. The logits are first
  interpolated along ``H`` (a small (B·H, w, C) map ``S = A_H L``); the mask of a chunk of rows
  is one batched matmul ``A_W S``, and the backward reduces along ``W`` with ``A_W^T (...)`` per
  chunk and along ``H`` with one small matmul at the end.

Matmuls and elementwise ops only: every kernel used here is deterministic on CPU and on CUDA
(cuBLAS caveats in docs/performance.md), so the results are bitwise reproducible.

When the output chunk is dense and in the compute dtype (float32/float64 inputs) the mask of a
chunk is built in the output itself, passed through an in-place sigmoid and met with ``x``, so the
output is the only full-size allocation of the forward. In the backward the mask of a chunk goes
into a scratch buffer of one chunk, and ``g x m (1 - m)`` into the chunk of ``grad_x`` until the
reduction has read it (it is then overwritten with ``g (offset + m)``), so ``grad_x`` is the only
full-size allocation. Half-type inputs are computed in float32 (mask, sigmoid, products, the
reduction) and rounded once; their float32 mask goes into a scratch buffer of one chunk (and
``g x m (1 - m)`` into a second one in the backward).

Chunk size (:func:`chunk_bytes`): on CPU a chunk is a cache tile of a few MiB. The mask a chunk's
first op writes is read back by the next one while still in cache, and a scratch buffer this small
is recycled by the memory allocator from one call to the next, where a larger one is mapped afresh
at every call and pays a page fault per 4 KiB page on first touch (about as much as the arithmetic
of the op; measurements in docs/performance.md). On other devices (the CUDA fallback) a chunk is
a memory bound of 32 MiB, large enough that kernel launches do not dominate: an input larger than
that never has a full-size float32 mask materialised beside a half-precision output.

The backward recomputes the mask chunk by chunk from the saved ``x`` and ``logits``::

    grad_x      = g * (offset + m)
    grad_logits = Up^T(g * x * m * (1 - m))
"""

from __future__ import annotations

import functools
import math

import torch

from .._amp import compute_dtype
from ._interp import interp_matrix

CPU_CHUNK_BYTES = 4 << 20
"""Bytes of one chunk of the float32 (float64) mask on CPU (unless one unit is larger)."""

CHUNK_BYTES = 32 << 20
"""Bytes of one chunk of the float32 (float64) mask on other devices (unless one unit is
larger)."""

_aten = torch.ops.aten


def chunk_bytes(device: torch.device) -> int:
    """The chunk bound for tensors on ``device``: a cache tile on CPU, a memory bound elsewhere."""
    return CPU_CHUNK_BYTES if device.type == "cpu" else CHUNK_BYTES


def _layout(t: torch.Tensor) -> torch.memory_format | None:
    if t.is_contiguous():
        return torch.contiguous_format
    if t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def _spans(n: int, unit_bytes: int, bound: int) -> list[tuple[int, int]]:
    """``[0, n)`` cut into the fewest spans of at most ``bound`` bytes each (at least one unit
    each), of sizes that differ by at most one."""
    per = max(1, bound // max(1, unit_bytes))
    count = math.ceil(n / per)
    return [(n * i // count, n * (i + 1) // count) for i in range(count)]


def _apply_gain(base: torch.Tensor, m: torch.Tensor, offset: float, out: torch.Tensor) -> None:
    """``out = base * (offset + m)``; ``m`` may be modified and may be ``out``."""
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
    _aten.sigmoid_backward.grad_input(out, m, grad_input=out)


class _Plan:
    """Shapes, compute dtype, memory format, interpolation matrices and chunks of one call.

    A *unit* is a plane (B·C, H, W) in NCHW and an image row (B·H, W, C) in channels_last; a
    chunk is a span of units, dense in memory.
    """

    def __init__(self, x: torch.Tensor, logits: torch.Tensor, align_corners: bool) -> None:
        b, c, hh, ww = x.shape
        h, w = logits.shape[-2:]
        self.cdt = compute_dtype(x.dtype)
        self.shape = (b, c, hh, ww, h, w)
        fmt = _layout(x)
        self.fmt = fmt if fmt is not None else torch.contiguous_format
        self.channels_last = self.fmt == torch.channels_last
        self.device = x.device
        self.a_h = interp_matrix(
            hh, h, align_corners=align_corners, dtype=self.cdt, device=x.device
        )
        self.a_w = interp_matrix(
            ww, w, align_corners=align_corners, dtype=self.cdt, device=x.device
        )
        self.unit_shape = (ww, c) if self.channels_last else (hh, ww)
        units = b * hh if self.channels_last else b * c
        itemsize = torch.finfo(self.cdt).bits // 8
        self.spans = _spans(units, math.prod(self.unit_shape) * itemsize, chunk_bytes(x.device))

    def units_of(self, t: torch.Tensor) -> torch.Tensor:
        """A full-resolution tensor in ``self.fmt`` as the (units, *unit_shape) view."""
        b, c, hh, ww, _, _ = self.shape
        if self.channels_last:
            return t.permute(0, 2, 3, 1).view(b * hh, ww, c)
        return t.view(b * c, hh, ww)

    def small(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits interpolated along the first axis of the layout: ``A_H L`` as
        (B·H, w, C) (channels_last), or ``L A_W^T`` as (B·C, h, W) (NCHW)."""
        b, c, hh, _, h, w = self.shape
        lg = logits.to(self.cdt)
        if self.channels_last:
            rows = torch.matmul(self.a_h, lg.permute(0, 2, 3, 1).reshape(b, h, w * c))
            return rows.view(b * hh, w, c)
        return torch.matmul(lg.reshape(b * c, h, w), self.a_w.t())

    def buffer(self) -> torch.Tensor:
        """Scratch space for the largest chunk, (n, *unit_shape), in the compute dtype."""
        n = max(s1 - s0 for s0, s1 in self.spans)
        return torch.empty(n, *self.unit_shape, dtype=self.cdt, device=self.device)

    def mask(self, small: torch.Tensor, s0: int, s1: int, dst: torch.Tensor) -> torch.Tensor:
        """``sigmoid(Up(L))`` on chunk ``s0:s1``, written into ``dst`` (a dense
        (s1 - s0, *unit_shape) tensor in the compute dtype) and returned."""
        a = self.a_w if self.channels_last else self.a_h
        torch.matmul(a, small[s0:s1], out=dst)
        return dst.sigmoid_()

    def reduction(self) -> torch.Tensor:
        """Where :meth:`reduce` accumulates: (w, B·C·H) (NCHW) or (B·H, w, C) (channels_last)."""
        b, c, hh, _, _, w = self.shape
        if self.channels_last:
            return torch.empty(b * hh, w, c, dtype=self.cdt, device=self.device)
        return torch.empty(w, b * c * hh, dtype=self.cdt, device=self.device)

    @functools.cached_property
    def a_w_t(self) -> torch.Tensor:
        """``A_W^T``, contiguous (the reduction's left operand; a strided view is slower)."""
        return self.a_w.t().contiguous()

    def reduce(self, d: torch.Tensor, s0: int, s1: int, red: torch.Tensor) -> None:
        """The adjoint of the per-chunk interpolation: ``d`` of chunk ``s0:s1`` reduced along
        ``W`` into its part of ``red``."""
        a_w_t = self.a_w_t
        if self.channels_last:
            torch.matmul(a_w_t, d, out=red[s0:s1])
        else:
            hh, ww = self.unit_shape
            torch.mm(a_w_t, d.reshape(-1, ww).t(), out=red[:, s0 * hh : s1 * hh])

    def finish(self, red: torch.Tensor) -> torch.Tensor:
        """The logits gradient (B, C, h, w) from the reduction: the adjoint along ``H``."""
        b, c, hh, _, h, w = self.shape
        if self.channels_last:
            # (h, H) @ (B, H, w·C) -> (B, h, w, C), a channels_last (B, C, h, w)
            out = torch.matmul(self.a_h.t(), red.view(b, hh, w * c))
            return out.view(b, h, w, c).permute(0, 3, 1, 2)
        # (w, B·C, H) @ (H, h) -> (w, B·C, h) -> (B, C, h, w)
        return torch.matmul(red.view(w, b * c, hh), self.a_h).permute(1, 2, 0).view(b, c, h, w)


def forward(
    x: torch.Tensor, logits: torch.Tensor, offset: float, align_corners: bool
) -> torch.Tensor:
    """``x * (offset + sigmoid(Up(logits)))``; the output has the memory format of ``x``."""
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    plan = _Plan(x, logits, align_corners)
    work = out if _layout(out) == plan.fmt else torch.empty_like(x, memory_format=plan.fmt)
    xu = plan.units_of(x.contiguous(memory_format=plan.fmt))
    wu = plan.units_of(work)
    small = plan.small(logits)
    # the mask of a chunk is built in the output itself when it can hold it, else in a buffer
    buf = None if work.dtype == plan.cdt else plan.buffer()
    for s0, s1 in plan.spans:
        o_c = wu[s0:s1]
        m = plan.mask(small, s0, s1, o_c if buf is None else buf[: s1 - s0])
        _apply_gain(xu[s0:s1], m, offset, o_c)
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
    xu = plan.units_of(x.contiguous(memory_format=plan.fmt))
    gu = plan.units_of(grad.contiguous(memory_format=plan.fmt))
    gx_work = None
    if gx is not None:
        gx_work = gx if _layout(gx) == plan.fmt else torch.empty_like(x, memory_format=plan.fmt)
    gxu = None if gx_work is None else plan.units_of(gx_work)
    small = plan.small(logits)
    # the mask of a chunk goes into a buffer; g x m (1 - m) into the chunk of grad_x when that
    # can hold it (it is overwritten with g (offset + m) once the reduction has read it), else
    # into a second buffer
    in_place = gxu is not None and gxu.dtype == plan.cdt
    m_buf = plan.buffer()
    d_buf = plan.buffer() if need_logits and not in_place else None
    red = plan.reduction() if need_logits else None
    for s0, s1 in plan.spans:
        n = s1 - s0
        gx_c = None if gxu is None else gxu[s0:s1]
        m = plan.mask(small, s0, s1, m_buf[:n])
        if red is not None:
            d = gx_c if d_buf is None else d_buf[:n]
            assert d is not None
            _sigmoid_grad_times(gu[s0:s1], xu[s0:s1], m, d)
            plan.reduce(d, s0, s1, red)
        if gx_c is not None:
            _apply_gain(gu[s0:s1], m, offset, gx_c)
    if gl is not None and red is not None:
        gl.copy_(plan.finish(red))
    if gx is not None and gx_work is not None and gx_work is not gx:
        gx.copy_(gx_work)
    return gx, gl
