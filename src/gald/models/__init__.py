"""Whole networks: the dilated ResNet backbone, GALD-Net, and sliding-window evaluation.

- :class:`DilatedResNet`: deep-stem dilated ResNet-50/101 returning ``(c3, c4)``.
- :class:`GALDNet`: backbone + :class:`~gald.GALDHead` + :class:`~gald.AuxHead`;
  :meth:`GALDNet.official` is the authors' network.
- :func:`slide_inference`: overlapping-crop evaluation with flip and multi-scale.
"""

from .galdnet import GALDNet
from .resnet import DilatedResNet
from .slide import slide_inference

__all__ = ["DilatedResNet", "GALDNet", "slide_inference"]
