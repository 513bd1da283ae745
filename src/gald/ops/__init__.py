"""Functional ops with their own autograd and kernels."""

from . import _flops  # noqa: F401  (FLOP formulas for torch.utils.flop_counter)
from ._modulate import ld_modulate, ld_modulate_reference

__all__ = ["ld_modulate", "ld_modulate_reference"]
