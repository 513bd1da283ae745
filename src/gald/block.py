"""The GALD block: global aggregation at half resolution, then local distribution.

Reference: X. Li et al., "Global Aggregation then Local Distribution in Fully Convolutional
Networks", BMVC 2019 (arXiv 1909.07229); the authors' ``GALDBlock``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._layers import depthwise_stage, strided_min_size
from ._validate import check_feature, check_positive_int
from .ld import LocalDistribution
from .registry import create_ga


def _build_ga(ga_module: str | type[nn.Module] | nn.Module, channels: int, ga_kwargs: dict) -> nn.Module:
    if isinstance(ga_module, nn.Module):
        if ga_kwargs:
            raise ValueError("ga_kwargs must be empty when ga_module is an nn.Module instance")
        return ga_module
    if isinstance(ga_module, str):
        return create_ga(ga_module, channels, **ga_kwargs)
    if isinstance(ga_module, type) and issubclass(ga_module, nn.Module):
        return ga_module(channels, **ga_kwargs)
    raise TypeError(
        "ga_module must be a registry name (str), an nn.Module subclass or an nn.Module "
        f"instance, got {type(ga_module).__name__}"
    )


class GALD(nn.Module):
    r"""Global Aggregation then Local Distribution around any context module.

    .. math::
        y = \mathrm{Up}\big(\mathrm{GA}(\mathrm{down}(x)),\, H \times W\big), \qquad
        \mathrm{out} = y \odot (\mathrm{offset} + M(y)),

    with ``down`` a depthwise 3x3 stride-2 conv -> BN -> ReLU and ``M`` the
    :class:`~gald.LocalDistribution` mask. On CPU (eager, float32) the ``down`` conv runs in
    channels_last like the LD branch, and the GA receives the memory format of the input;
    :func:`gald.fuse` folds the ``down`` and LD BatchNorms for inference. ``offset=2`` is the authors' ``GALDBlock``
    (``LD(y) + y = 2y + y * M``). With ``downsample=False`` the GA runs at the input resolution;
    with ``ld=False`` the output is ``y`` (the GA-only ablation baseline).

    Args:
        channels: input and output channels ``C``.
        ga_module: a registry name (see :func:`gald.list_ga`), an ``nn.Module`` class built as
            ``cls(channels, **ga_kwargs)``, or a ready ``nn.Module`` mapping (B, C, h, w) to
            (B, C, h, w).
        ga_kwargs: keyword arguments for the GA constructor.
        downsample: run the GA on a 2x-downsampled copy and upsample its output.
        ld: apply the local distribution.
        offset: the LD offset.
        padding: padding of the ``down`` conv and of every LD conv (``0`` = the authors' code).
        **ld_kwargs: further :class:`~gald.LocalDistribution` arguments (``num_stages``,
            ``kernel_size``, ``final_act``, ``norm_layer``, ``act_layer``); ``norm_layer`` and
            ``act_layer`` also build ``down``.

    Shape:
        - Input: :math:`(B, C, H, W)`
        - Output: :math:`(B, C, H, W)`
    """

    def __init__(
        self,
        channels: int,
        ga_module: str | type[nn.Module] | nn.Module = "cgnl",
        *,
        ga_kwargs: dict[str, Any] | None = None,
        downsample: bool = True,
        ld: bool = True,
        offset: float = 2.0,
        padding: int = 1,
        **ld_kwargs: Any,
    ) -> None:
        super().__init__()
        self.channels = check_positive_int(channels, "channels")
        self.padding = check_positive_int(padding, "padding", minimum=0)
        if ga_kwargs is not None and not isinstance(ga_kwargs, dict):
            raise TypeError(f"ga_kwargs must be a dict or None, got {type(ga_kwargs).__name__}")
        self.ga = _build_ga(ga_module, channels, dict(ga_kwargs or {}))
        norm_layer = ld_kwargs.get("norm_layer", nn.BatchNorm2d)
        act_layer = ld_kwargs.get("act_layer", nn.ReLU)
        self.down: nn.Module | None = None
        min_size = 1
        if downsample:
            self.down = depthwise_stage(
                channels, kernel_size=3, padding=padding, norm_layer=norm_layer, act_layer=act_layer
            )
            min_size = strided_min_size(1, 3, padding)
        self.ld: LocalDistribution | None = None
        if ld:
            self.ld = LocalDistribution(channels, offset=offset, padding=padding, **ld_kwargs)
            min_size = max(min_size, self.ld.min_size)
        elif ld_kwargs:
            raise ValueError(f"LD arguments {sorted(ld_kwargs)} given with ld=False")
        self.min_size = min_size
        # the block supports a deployment path only when its GA and its LD do

    def extra_repr(self) -> str:
        return f"channels={self.channels}, padding={self.padding}, min_size={self.min_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature(x, self.channels, min_hw=self.min_size, who=type(self).__name__)
        if self.down is not None:
            y = self.ga(self.down(x))
            y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=True)
        else:
            y = self.ga(x)
        if self.ld is not None:
            y = self.ld(y)
        return y
