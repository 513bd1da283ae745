r"""The Local Distribution modulation ``x * (offset + sigmoid(Up(logits)))`` as one fused op.

Reference: X. Li et al., "Global Aggregation then Local Distribution in Fully Convolutional
Networks", BMVC 2019 (arXiv 1909.07229): the LD gate ``F * M`` with the authors' residual
(``offset=1`` is their ``x + x * M``).

.. math::
    \mathrm{out} = x \odot \big(\mathrm{offset} + \sigma(A_H\, L\, A_W^\top)\big)

with ``A_H`` (H, h) and ``A_W`` (W, w) the bilinear interpolation matrices
(:mod:`gald.ops._interp`). The op is the ``torch.library`` operator ``gald::ld_modulate`` (its
backward ``gald::ld_modulate_backward``) with a fake (meta) kernel and an autograd formula, so
``torch.compile`` traces through it without a graph break and ``torch.export`` keeps it as one
node. Two kernels implement it: the plain-PyTorch one (:mod:`gald.ops._ld_torch`, any device)
and the Triton one (:mod:`gald.ops._triton_ld`, CUDA).

Memory: autograd saves only ``x`` and the low-resolution ``logits``; the backward recomputes the
mask. The authors' formulation also keeps the full-resolution mask (the sigmoid's output)
alive.
"""

from __future__ import annotations

import math
import sys
import warnings
from types import ModuleType

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from .._amp import autocast_off, compute_dtype
from .._validate import check_bool, check_choice, check_feature, check_float, first_line
from . import _ld_torch

IMPLS = ("auto", "reference", "torch", "triton")

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


# --------------------------------------------------------------------------------------------
# The reference (oracle) formula


def ld_modulate_reference(
    x: torch.Tensor, logits: torch.Tensor, offset: float = 1.0, *, align_corners: bool = True
) -> torch.Tensor:
    """Plain-ops formula, kept as the oracle: ``x * (offset + sigmoid(Up(logits, x.shape[-2:])))``.

    Half-precision inputs are upsampled and passed through the sigmoid in float32, like the
    fused paths; the product is rounded once to the dtype of ``x``. The inputs are checked as
    :func:`ld_modulate` checks them (no broadcasting of ``logits`` over batch or channels).
    Where plain ops differ from the op: an infinite logit gives NaN here (``F.interpolate``
    multiplies it by zero weights), where :func:`ld_modulate` saturates the sigmoid; and
    ``F.interpolate`` refuses zero channels, which the op returns empty.
    """
    offset, align_corners = _check_inputs(x, logits, offset, align_corners)
    cdt = compute_dtype(x.dtype)
    mask = torch.sigmoid(
        F.interpolate(
            logits.to(cdt), size=x.shape[-2:], mode="bilinear", align_corners=align_corners
        )
    )
    return (x.to(cdt) * (offset + mask)).to(x.dtype)


# --------------------------------------------------------------------------------------------
# The custom ops
#
# Defined with ``torch.library.Library`` rather than the ``torch.library.custom_op`` decorator:
# the decorator's op imports ``torch._dynamo`` on its first call (over a second), this one does
# not, and both give the same fake (meta) kernel, autograd formula, ``torch.compile`` and
# ``torch.export`` support.

_LIB = torch.library.Library("gald", "DEF")
_LIB.define(
    "ld_modulate(Tensor x, Tensor logits, float offset, bool align_corners, str impl) -> Tensor"
)
_LIB.define(
    "ld_modulate_backward(Tensor grad, Tensor x, Tensor logits, float offset, "
    "bool align_corners, str impl, bool need_x, bool need_logits) -> (Tensor, Tensor)"
)


def _kernel_impl(impl: str, x: torch.Tensor) -> str:
    """The kernel the op runs for ``impl`` on ``x`` (``"auto"`` resolved here, at run time, so
    a traced or compiled graph keeps ``"auto"`` and decides on the device it runs on)."""
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(
            f"gald::ld_modulate: impl must be 'auto', 'torch' or 'triton', got {impl!r}"
        )
    return _auto_impl(x) if impl == "auto" else impl


_launches: dict[tuple[torch.device, torch.dtype], bool] = {}


