"""Hypothesis strategies for (B, C, H, W) feature maps.

Hypothesis is an optional dependency (``pip install hypothesis``, or the ``gald[testing]``
extra): this module imports without it, and each strategy raises ``ImportError`` saying so when
it is called without hypothesis installed.

Values are drawn as a seed for ``torch.randn``, not element by element, so that maps of
thousands of elements stay cheap; hypothesis shrinks the shape (smaller batch and sides first).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._validate import check_float, check_int, check_positive_int
from ..registry import _declared_width
from ._contract import declared_min_size

_FORMATS = (torch.contiguous_format, torch.channels_last)


def _hypothesis() -> Any:
    try:
        from hypothesis import strategies as st
    except ImportError as err:
        raise ImportError(
            "gald.testing strategies need hypothesis: pip install hypothesis "
            "(or pip install 'gald[testing]')"
        ) from err
    return st


def _bounds(value: object, name: str, minimum: int) -> tuple[int, int]:
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a (low, high) pair, got {value!r}")
        lo, hi = (check_int(v, name) for v in value)
    else:
        lo = hi = check_int(value, name)
    if lo < minimum or hi < lo:
        raise ValueError(f"{name} must satisfy {minimum} <= low <= high, got {value!r}")
    return lo, hi


def feature_maps(
    channels: int,
    *,
    batch: int | tuple[int, int] = (0, 3),
    height: int | tuple[int, int] = (1, 40),
    width: int | tuple[int, int] = (1, 40),
    dtype: torch.dtype = torch.float32,
    memory_format: torch.memory_format | Sequence[torch.memory_format] = _FORMATS,
    scale: float = 1.0,
) -> Any:
    """A strategy for standard-normal ``(B, channels, H, W)`` tensors.

    ``batch``, ``height`` and ``width`` are an int or an inclusive ``(low, high)`` range;
    ``memory_format`` one format or a sequence to draw from (contiguous and channels_last by
    default); values are ``scale * N(0, 1)`` in ``dtype``.

    Example:
        >>> from hypothesis import given
        >>> from gald.testing import feature_maps
        >>> @given(feature_maps(16, height=(1, 8), width=(1, 8)))
        ... def test_shape(x):
        ...     assert my_layer(x).shape == x.shape
    """
    st = _hypothesis()
    channels = check_positive_int(channels, "channels")
    scale = check_float(scale, "scale")
    b_lo, b_hi = _bounds(batch, "batch", 0)
    h_lo, h_hi = _bounds(height, "height", 1)
    w_lo, w_hi = _bounds(width, "width", 1)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if isinstance(memory_format, torch.memory_format):
        formats: tuple[Any, ...] = (memory_format,)
    elif isinstance(memory_format, Sequence) and not isinstance(memory_format, str):
        formats = tuple(memory_format)
    else:
        formats = ()
    if not formats or not all(isinstance(f, torch.memory_format) for f in formats):
        raise TypeError(
            "memory_format must be a torch.memory_format or a non-empty sequence of them, "
            f"got {memory_format!r}"
        )
    four_d = (torch.contiguous_format, torch.channels_last, torch.preserve_format)
    other = [f for f in formats if f not in four_d]
    if other:
        raise ValueError(
            "memory_format must be one of torch.contiguous_format, torch.channels_last and "
            f"torch.preserve_format for (B, C, H, W) tensors, got {other[0]}"
        )

    def make(b: int, h: int, w: int, fmt: torch.memory_format, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(b, channels, h, w, generator=gen, dtype=torch.float32) * scale
        return x.to(dtype).contiguous(memory_format=fmt)

    return st.builds(
        make,
        st.integers(b_lo, b_hi),
        st.integers(h_lo, h_hi),
        st.integers(w_lo, w_hi),
        st.sampled_from(formats),
        st.integers(0, 2**32 - 1),
    )


def _channels_of(module: nn.Module) -> int:
    declared = _declared_width(module)
    if declared is None:
        raise TypeError(
            f"cannot tell the input channels of {type(module).__name__}: it has no int "
            "'in_channels' or 'channels' attribute; pass channels="
        )
    return declared[1]


def ga_inputs(
    module: nn.Module,
    *,
    channels: int | None = None,
    batch: int | tuple[int, int] = (0, 3),
    max_side: int = 40,
    dtype: torch.dtype | None = None,
    memory_format: torch.memory_format | Sequence[torch.memory_format] = _FORMATS,
) -> Any:
    """A strategy for inputs ``module`` accepts: :func:`feature_maps` with sides from the
    module's declared minimum (its ``min_size`` attribute, 1 when absent) up to
    ``max(minimum, max_side)``.

    ``channels`` defaults to the module's ``in_channels`` or ``channels`` attribute, ``dtype`` to
    the dtype of its first floating parameter (float32 without one). In train mode, layers with
    BatchNorm need ``batch=(2, ...)``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    c = _channels_of(module) if channels is None else check_positive_int(channels, "channels")
    min_h, min_w = declared_min_size(module)
    max_side = check_positive_int(max_side, "max_side")
    if dtype is None:
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    return feature_maps(
        c,
        batch=batch,
        height=(min_h, max(min_h, max_side)),
        width=(min_w, max(min_w, max_side)),
        dtype=dtype,
        memory_format=memory_format,
    )
