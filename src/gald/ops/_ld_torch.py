"""The fast plain-PyTorch path of the LD modulation, forward and backward.

``out = x * (offset + sigmoid(A_h @ L @ A_w^T))`` with the interpolation matrices of
:mod:`gald.ops._interp`. The small map is first interpolated along one axis (cheap, it stays
small); the full-resolution mask is then produced chunk by chunk, each chunk one (batched)
matmul into a cache-sized buffer, passed through an in-place sigmoid and written straight into
the output. For a dense ``x`` no full-resolution temporary is allocated: the forward allocates
the output only, the backward the input gradient only (both through :mod:`gald.ops._alloc`).

The backward recomputes the mask chunk by chunk from the saved ``x`` and ``logits``::

    grad_x      = g * (offset + m)
    grad_logits = A_h^T @ (g * x * m * (1 - m)) @ A_w

Both layouts are handled natively: NCHW (rows of ``W``) and channels_last (rows of ``W * C``).
Half-precision inputs are computed in float32 (mask, sigmoid, products and the reduction) and
rounded once when written. Every step is a fixed-order matmul or elementwise op, so the results
are deterministic.
"""

from __future__ import annotations

import torch

from .._amp import compute_dtype
from . import _alloc
from ._interp import interp_matrix

# Elements per chunk buffer (1 MiB in float32): large enough to amortise the per-op overhead
# (and the thread synchronisation of every op), small enough that the mask chunk and the x and
# output chunks it meets stay in cache. Tuned on the 2-core CI machine.
CPU_CHUNK_ELEMS = 1 << 18


def _chunk_elems(device: torch.device) -> int:
    # On an accelerator one large kernel beats many small ones.
    return CPU_CHUNK_ELEMS if device.type == "cpu" else 1 << 62


def _layout(t: torch.Tensor) -> torch.memory_format | None:
    if t.is_contiguous():
        return torch.contiguous_format
    if t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


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
    """``out = g * x * m * (1 - m)`` in ``out``'s dtype."""
    if g.dtype == out.dtype:
        torch.mul(g, x, out=out)
    else:
        out.copy_(g)
        out.mul_(x)
    out.mul_(m)
    out.addcmul_(out, m, value=-1.0)


class _Plan:
    """Interpolation matrices and the view of the problem as rows of a matrix."""

    def __init__(self, x: torch.Tensor, logits: torch.Tensor, align_corners: bool) -> None:
        b, c, hh, ww = x.shape
        h, w = logits.shape[-2:]
        self.cdt = compute_dtype(x.dtype)
        self.a_h = interp_matrix(
            hh, h, align_corners=align_corners, dtype=self.cdt, device=x.device
        )
        self.a_w = interp_matrix(
            ww, w, align_corners=align_corners, dtype=self.cdt, device=x.device
        )
        self.shape = (b, c, hh, ww, h, w)
        fmt = _layout(x)
        self.fmt = fmt if fmt is not None else torch.contiguous_format
        self.chunk = _chunk_elems(x.device)


def _small_nchw(plan: _Plan, logits: torch.Tensor) -> torch.Tensor:
    """``L @ A_w^T`` for every (b, c): shape (B * C, h, W)."""
    b, c, _, ww, h, w = plan.shape
    lg = logits.to(plan.cdt).reshape(b * c * h, w)
    return torch.mm(lg, plan.a_w.t()).view(b * c, h, ww)


def _small_nhwc(plan: _Plan, logits: torch.Tensor) -> torch.Tensor:
    """``L @ A_w^T`` laid out channels-last: shape (B, h, W * C)."""
    b, c, _, ww, h, _ = plan.shape
    lg = logits.to(plan.cdt).permute(0, 2, 3, 1)  # (B, h, w, C)
    return torch.matmul(plan.a_w, lg).reshape(b, h, ww * c)


def _rows_nhwc(t: torch.Tensor) -> torch.Tensor:
    b, c, hh, ww = t.shape
    return t.permute(0, 2, 3, 1).reshape(b, hh, ww * c)  # a view: t is channels_last


