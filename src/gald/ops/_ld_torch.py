r"""The plain-PyTorch kernels of the LD modulation (CPU, and the fallback on any device).

``out = x * (offset + sigmoid(Up(logits)))``. Bilinear upsampling is separable,
``Up(L) = A_H L A_W^T`` with the interpolation matrices of :mod:`gald.ops._interp`; each memory
format uses the ATen kernels that are fastest for it:

- NCHW: the logits are first interpolated along ``W`` (a small (B·C, h, W) map ``S = L A_W^T``);
  the mask planes are then one batched matmul ``A_H S`` (about twice as fast on CPU as
  ``upsample_bilinear2d`` or a 1-D interpolation of rows). The backward reduces along ``W`` with
  one matmul per chunk, ``A_W^T (g x m (1 - m))^T`` (as a wide (w, rows) product: about 20 %
  faster on CPU than the tall-and-skinny (rows, w) one), and along ``H`` with a small matmul.
- channels_last: the mask is ``upsample_bilinear2d`` of channels_last logits (from NCHW logits
  the same kernel is about ten times slower); the backward reduction is
  ``upsample_bilinear2d_backward``.

The work goes in chunks (planes of the (B·C, H, W) view for NCHW; whole images for channels_last
when one fits in a chunk, else groups of channels). When the output chunk is dense and in the
compute dtype (float32/float64 inputs) the mask of a chunk is built in the output itself: upsampled
into it, passed through an in-place sigmoid and met with ``x``, so the output is the only
allocation of the forward; in the backward the chunk of ``grad_x`` holds ``g x m (1 - m)`` until
the reduction has read it. Otherwise (half types, channel groups) a dense scratch buffer of one
chunk is used. A chunk's mask never exceeds ``CHUNK_BYTES`` (32 MiB): a memory bound, not a speed
knob tuned to a machine, so an input larger than a chunk never has a full-size float32 mask
materialised beside a half-precision output (what matters on a GPU). Chunks are as large as the
bound allows, and balanced, because every kernel launch is also a synchronisation point of the
CPU thread pool: few, large kernels hold up far better on a busy machine than many cache-sized
ones (measurements in docs/performance.md). Fewer fresh full-resolution tensors matter on CPU:
the first touch of a fresh allocation pays a page fault per 4 KiB page, which costs about as
much as the arithmetic of the op.

The backward recomputes the mask chunk by chunk from the saved ``x`` and ``logits``::

    grad_x      = g * (offset + m)
    grad_logits = Up^T(g * x * m * (1 - m))

Half-precision inputs are computed in float32 (mask, sigmoid, products, the reduction) and
rounded once. On CPU every kernel used here is deterministic, so the results are bitwise
reproducible. On CUDA the NCHW path is too (matmuls and elementwise ops; cuBLAS caveats in
docs/performance.md), but the channels_last backward is not: ``upsample_bilinear2d_backward``
accumulates with atomic adds there. (On CUDA the default is the Triton kernel, which is.)
"""

from __future__ import annotations

import math

import torch

from .._amp import compute_dtype
from ._interp import interp_matrix

CHUNK_BYTES = 32 << 20
"""Upper bound on the bytes of one chunk of the float32 (float64) mask (unless one row, or one
channel in channels_last, is larger)."""

_aten = torch.ops.aten


