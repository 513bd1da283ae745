"""Local Distribution (LD), the per-channel, per-position gate of GALD.

Reference: X. Li et al., "Global Aggregation then Local Distribution in Fully Convolutional
Networks", BMVC 2019 (arXiv 1909.07229); the authors' ``LocalAttenModule`` in
github.com/lxtGH/GALD-DGCNet, restated here from its documented semantics.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._capabilities import Capabilities
from ._validate import check_feature, check_positive_int
from .ops import ld_modulate

LayerFactory = Callable[..., nn.Module]


def strided_min_size(num_stages: int, kernel_size: int, padding: int, stride: int = 2) -> int:
    """Smallest side a chain of ``num_stages`` strided convs accepts (each output side >= 1)."""
    size = 1
    for _ in range(num_stages):
        # the smallest s with floor((s + 2p - k) / stride) + 1 >= size
        size = max(1, stride * (size - 1) + kernel_size - 2 * padding)
    return size


def depthwise_stage(
    channels: int,
    *,
    kernel_size: int,
    padding: int,
    norm_layer: LayerFactory,
    act_layer: LayerFactory | None,
) -> nn.Sequential:
    """Depthwise ``kernel_size`` stride-2 conv (with bias, as the authors) -> norm -> act."""
    layers: list[nn.Module] = [
        nn.Conv2d(
            channels, channels, kernel_size, stride=2, padding=padding, groups=channels, bias=True
        ),
        norm_layer(channels),
    ]
    if act_layer is not None:
        layers.append(act_layer())
    return nn.Sequential(*layers)


class LocalDistribution(Capabilities, nn.Module):
    r"""Local Distribution: ``x * (offset + M)`` with a per-channel, per-position mask ``M``.

    The mask branch is ``num_stages`` x [depthwise stride-2 conv -> norm -> act]; its low-resolution
    output (the *logits*) is upsampled bilinearly (``align_corners=True``) to the input size and
    passed through a sigmoid: ``M = sigmoid(Up(branch(x)))``. The modulation runs through the fused
    op :func:`gald.ops.ld_modulate`, which never keeps a full-resolution mask for backward.

    ``offset=1`` is the authors' ``LocalAttenModule`` (``x + x * M``); ``offset=0`` is a pure gate.

    .. note::
        With ``final_act=True`` (the default, as in the authors' code) a ReLU precedes the
        sigmoid, so ``M`` lies in ``[0.5, 1)``, not ``(0, 1)``. ``final_act=False`` frees the full
        range.

    Args:
        channels: number of channels ``C`` of the input.
        num_stages: depthwise stride-2 stages in the mask branch (the authors use 3).
        kernel_size: kernel of every depthwise conv.
        padding: padding of every depthwise conv. ``0`` reproduces the authors' code exactly and
            needs ``H, W >= 15`` for 3 stages of ``k=3``; ``1`` accepts every ``H, W >= 1``.
        final_act: apply ``act_layer`` after the last stage too.
        offset: the constant added to the mask.
        norm_layer: normalisation factory called as ``norm_layer(C)``.
        act_layer: activation factory called as ``act_layer()``.

    Shape:
        - Input: :math:`(B, C, H, W)`
        - Output: :math:`(B, C, H, W)`
    """

    def __init__(
        self,
        channels: int,
        *,
        num_stages: int = 3,
        kernel_size: int = 3,
        padding: int = 1,
        final_act: bool = True,
        offset: float = 1.0,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        self.channels = check_positive_int(channels, "channels")
        self.num_stages = check_positive_int(num_stages, "num_stages")
        self.kernel_size = check_positive_int(kernel_size, "kernel_size")
        self.padding = check_positive_int(padding, "padding", minimum=0)
        if not isinstance(offset, (int, float)) or isinstance(offset, bool):
            raise TypeError(f"offset must be a float, got {type(offset).__name__}")
        self.offset = float(offset)
        self.final_act = bool(final_act)
        self.min_size = strided_min_size(num_stages, kernel_size, padding)
        self.branch = nn.Sequential(
            *(
                depthwise_stage(
                    channels,
                    kernel_size=kernel_size,
                    padding=padding,
                    norm_layer=norm_layer,
                    act_layer=act_layer if (i < num_stages - 1 or final_act) else None,
                )
                for i in range(num_stages)
            )
        )

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_stages={self.num_stages}, "
            f"kernel_size={self.kernel_size}, padding={self.padding}, "
            f"final_act={self.final_act}, offset={self.offset}"
        )

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        check_feature(x, self.channels, min_hw=self.min_size, who=type(self).__name__)
        return self.branch(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Low-resolution mask logits ``branch(x)``, shape (B, C, h, w)."""
        return self._branch(x)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """The full-resolution mask ``sigmoid(Up(branch(x)))``, shape (B, C, H, W)."""
        logits = self._branch(x)
        return torch.sigmoid(
            F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ld_modulate(x, self._branch(x), self.offset)