def forward(
    x: torch.Tensor, logits: torch.Tensor, offset: float, align_corners: bool
) -> torch.Tensor:
    """``x * (offset + sigmoid(Up(logits)))``; the output has the memory format of ``x``."""
    out = _alloc.empty_like(x)
    if x.numel() == 0:
        return out
    plan = _Plan(x, logits, align_corners)
    work = out if _layout(out) is not None else _alloc.empty_like(x, memory_format=plan.fmt)
    xc = x.contiguous(memory_format=plan.fmt)
    b, c, hh, ww, h, _ = plan.shape
    if plan.fmt == torch.channels_last:
        t = _small_nhwc(plan, logits)
        xr, orow = _rows_nhwc(xc), _rows_nhwc(work)
        step = max(1, plan.chunk // (ww * c))
        buf = torch.empty(min(step, hh), ww * c, dtype=plan.cdt, device=x.device)
        for bi in range(b):
            for r0 in range(0, hh, step):
                r1 = min(r0 + step, hh)
                m = buf[: r1 - r0]
                torch.mm(plan.a_h[r0:r1], t[bi], out=m)
                m.sigmoid_()
                _apply_gain(xr[bi, r0:r1], m, offset, orow[bi, r0:r1])
    else:
        t = _small_nchw(plan, logits)
        planes = b * c
        xr, orow = xc.view(planes, hh, ww), work.view(planes, hh, ww)
        step = max(1, plan.chunk // (hh * ww))
        n = min(step, planes)
        buf = torch.empty(n, hh, ww, dtype=plan.cdt, device=x.device)
        a_h = plan.a_h.expand(n, hh, h)
        for p0 in range(0, planes, step):
            p1 = min(p0 + step, planes)
            m = buf[: p1 - p0]
            torch.bmm(a_h[: p1 - p0], t[p0:p1], out=m)
            m.sigmoid_()
            _apply_gain(xr[p0:p1], m, offset, orow[p0:p1])
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
    gx = _alloc.empty_like(x) if need_x else None
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
        gx_work = gx if _layout(gx) is not None else _alloc.empty_like(x, memory_format=plan.fmt)
    dev = x.device
    if plan.fmt == torch.channels_last:
        t = _small_nhwc(plan, logits)
        xr, gr = _rows_nhwc(xc), _rows_nhwc(gc)
        gxr = _rows_nhwc(gx_work) if gx_work is not None else None
        step = max(1, plan.chunk // (ww * c))
        n = min(step, hh)
        buf = torch.empty(n, ww * c, dtype=plan.cdt, device=dev)
        tmp = torch.empty(n, ww * c, dtype=plan.cdt, device=dev) if need_logits else None
        acc = torch.zeros(b, h, ww * c, dtype=plan.cdt, device=dev) if need_logits else None
        for bi in range(b):
            for r0 in range(0, hh, step):
                r1 = min(r0 + step, hh)
                m = buf[: r1 - r0]
                torch.mm(plan.a_h[r0:r1], t[bi], out=m)
                m.sigmoid_()
                if tmp is not None and acc is not None:
                    d = tmp[: r1 - r0]
                    _sigmoid_grad_times(gr[bi, r0:r1], xr[bi, r0:r1], m, d)
                    acc[bi].addmm_(plan.a_h[r0:r1].t(), d)
                if gxr is not None:
                    _apply_gain(gr[bi, r0:r1], m, offset, gxr[bi, r0:r1])
        if gl is not None and acc is not None:
            # (w, W) @ (B, h, W, C) -> (B, h, w, C)
            red = torch.matmul(plan.a_w.t(), acc.view(b, h, ww, c))
            gl.copy_(red.permute(0, 3, 1, 2))
    else:
        t = _small_nchw(plan, logits)
        planes = b * c
        xr, gr = xc.view(planes, hh, ww), gc.view(planes, hh, ww)
        gxr = gx_work.view(planes, hh, ww) if gx_work is not None else None
        step = max(1, plan.chunk // (hh * ww))
        n = min(step, planes)
        buf = torch.empty(n, hh, ww, dtype=plan.cdt, device=dev)
        tmp = torch.empty(n, hh, ww, dtype=plan.cdt, device=dev) if need_logits else None
        # A_h^T @ (g x m (1 - m)), per plane: (B * C, h, W)
        u = torch.empty(planes, h, ww, dtype=plan.cdt, device=dev) if need_logits else None
        a_h = plan.a_h.expand(n, hh, h)
        a_ht = plan.a_h.t().expand(n, h, hh)
        for p0 in range(0, planes, step):
            p1 = min(p0 + step, planes)
            k = p1 - p0
            m = buf[:k]
            torch.bmm(a_h[:k], t[p0:p1], out=m)
            m.sigmoid_()
            if tmp is not None and u is not None:
                d = tmp[:k]
                _sigmoid_grad_times(gr[p0:p1], xr[p0:p1], m, d)
                torch.bmm(a_ht[:k], d, out=u[p0:p1])
            if gxr is not None:
                _apply_gain(gr[p0:p1], m, offset, gxr[p0:p1])
        if gl is not None and u is not None:
            # (B * C * h, W) @ (W, w) -> (B, C, h, w)
            red = torch.mm(plan.a_w.t(), u.view(planes * h, ww).t()).t()
            gl.copy_(red.reshape(b, c, h, w))
    if gx is not None and gx_work is not None and gx_work is not gx:
        gx.copy_(gx_work)
    return gx, gl