def _triton_launches(device: torch.device, dtype: torch.dtype, kernels: ModuleType) -> bool:
    """Whether the Triton kernels launch on ``device`` in ``dtype``: a forward and a backward of
    a 2x2 map, once per device and dtype. Triton builds its launcher with the host's C compiler
    and loads ``libcuda`` on the first launch; an environment without them (a slim runtime
    image) runs CUDA PyTorch but not Triton. Then the automatic choice warns once, naming the
    reason, and takes the torch kernel."""
    key = (device, dtype)
    if key in _launches:
        return _launches[key]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return True  # no trial launch inside a CUDA graph capture
    try:
        with torch.no_grad():
            x = torch.ones(1, 1, 2, 2, device=device, dtype=dtype)
            logits = torch.zeros(1, 1, 1, 1, device=device, dtype=dtype)
            kernels.ld_modulate_fwd_triton(x, logits, 1.0, True)
            kernels.ld_modulate_bwd_triton(x, x, logits, 1.0, True, True, True)
    except Exception as exc:  # what Triton raises here varies: compiler, driver, assertion
        warnings.warn(
            f"gald.ops.ld_modulate: the Triton kernels do not run on {device} in {dtype} "
            f"({type(exc).__name__}: {first_line(exc)}); impl='auto' uses the torch kernel "
            "there. Triton needs a C compiler (the CC variable, or build-essential) and the "
            "CUDA driver library; pass impl='torch' to choose the torch kernel without this "
            "warning",
            RuntimeWarning,
            stacklevel=2,
        )
        _launches[key] = False
        return False
    _launches[key] = True
    return True


def _auto_impl(x: torch.Tensor) -> str:
    """What ``impl="auto"`` runs on ``x``: the Triton kernel for a CUDA tensor when triton
    imports, supports the dtype and launches on the device, else the torch kernel."""
    if x.device.type != "cuda":
        return "torch"
    kernels = _triton()
    if kernels is None or kernels.unsupported_dtype(x.dtype) is not None:
        return "torch"
    return "triton" if _triton_launches(x.device, x.dtype, kernels) else "torch"


def _require_triton() -> ModuleType:
    mod = _triton()
    if mod is None:
        raise RuntimeError(
            "ld_modulate: impl='triton' needs triton and the gald Triton kernels "
            f"(pip install 'gald[triton]'); unavailable here: {_triton_error}"
        )
    return mod


def _like(g: torch.Tensor | None, ref: torch.Tensor, needed: bool) -> torch.Tensor:
    """``g`` with the dtype and strides of ``empty_like(ref)`` (what the fake kernel promises),
    copied only when they differ; an empty tensor when the gradient is not needed."""
    if not needed or g is None:
        return ref.new_empty(0)
    if g.dtype == ref.dtype and g.stride() == torch.empty_like(ref, device="meta").stride():
        return g
    return torch.empty_like(ref).copy_(g)


