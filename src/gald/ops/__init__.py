"""Functional ops with their own autograd and kernels."""

from ._modulate import ld_modulate, ld_modulate_reference

__all__ = ["ld_modulate", "ld_modulate_reference"]
