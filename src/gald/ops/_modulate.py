r"""The Local Distribution modulation ``x * (offset + sigmoid(Up(logits)))`` as one fused op.

Reference: X. Li et al., "Global Aggregation then Local Distribution in Fully Convolutional
Networks", BMVC 2019 (arXiv 1909.07229): the LD gate ``F * M`` with the authors' residual
(``offset=1`` is their ``x + x * M``).

.. math::
    \mathrm{out} = x \odot \big(\mathrm{offset} + \sigma(A_H\, L\, A_W^\top)\big)

with ``A_H`` (H, h) and ``A_W`` (W, w) the bilinear interpolation matrices
(:mod:`gald.ops._interp`). The op is registered with ``torch.library.custom_op`` as
``gald::ld_modulate`` (its backward as ``gald::ld_modulate_backward``), so ``torch.compile``
traces through it without a graph break and ``torch.export`` keeps it as one node.

Memory: autograd saves only ``x`` and the low-resolution ``logits``; the backward recomputes the
mask. The authors' formulation also keeps the full-resolution sigmoid output alive.

Complexity: time O(B C H W h) (the mask is a matmul with inner size h, plus O(1) elementwise
work per element), extra memory O(B C h W) beyond the output.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from .._amp import compute_dtype
from .._validate import check_feature
from . import _ld_torch

IMPLS = ("reference", "torch", "triton")

_triton_module: ModuleType | None = None
_triton_error: str | None = None


def _triton() -> ModuleType | None:
    """The Triton kernels (``gald.ops._triton_ld``) when they import and triton is usable."""
    global _triton_module, _triton_error
    if _triton_module is None and _triton_error is None:
        try:
            from . import _triton_ld

            if not getattr(_triton_ld, "TRITON_AVAILABLE", False):
                _triton_error = "triton is not installed or does not import"
            else:
                _triton_module = _triton_ld
        except ImportError as exc:  # the module or triton itself is missing
            _triton_error = f"{type(exc).__name__}: {exc}"
    return _triton_module


def triton_available() -> bool:
    """Whether ``impl="triton"`` can run (triton imports and the kernels are present)."""
    return _triton() is not None


# --------------------------------------------------------------------------------------------
# The reference (oracle) formula


def ld_modulate_reference(
    x: torch.Tensor, logits: torch.Tensor, offset: float = 1.0, *, align_corners: bool = True
) -> torch.Tensor:
    """Plain-ops formula, kept as the oracle: ``x * (offset + sigmoid(Up(logits, x.shape[-2:])))``.

    Half-precision inputs are upsampled and passed through the sigmoid in float32, like the
    fused paths; the product is rounded once to the dtype of ``x``.
    """
    cdt = compute_dtype(x.dtype)
    mask = torch.sigmoid(
        F.interpolate(
            logits.to(cdt), size=x.shape[-2:], mode="bilinear", align_corners=align_corners
        )
    )
    return (x.to(cdt) * (offset + mask)).to(x.dtype)


# --------------------------------------------------------------------------------------------
# The custom ops


def _check_impl_in_op(impl: str) -> None:
    if impl not in ("torch", "triton"):
        raise ValueError(f"gald::ld_modulate: impl must be 'torch' or 'triton', got {impl!r}")


def _require_triton() -> ModuleType:
    mod = _triton()
    if mod is None:
        raise RuntimeError(
            "ld_modulate: impl='triton' needs triton and the gald Triton kernels "
            f"(pip install 'gald[triton]'); unavailable here: {_triton_error}"
        )
    return mod


def _no_autocast(x: torch.Tensor) -> torch.autocast:
    """The kernels pick their own precision: an enclosing autocast region must not recast the
    matmuls inside them (a custom op runs with the caller's autocast state)."""
    return torch.autocast(x.device.type, enabled=False)


@torch.library.custom_op("gald::ld_modulate", mutates_args=())
def _ld_modulate_op(
    x: torch.Tensor, logits: torch.Tensor, offset: float, align_corners: bool, impl: str
) -> torch.Tensor:
    _check_impl_in_op(impl)
    with _no_autocast(x):
        if impl == "triton":
            res = _require_triton().ld_modulate_fwd_triton(
                x.contiguous(), logits.contiguous(), float(offset), bool(align_corners)
            )
            return _like_or_empty(res, x, True)
        return _ld_torch.forward(x, logits, float(offset), bool(align_corners))


@_ld_modulate_op.register_fake
def _(x: torch.Tensor, logits: torch.Tensor, offset: float, align_corners: bool, impl: str):
    return torch.empty_like(x)


@torch.library.custom_op("gald::ld_modulate_backward", mutates_args=())
def _ld_modulate_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    logits: torch.Tensor,
    offset: float,
    align_corners: bool,
    impl: str,
    need_x: bool,
    need_logits: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_impl_in_op(impl)
    with _no_autocast(x):
        if impl == "triton":
            gx, gl = _require_triton().ld_modulate_bwd_triton(
                grad.contiguous(),
                x.contiguous(),
                logits.contiguous(),
                float(offset),
                bool(align_corners),
                bool(need_x),
                bool(need_logits),
            )
        else:
            gx, gl = _ld_torch.backward(
                grad, x, logits, float(offset), bool(align_corners), need_x, need_logits
            )
    return _like_or_empty(gx, x, need_x), _like_or_empty(gl, logits, need_logits)


def _like_or_empty(g: torch.Tensor | None, ref: torch.Tensor, needed: bool) -> torch.Tensor:
    """``g`` with the strides of ``empty_like(ref)`` (what the fake kernel promises); copied
    only when its layout or dtype differs."""
    if not needed or g is None:
        return ref.new_empty(0)
    # the strides empty_like would give, read off a meta tensor (no allocation)
    if g.stride() == torch.empty_like(ref, device="meta").stride() and g.dtype == ref.dtype:
        return g
    return torch.empty_like(ref).copy_(g)


@_ld_modulate_backward_op.register_fake
def _(grad, x, logits, offset, align_corners, impl, need_x, need_logits):
    gx = torch.empty_like(x) if need_x else x.new_empty(0)
    gl = torch.empty_like(logits) if need_logits else logits.new_empty(0)
    return gx, gl


def _setup_context(ctx, inputs, output) -> None:
    x, logits, offset, align_corners, impl = inputs
    ctx.save_for_backward(x, logits)
    ctx.offset = offset
    ctx.align_corners = align_corners
    ctx.impl = impl


def _backward(ctx, grad):
    x, logits = ctx.saved_tensors
    need_x, need_logits = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gx, gl = torch.ops.gald.ld_modulate_backward(
        grad, x, logits, ctx.offset, ctx.align_corners, ctx.impl, need_x, need_logits
    )
    return (gx if need_x else None, gl if need_logits else None, None, None, None)


_ld_modulate_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# The public entry point


def _exporting() -> bool:
    """True while an exporter traces: they get the plain-ops formula (standard ONNX ops)."""
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    return torch.onnx.is_in_onnx_export()


def _check_inputs(x: object, logits: object, offset: object, align_corners: object) -> None:
    check_feature(x, None, name="x", who="ld_modulate")
    check_feature(logits, None, name="logits", who="ld_modulate")
    assert isinstance(x, torch.Tensor)
    assert isinstance(logits, torch.Tensor)
    if x.shape[:2] != logits.shape[:2]:
        raise ValueError(
            "ld_modulate: logits must have the batch and channels of x, (B, C, h, w) = "
            f"({x.shape[0]}, {x.shape[1]}, h, w), got x {tuple(x.shape)} and logits "
            f"{tuple(logits.shape)}"
        )
    if logits.shape[-2] < 1 or logits.shape[-1] < 1:
        raise ValueError(
            f"ld_modulate: logits must have h, w >= 1, got shape {tuple(logits.shape)}"
        )
    if x.dtype != logits.dtype:
        raise TypeError(
            f"ld_modulate: logits must have the dtype of x ({x.dtype}), got {logits.dtype}"
        )
    if x.device != logits.device:
        raise ValueError(
            f"ld_modulate: logits must be on the device of x ({x.device}), got {logits.device}"
        )
    if isinstance(offset, bool) or not isinstance(offset, (int, float)):
        raise TypeError(f"ld_modulate: offset must be a float, got {type(offset).__name__}")
    if not isinstance(align_corners, bool):
        raise TypeError(
            f"ld_modulate: align_corners must be a bool, got {type(align_corners).__name__}"
        )


def resolve_impl(x: torch.Tensor, impl: str | None) -> str:
    """The implementation ``impl`` stands for on ``x`` (``None`` -> the best available)."""
    if impl is None:
        if _exporting():
            return "reference"
        if x.device.type == "cuda" and triton_available():
            return "triton"
        return "torch"
    if impl not in IMPLS:
        raise ValueError(f"ld_modulate: impl must be None or one of {IMPLS}, got {impl!r}")
    if impl == "triton":
        _require_triton()
    return impl


def ld_modulate(
    x: torch.Tensor,
    logits: torch.Tensor,
    offset: float = 1.0,
    *,
    align_corners: bool = True,
    impl: str | None = None,
) -> torch.Tensor:
    r"""Compute ``x * (offset + sigmoid(Up(logits, x.shape[-2:])))`` with a memory-lean backward.

    ``Up`` is bilinear interpolation (``F.interpolate(mode="bilinear")`` semantics, including
    ``align_corners``; ``h > H`` subsamples like it).

    Args:
        x: the feature to modulate.
        logits: the low-resolution mask logits (the LD branch output).
        offset: constant added to the mask (``1`` = the authors' ``x + x * M``).
        align_corners: as in ``F.interpolate``.
        impl: ``None`` picks the best available (the Triton kernel for CUDA tensors when triton
            imports, else ``"torch"``; the reference formula while exporting or tracing, so
            ONNX graphs hold standard ops only); ``"reference"`` the plain-ops formula (the
            oracle; autograd saves the full-resolution mask); ``"torch"`` the chunked
            plain-PyTorch path (CPU and CUDA); ``"triton"`` the kernel (``RuntimeError`` when
            unavailable).

    Shape:
        - x: :math:`(B, C, H, W)`, any memory format (channels_last is kept).
        - logits: :math:`(B, C, h, w)`, any ``h, w >= 1``.
        - Output: :math:`(B, C, H, W)`, the memory format of ``x``.

    dtypes: float32 and float64 are exact to rounding; float16 and bfloat16 compute the mask,
    the sigmoid and the reduction of the backward in float32 and round once. The op is
    deterministic on CPU. Double backward is not supported.

    Complexity: time O(B C H W h), extra memory O(B C h W) beyond the output; autograd saves
    ``x`` and ``logits`` only. On CPU the output (and the input gradient) of tens of MB is
    backed by transparent huge pages where Linux offers them (``GALD_HUGEPAGES=0`` turns this
    off; see :mod:`gald.ops._alloc`).
    """
    _check_inputs(x, logits, offset, align_corners)
    which = resolve_impl(x, impl)
    if which == "reference":
        return ld_modulate_reference(x, logits, float(offset), align_corners=align_corners)
    return _ld_modulate_op(x, logits, float(offset), align_corners, which)
