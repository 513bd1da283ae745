"""Test helpers for GA layers, for this library's tests and for other projects' unit tests.

- :func:`check_ga`: assert the GA layer contract (shapes down to the declared minimum size,
  the empty batch, gradients, eval-mode batch independence, float64 gradcheck, autocast, half precision, memory formats,
  ``torch.compile``, state_dict round trip, device placement). Every built-in layer meets it with
  its default arguments except :class:`gald.ga.EMA`, which needs ``em_grad=True``: by default its
  EM iterations run under ``no_grad`` (as in the authors' code), so ``conv1`` gets no gradient
  (``gradients`` fails) and the input gradient misses the EM path (``gradcheck`` fails).
- :func:`check_gald`: the same contract for a GA inside :class:`gald.GALD`.
- :func:`feature_maps`, :func:`ga_inputs`: hypothesis strategies (need ``hypothesis``).
- :func:`randomize_`, :func:`declared_min_size`: the helpers the checks use.

See ``docs/testing.md``.
"""

from ._contract import PROPERTIES, check_ga, check_gald, declared_min_size, randomize_
from .strategies import feature_maps, ga_inputs

__all__ = [
    "PROPERTIES",
    "check_ga",
    "check_gald",
    "declared_min_size",
    "feature_maps",
    "ga_inputs",
    "randomize_",
]
