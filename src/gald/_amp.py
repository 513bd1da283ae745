"""Mixed precision: the one place that decides which dtype a sensitive region computes in."""

from __future__ import annotations

import contextlib

import torch

_HALF = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (fp16, bf16), the dtype itself otherwise.

    Every layer computes its numerically sensitive parts (attention logits and softmax, sums
    over many positions, the LD mask) in this dtype and rounds once at the end.
    """
    return torch.float32 if dtype in _HALF else dtype


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Disable autocast for ``device_type`` if it is active (a no-op, and no graph node, if not).

    Inside the region, cast the operands with :func:`compute_dtype` yourself and cast the
    result back after.
    """
    # ``torch.amp.is_autocast_available`` would say whether the device type has autocast, but
    # TorchDynamo of torch 2.9 and earlier cannot trace it (a graph break, an error under
    # ``fullgraph=True``); asking and catching the error for a device type without autocast
    # (``meta``) traces on every supported version.
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return contextlib.nullcontext()
    if enabled:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def run_unscaled(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with autocast off and ``x`` cast to the dtype of the module's floating
    parameters: float32 under autocast (which leaves parameters in float32), the model's own
    dtype after ``model.half()``. For layers fed by an unnormalised sum over many positions,
    whose values can exceed float16's range before a norm brings them back."""
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    if dtype is None:
        dtype = next((b.dtype for b in module.buffers() if b.is_floating_point()), x.dtype)
    with autocast_off(x.device.type):
        return module(x.to(dtype))
