"""Bilinear interpolation as a matrix, so that upsampling a small map is two small matmuls.

For one axis, ``Up(v) = A @ v`` with ``A`` of shape (n_out, n_in) and two non-zeros per row:
the weights PyTorch's ``upsample_bilinear2d`` uses (``F.interpolate(..., mode="bilinear")`` with
a ``size``, no ``scale_factor``). A 2-D bilinear upsample of a (h, w) map is then
``A_h @ L @ A_w^T``, and its adjoint (the backward) is ``A_h^T @ G @ A_w``.
"""

from __future__ import annotations

import functools

import torch


def _source_index(n_out: int, n_in: int, align_corners: bool) -> torch.Tensor:
    """Real-valued source coordinate of every output index, as ``area_pixel_compute_source_index``."""
    dst = torch.arange(n_out, dtype=torch.float64)
    if align_corners:
        scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        return dst * scale
    src = (dst + 0.5) * (n_in / n_out) - 0.5
    return src.clamp_min(0.0)


@functools.lru_cache(maxsize=64)
def _interp_matrix_cached(
    n_out: int, n_in: int, align_corners: bool, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    src = _source_index(n_out, n_in, align_corners)
    i0 = src.floor().to(torch.int64).clamp(max=n_in - 1)
    lam = (src - i0.to(torch.float64)).clamp(0.0, 1.0)
    i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
    rows = torch.arange(n_out)
    a = torch.zeros(n_out, n_in, dtype=torch.float64)
    a.index_put_((rows, i0), 1.0 - lam, accumulate=True)
    a.index_put_((rows, i1), lam, accumulate=True)
    return a.to(dtype=dtype, device=device)


def interp_matrix(
    n_out: int, n_in: int, *, align_corners: bool, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The (n_out, n_in) bilinear interpolation matrix of one axis.

    Cached per (sizes, align_corners, dtype, device); the returned tensor is shared, so callers
    must not modify it. It is built outside inference mode so that it may meet autograd.
    """
    if n_out < 1 or n_in < 1:
        raise ValueError(f"interpolation sizes must be >= 1, got n_out={n_out}, n_in={n_in}")
    with torch.inference_mode(False), torch.no_grad():
        return _interp_matrix_cached(n_out, n_in, bool(align_corners), dtype, torch.device(device))