def _saturated(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` with +-inf replaced by +-(largest finite value / 4): an infinite logit
    saturates the sigmoid, as such a value does. Both kernels interpolate with weights that can
    be exactly zero (the torch kernel multiplies every logit by the zero weights of the
    positions it does not reach, the Triton kernel its two neighbours by their weights), and
    0 * inf is nan. A convex combination of these values stays finite. A nan logit stays nan."""
    big = torch.finfo(logits.dtype).max / 4
    return torch.nan_to_num(logits, nan=math.nan, posinf=big, neginf=-big)


def _has_tangent(*tensors: torch.Tensor) -> bool:
    """Whether any of ``tensors`` carries a forward-mode tangent (``torch.func.jvp`` /
    ``jacfwd`` included)."""
    return any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _refuse_tangents(op: str, *tensors: torch.Tensor) -> None:
    """Forward-mode AD has no formula here: the op called directly with dual tensors would
    return a result without a tangent (a zero derivative), so it raises instead."""
    if _has_tangent(*tensors):
        raise NotImplementedError(
            f"{op} has no forward-mode derivative (jvp): forward-mode AD (torch.func.jvp, "
            "jacfwd, torch.autograd.forward_ad) is not supported by the fused op; use "
            "gald.ops.ld_modulate_reference, whose plain ops support it"
        )


def _modulate_kernel(
    x: torch.Tensor, logits: torch.Tensor, offset: float, align_corners: bool, impl: str
) -> torch.Tensor:
    _check_inputs(x, logits, offset, align_corners)  # the op may be called directly
    _refuse_tangents("gald::ld_modulate", x, logits)
    impl = _kernel_impl(impl, x)
    # the kernels choose their own precision: an enclosing autocast must not recast them; they
    # are the op's implementation, never differentiated through (torch.func runs them with
    # tensors that track gradients at an outer level)
    with autocast_off(x.device.type), torch.no_grad():
        lg = _saturated(logits)
        if impl == "triton":
            out = _require_triton().ld_modulate_fwd_triton(x, lg, offset, align_corners)
        else:
            out = _ld_torch.forward(x, lg, offset, align_corners)
    return _like(out, x, True)


def _modulate_fake(
    x: torch.Tensor, logits: torch.Tensor, offset: float, align_corners: bool, impl: str
) -> torch.Tensor:
    _check_inputs(x, logits, offset, align_corners)
    return torch.empty_like(x)


def _backward_kernel(
    grad: torch.Tensor,
    x: torch.Tensor,
    logits: torch.Tensor,
    offset: float,
    align_corners: bool,
    impl: str,
    need_x: bool,
    need_logits: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_backward_inputs(grad, x, logits, offset, align_corners)
    _refuse_tangents("gald::ld_modulate_backward", grad, x, logits)
    impl = _kernel_impl(impl, x)
    with autocast_off(x.device.type), torch.no_grad():
        lg = _saturated(logits)
        kernels = _require_triton() if impl == "triton" else None
        if kernels is not None and (
            not need_logits or kernels.bwd_window_fits(x.shape[-1], lg.shape[-1], align_corners)
        ):
            gx, gl = kernels.ld_modulate_bwd_triton(
                grad, x, lg, offset, align_corners, need_x, need_logits
            )
        else:  # the torch kernel, also for logits too wide for the Triton backward's window
            gx, gl = _ld_torch.backward(grad, x, lg, offset, align_corners, need_x, need_logits)
    return _like(gx, x, need_x), _like(gl, logits, need_logits)


def _backward_fake(
    grad: torch.Tensor,
    x: torch.Tensor,
    logits: torch.Tensor,
    offset: float,
    align_corners: bool,
    impl: str,
    need_x: bool,
    need_logits: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_backward_inputs(grad, x, logits, offset, align_corners)
    gx = torch.empty_like(x) if need_x else x.new_empty(0)
    gl = torch.empty_like(logits) if need_logits else logits.new_empty(0)
    return gx, gl


def _setup_context(ctx, inputs, output) -> None:
    x, logits, offset, align_corners, impl = inputs
    ctx.save_for_backward(x, logits)
    ctx.offset = offset
    ctx.align_corners = align_corners
    ctx.impl = impl


def _autograd_backward(ctx, grad):
    x, logits = ctx.saved_tensors
    need_x, need_logits = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    args = (grad, x, logits, ctx.offset, ctx.align_corners, ctx.impl, need_x, need_logits)
    if torch.is_grad_enabled():  # create_graph=True or torch.func: the gradients get a graph
        gx, gl = _Backward.apply(*args)
    else:
        gx, gl = torch.ops.gald.ld_modulate_backward(*args)
    return (gx if need_x else None, gl if need_logits else None, None, None, None)


class _Backward(torch.autograd.Function):
    """The backward op with a derivative that refuses: without it, autograd would treat the
    first gradients as constants and a double backward would silently give zero."""

    generate_vmap_rule = True  # torch.func.jacrev vmaps over the backward

    @staticmethod
    def forward(*args):  # type: ignore[override]
        return torch.ops.gald.ld_modulate_backward(*args)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        pass

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        raise RuntimeError(
            "ld_modulate has no second derivative: differentiating its gradients (double "
            "backward, a gradient penalty) is not supported by the fused op; use "
            "gald.ops.ld_modulate_reference, whose plain-ops autograd differentiates twice"
        )


class _LDModulate(torch.autograd.Function):
    """The op's autograd for :func:`ld_modulate`, as an ``autograd.Function`` with a separate
    ``setup_context``: the form ``torch.func`` transforms (``grad``, ``vjp``, ``jacrev``) accept.
    ``vmap`` runs the op sample by sample (PyTorch's fallback for an op without a batching
    rule, which warns); ``jacfwd`` and ``hessian`` raise (no forward-mode formula, and no
    second derivative). Calling ``torch.ops.gald.ld_modulate`` directly uses the same formula
    (registered below)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, logits, offset, align_corners, impl):  # type: ignore[override]
        return torch.ops.gald.ld_modulate(x, logits, offset, align_corners, impl)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        _setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _autograd_backward(ctx, grad)


_LIB.impl("ld_modulate", _modulate_kernel, "CompositeExplicitAutograd")
_LIB.impl("ld_modulate_backward", _backward_kernel, "CompositeExplicitAutograd")
torch.library.register_fake("gald::ld_modulate", _modulate_fake, lib=_LIB)
torch.library.register_fake("gald::ld_modulate_backward", _backward_fake, lib=_LIB)
torch.library.register_autograd(
    "gald::ld_modulate", _autograd_backward, setup_context=_setup_context, lib=_LIB
)


# --------------------------------------------------------------------------------------------
# The public entry point


def _exporting() -> bool:
    """True while an exporter traces: they get the plain-ops formula (standard ONNX ops)."""
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    # torch.onnx is imported lazily and costs a noticeable share of the first call when it is
    # imported here; a process that has not imported it cannot be exporting
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and bool(onnx.is_in_onnx_export())


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_inputs(
    x: object, logits: object, offset: object, align_corners: object
) -> tuple[float, bool]:
    """Check the op's arguments; ``offset`` and ``align_corners`` as Python float and bool (a
    NumPy scalar passes the checks, and the op's schema takes Python types only)."""
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
    if x.dtype not in _DTYPES:
        raise TypeError(
            f"ld_modulate: x must be float16, bfloat16, float32 or float64, got {x.dtype}"
        )
    if x.dtype != logits.dtype:
        raise TypeError(
            f"ld_modulate: logits must have the dtype of x ({x.dtype}), got {logits.dtype}"
        )
    if x.device != logits.device:
        raise ValueError(
            f"ld_modulate: logits must be on the device of x ({x.device}), got {logits.device}"
        )
    return (
        check_float(offset, "ld_modulate: offset"),
        check_bool(align_corners, "ld_modulate: align_corners"),
    )


def _check_backward_inputs(
    grad: object, x: torch.Tensor, logits: torch.Tensor, offset: object, align_corners: object
) -> None:
    _check_inputs(x, logits, offset, align_corners)
    if not isinstance(grad, torch.Tensor) or grad.shape != x.shape or grad.dtype != x.dtype:
        got = (
            f"{tuple(grad.shape)} {grad.dtype}"
            if isinstance(grad, torch.Tensor)
            else type(grad).__name__
        )
        raise ValueError(
            f"ld_modulate_backward: grad must have the shape and dtype of x "
            f"({tuple(x.shape)} {x.dtype}), got {got}"
        )


def resolve_impl(x: torch.Tensor, impl: str | None = "auto") -> str:
    """The kernel ``impl`` stands for on ``x``: ``"reference"``, ``"torch"`` or ``"triton"``.

    ``"auto"`` (or ``None``) is the Triton kernel for CUDA tensors when triton imports, runs
    the dtype of ``x`` (float64 needs triton >= 3.5) and launches on the device (tried once per
    device and dtype; a failure warns and is remembered), else the torch kernel. The op itself
    makes this choice when it runs, not when it is traced, so a compiled or exported graph
    keeps ``"auto"`` and decides on the machine that runs it. While a TorchScript
    tracer or the ONNX exporter runs, every choice is the reference formula, so exported graphs
    hold standard ops only (a kernel choice concerns the PyTorch runtime, not the exported graph).
    """
    which = _requested_impl(impl)
    return _auto_impl(x) if which == "auto" else which


def _requested_impl(impl: str | None) -> str:
    """``impl`` checked, as the op receives it: ``"reference"`` while an exporter traces,
    ``"auto"`` for ``None``; ``"triton"`` only where triton is available."""
    if impl is not None and impl != "auto":
        check_choice(impl, "ld_modulate: impl", IMPLS)
    if _exporting():
        return "reference"
    if impl == "triton":
        _require_triton()
    return "auto" if impl is None else impl


def ld_modulate(
    x: torch.Tensor,
    logits: torch.Tensor,
    offset: float = 1.0,
    *,
    align_corners: bool = True,
    impl: str | None = "auto",
) -> torch.Tensor:
    r"""Compute ``x * (offset + sigmoid(Up(logits, x.shape[-2:])))`` with a memory-lean backward.

    ``Up`` is bilinear interpolation (``F.interpolate(mode="bilinear")`` semantics, including
    ``align_corners``; ``h > H`` subsamples like it).

    Args:
        x: the feature to modulate.
        logits: the low-resolution mask logits (the LD branch output).
        offset: constant added to the mask (``1`` = the authors' ``x + x * M``).
        align_corners: as in ``F.interpolate``.
        impl: ``"auto"`` (``None`` means the same) picks the Triton kernel for CUDA tensors
            when triton imports (for float64, triton >= 3.5) and launches on the device (tried
            once per device and dtype; where it does not, e.g. without a C compiler for Triton's
            launcher, a warning says why), and the torch kernel otherwise;
            ``"torch"`` the plain-PyTorch kernel (any device, temporaries bounded by a
            constant); ``"triton"`` the Triton kernel (``RuntimeError`` when triton is
            unavailable; the backward of logits over about 8x wider than ``x``, whose window
            would not fit in the GPU's shared memory, runs the torch kernel); ``"reference"`` the
            plain-ops formula (the oracle: autograd saves the full-resolution mask). While a
            TorchScript tracer or the ONNX exporter runs, every choice computes the reference
            formula, so the exported graph holds standard ops only.

    Shape:
        - x: :math:`(B, C, H, W)`, any strides (NCHW and channels_last are kept).
        - logits: :math:`(B, C, h, w)`, any ``h, w >= 1``.
        - Output: :math:`(B, C, H, W)`, the memory format of ``x``.

    dtypes: float32 and float64 are exact to rounding (the torch kernel at PyTorch's default
    float32 matmul precision; under ``torch.set_float32_matmul_precision("high")`` or TF32 its
    interpolation matmuls round like any matmul); float16 and bfloat16 compute the mask,
    the sigmoid and the reduction of the backward in float32 and round once. An enclosing
    autocast region does not change this. The torch kernel (matmuls and elementwise ops, no
    atomic adds) is bitwise reproducible on CPU and on CUDA (cuBLAS permitting).
    Double backward is not supported: differentiating the gradients (``create_graph=True``)
    raises a ``RuntimeError``; :func:`ld_modulate_reference` differentiates twice.

    Complexity: time O(B C H W) (a few operations per element; the torch kernel builds the
    mask with ``h`` (NCHW) or ``w`` (channels_last) multiply-adds per element and its backward
    reduces with ``w`` more); autograd saves ``x`` and ``logits`` only; extra memory is a
    constant (scratch chunks of at most 4 MiB on CPU and 32 MiB on other devices, unless one
    plane (NCHW) or image row (channels_last) is larger) plus O(B C H w); the torch kernel
    also copies ``x`` (and, in backward, the incoming gradient, e.g. the expanded one of a
    ``.sum()``) when its strides are neither NCHW nor channels_last.
    """
    offset, align_corners = _check_inputs(x, logits, offset, align_corners)
    # "auto" goes to the op, which resolves it when it runs (see resolve_impl)
    which = _requested_impl(impl)
    if which == "reference":
        return ld_modulate_reference(x, logits, offset, align_corners=align_corners)
    if not _differentiated(x, logits):
        # nothing to differentiate: the op itself, without the autograd.Function's own
        # per-call cost (about 0.1 ms of Python, as much as the kernel on a small map)
        return torch.ops.gald.ld_modulate(x, logits, offset, align_corners, which)
    return _LDModulate.apply(x, logits, offset, align_corners, which)


def _differentiated(x: torch.Tensor, logits: torch.Tensor) -> bool:
    """Whether autograd may differentiate the call: reverse mode records it, or an input
    carries a forward-mode tangent (``torch.func.jvp`` / ``jacfwd`` included), which the
    ``autograd.Function`` refuses by name where the bare op would drop it. Under
    ``torch.compile`` the Function is kept (it traces as one node either way)."""
    if torch.compiler.is_compiling():
        return True
    if torch.is_grad_enabled() and (x.requires_grad or logits.requires_grad):
        return True
    return _has_tangent(x, logits)
