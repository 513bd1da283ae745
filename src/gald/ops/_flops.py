"""FLOP formulas of the fused Local Distribution ops for ``torch.utils.flop_counter``.

Without a formula, ``FlopCounterMode`` counts a custom op as zero (it does not look inside).
The convention is torch's own: 2 FLOPs per multiply-add of the *linear* work (as for ``mm``
and convolutions), nothing for elementwise functions (torch counts ``sigmoid`` or ``mul`` as
zero too). For an output of ``N = B * C * H * W`` elements:

- ``gald::ld_modulate``: the bilinear upsampling of the logits reads 4 neighbours per output
  element, 4 multiply-adds: ``8 N``.
- ``gald::ld_modulate_backward``: the mask is recomputed (``8 N``); the logits gradient is the
  adjoint of the upsampling, again 4 multiply-adds per element (``8 N``), counted only when
  requested. ``grad_x`` itself is elementwise.

The count does not depend on the kernel that runs (the chunked torch path works with
interpolation matrices, the Triton kernel with the 4 neighbours).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils.flop_counter import register_flop_formula

from . import _modulate  # noqa: F401  (defines the gald:: ops registered below)

#: FLOPs per output element of one bilinear interpolation (4 multiply-adds).
INTERP_FLOPS_PER_ELEMENT = 8


def modulate_flops(x_shape: Sequence[int]) -> int:
    """FLOPs of ``ld_modulate`` for an input of shape ``x_shape`` (B, C, H, W)."""
    return INTERP_FLOPS_PER_ELEMENT * math.prod(x_shape)


def modulate_backward_flops(x_shape: Sequence[int], need_logits: bool) -> int:
    """FLOPs of the backward: the recomputed mask, plus the adjoint when ``need_logits``."""
    return INTERP_FLOPS_PER_ELEMENT * math.prod(x_shape) * (2 if need_logits else 1)


@register_flop_formula(torch.ops.gald.ld_modulate)
def _ld_modulate_flop(x_shape, logits_shape, *args, out_shape=None, **kwargs) -> int:
    return modulate_flops(x_shape)


def _backward_flop(grad_shape, x_shape, logits_shape, *args, out_shape=None, **kwargs) -> int:
    # (grad, x, logits, offset, align_corners, impl, need_x, need_logits)
    need_logits = bool(kwargs.get("need_logits", args[4] if len(args) > 4 else True))
    return modulate_backward_flops(x_shape, need_logits)


if hasattr(torch.ops.gald, "ld_modulate_backward"):
    register_flop_formula(torch.ops.gald.ld_modulate_backward)(_backward_flop)