def _layout(t: torch.Tensor) -> torch.memory_format | None:
    if t.is_contiguous():
        return torch.contiguous_format
    if t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def _spans(n: int, unit_bytes: int) -> list[tuple[int, int]]:
    """``[0, n)`` cut into the fewest spans of at most ``CHUNK_BYTES`` each (at least one unit
    each), of sizes that differ by at most one."""
    per = max(1, CHUNK_BYTES // max(1, unit_bytes))
    count = math.ceil(n / per)
    return [(n * i // count, n * (i + 1) // count) for i in range(count)]


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
    _aten.sigmoid_backward.grad_input(out, m, grad_input=out)


class _Plan:
    """Shapes, compute dtype, memory format and chunks of one call."""

    def __init__(self, x: torch.Tensor, logits: torch.Tensor, align_corners: bool) -> None:
        b, c, hh, ww = x.shape
        h, w = logits.shape[-2:]
        self.cdt = compute_dtype(x.dtype)
        self.align_corners = align_corners
        self.shape = (b, c, hh, ww, h, w)
        fmt = _layout(x)
        self.fmt = fmt if fmt is not None else torch.contiguous_format
        self.channels_last = self.fmt == torch.channels_last
        itemsize = torch.finfo(self.cdt).bits // 8
        # channels_last: whole images when one fits in a chunk, else groups of channels (every
        # image and row); NCHW: planes of the (B·C, H, W) view
        self.by_image = self.channels_last and c * hh * ww * itemsize <= CHUNK_BYTES
        if self.by_image:
            self.spans = _spans(b, c * hh * ww * itemsize)
        elif self.channels_last:
            self.spans = _spans(c, b * hh * ww * itemsize)
        else:
            self.spans = _spans(b * c, hh * ww * itemsize)
        # a chunk of a full-resolution tensor is dense in memory (so it can serve as the mask's
        # scratch space) unless it is a group of channels of a channels_last tensor
        self.dense_chunks = self.by_image or not self.channels_last
        self.device = x.device
        # NCHW: the interpolation matrices A_H (H, h) and A_W (W, w)
        self.a_h = interp_matrix(
            hh, h, align_corners=align_corners, dtype=self.cdt, device=x.device
        )
        self.a_w = interp_matrix(
            ww, w, align_corners=align_corners, dtype=self.cdt, device=x.device
        )

    def small(self, logits: torch.Tensor) -> torch.Tensor:
        """What the mask chunks are upsampled from: the logits in the compute dtype
        (channels_last), or ``L @ A_W^T`` as (B·C, h, W) (NCHW)."""
        if self.channels_last:
            # upsample_bilinear2d into a channels_last output is an order of magnitude slower
            # from NCHW logits than from channels_last ones (a small copy)
            return logits.to(self.cdt).contiguous(memory_format=torch.channels_last)
        b, c, _, _, h, w = self.shape
        return torch.matmul(logits.to(self.cdt).reshape(b * c, h, w), self.a_w.t())

    def _chunk_shape(self, n: int) -> tuple[int, ...]:
        """Shape of a chunk of ``n`` units: (B, n, H, W), (n, C, H, W) or (n, H, W) planes."""
        b, c, hh, ww, _, _ = self.shape
        if self.by_image:
            return (n, c, hh, ww)
        return (b, n, hh, ww) if self.channels_last else (n, hh, ww)

    def buffer(self) -> torch.Tensor:
        """Flat scratch space for the largest chunk, in the compute dtype (see :meth:`scratch`)."""
        n = max(s1 - s0 for s0, s1 in self.spans)
        return torch.empty(math.prod(self._chunk_shape(n)), dtype=self.cdt, device=self.device)

    def chunk(self, t: torch.Tensor, s0: int, s1: int) -> torch.Tensor:
        """The part of a full-resolution tensor (in ``self.fmt``) that chunk ``s0:s1`` covers."""
        if self.by_image:
            return t[s0:s1]
        if self.channels_last:
            return t[:, s0:s1]
        b, c, hh, ww, _, _ = self.shape
        return t.view(b * c, hh, ww)[s0:s1]

    def scratch(self, buf: torch.Tensor, s0: int, s1: int) -> torch.Tensor:
        """Chunk ``s0:s1``'s shape on the front of a :meth:`buffer`, dense in ``self.fmt`` (the
        ATen upsampling kernels are much slower on strided tensors)."""
        shape = self._chunk_shape(s1 - s0)
        flat = buf[: math.prod(shape)]
        if not self.channels_last:
            return flat.view(shape)
        b, c, hh, ww = shape
        return flat.view(b, hh, ww, c).permute(0, 3, 1, 2)

    def mask(self, small: torch.Tensor, s0: int, s1: int, dst: torch.Tensor) -> torch.Tensor:
        """``sigmoid(Up(L))`` on chunk ``s0:s1``, written into ``dst`` (a dense tensor of the
        chunk's shape, in the compute dtype) and returned."""
        _, _, hh, ww, _, _ = self.shape
        ac = self.align_corners
        if self.by_image:
            _aten.upsample_bilinear2d.out(small[s0:s1], [hh, ww], ac, None, None, out=dst)
        elif self.channels_last:
            _aten.upsample_bilinear2d.out(small[:, s0:s1], [hh, ww], ac, None, None, out=dst)
        else:
            torch.matmul(self.a_h, small[s0:s1], out=dst)
        return dst.sigmoid_()


def forward(
    x: torch.Tensor, logits: torch.Tensor, offset: float, align_corners: bool
) -> torch.Tensor:
    """``x * (offset + sigmoid(Up(logits)))``; the output has the memory format of ``x``."""
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    plan = _Plan(x, logits, align_corners)
    work = out if _layout(out) == plan.fmt else torch.empty_like(x, memory_format=plan.fmt)
    xc = x.contiguous(memory_format=plan.fmt)
    small = plan.small(logits)
    # the mask of a chunk is built in the output itself when it can hold it, else in a buffer
    in_place = plan.dense_chunks and work.dtype == plan.cdt
    buf = None if in_place else plan.buffer()
    for s0, s1 in plan.spans:
        o_c = plan.chunk(work, s0, s1)
        m = plan.mask(small, s0, s1, o_c if buf is None else plan.scratch(buf, s0, s1))
        _apply_gain(plan.chunk(xc, s0, s1), m, offset, o_c)
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
    xc = x.contiguous(memory_format=plan.fmt)
    gc = grad.contiguous(memory_format=plan.fmt)
    gx_work = None
    if gx is not None:
        gx_work = gx if _layout(gx) == plan.fmt else torch.empty_like(x, memory_format=plan.fmt)
    small = plan.small(logits)
    buf = plan.buffer()
    # ``g x m (1 - m)`` of a chunk goes into the chunk of grad_x (overwritten afterwards) when
    # that can hold it, else into a second buffer
    in_place = gx_work is not None and plan.dense_chunks and gx_work.dtype == plan.cdt
    tmp = torch.empty_like(buf) if need_logits and not in_place else None  # flat, like buf
    red = None  # the logits gradient in the compute dtype
    if need_logits:
        if plan.channels_last:
            red = torch.empty(b, c, h, w, dtype=plan.cdt, device=x.device)
        else:
            # A_W^T (g x m (1 - m))^T for every row of every plane: (w, B·C·H); then A_H^T
            red = torch.empty(w, b * c * hh, dtype=plan.cdt, device=x.device)
            a_w_t = plan.a_w.t().contiguous()
    for s0, s1 in plan.spans:
        m = plan.mask(small, s0, s1, plan.scratch(buf, s0, s1))
        g_c, x_c = plan.chunk(gc, s0, s1), plan.chunk(xc, s0, s1)
        gx_c = None if gx_work is None else plan.chunk(gx_work, s0, s1)
        if red is not None:
            if in_place:
                assert gx_c is not None
                d = gx_c
            else:
                assert tmp is not None
                d = plan.scratch(tmp, s0, s1)
            _sigmoid_grad_times(g_c, x_c, m, d)
            if plan.by_image:
                _aten.upsample_bilinear2d_backward.grad_input(
                    d,
                    [hh, ww],
                    [s1 - s0, c, h, w],
                    align_corners,
                    None,
                    None,
                    grad_input=red[s0:s1],
                )
            elif plan.channels_last:
                _aten.upsample_bilinear2d_backward.grad_input(
                    d,
                    [hh, ww],
                    [b, s1 - s0, h, w],
                    align_corners,
                    None,
                    None,
                    grad_input=red[:, s0:s1],
                )
            else:
                torch.mm(a_w_t, d.reshape(-1, ww).t(), out=red[:, s0 * hh : s1 * hh])
        if gx_c is not None:
            _apply_gain(g_c, m, offset, gx_c)
    if gl is not None and red is not None:
        if plan.channels_last:
            gl.copy_(red)
        else:
            # (w, B·C, H) @ (H, h) -> (w, B·C, h) -> (B, C, h, w)
            gl.copy_(
                torch.matmul(red.view(w, b * c, hh), plan.a_h).permute(1, 2, 0).view(b, c, h, w)
            )
    if gx is not None and gx_work is not None and gx_work is not gx:
        gx.copy_(gx_work)
    return gx, gl
