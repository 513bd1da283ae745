"""Atrous spatial pyramid pooling (DeepLabv3 ASPP) at output stride 8.

Reference: L.-C. Chen, G. Papandreou, F. Schroff, H. Adam, "Rethinking Atrous Convolution for
Semantic Image Segmentation", arXiv 1706.05587, 2017; configured by default as the ``ASPPModule`` of
the GALD authors' operators (rates 12, 24, 36, 256 inner channels, Dropout2d 0.1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._layers import LayerFactory, conv_norm_act, make_act, make_norm
from .._validate import (
    check_factory,
    check_feature,
    check_positive_int,
    check_positive_int_sequence,
    check_probability,
)
from ..registry import register_ga


@register_ga("aspp")
class ASPP(nn.Module):
    r"""Atrous spatial pyramid pooling: parallel atrous convs and image pooling, fused.

    Reference: L.-C. Chen, G. Papandreou, F. Schroff, H. Adam, "Rethinking Atrous Convolution for
    Semantic Image Segmentation", arXiv 1706.05587, 2017; configured by default as the
    ``ASPPModule`` of the GALD authors' operators (rates 12, 24, 36, 256 inner channels,
    Dropout2d 0.1).

    Changes the width: maps ``channels`` to ``out_channels`` (default ``channels``), as the
    DeepLabv3 heads of torchvision, segmentation-models-pytorch and mmseg do (2048 -> 256).

    With ``D = inner_channels``, ``2 + len(rates)`` branches (five by default) each give ``D``
    channels:

    .. math::
        B_0 = \mathrm{act}(\mathrm{norm}(W_0 * x)), \qquad
        B_r = \mathrm{act}(\mathrm{norm}(W_r *_{r} x))\ \ (r \in \mathrm{rates}), \qquad
        B_p = \mathrm{Expand}_{H \times W}\big(\mathrm{act}(\mathrm{pnorm}(W_p \,\bar{x}))\big),

    where ``W_0`` and ``W_p`` are 1x1 convs, ``*_r`` a 3x3 conv with dilation and padding ``r``,
    and :math:`\bar{x}` the global average of ``x``. Then

    .. math::
        \mathrm{out} = \mathrm{Dropout2d}\big(\mathrm{act}(\mathrm{norm}(W_f * [B_0, B_r, \dots, B_p]))\big)

    with ``W_f`` a 1x1 conv ``(2 + len(rates)) D -> C_out``. The output is the fused map (no
    residual), as in DeepLabv3.

    Image-pooling branch: DeepLabv3 puts BatchNorm after its 1x1 conv, but that norm sees a
    1x1 map and fails in train mode at batch 1. The default here is **no norm** on that branch
    (its conv has a bias); pass ``pool_norm_layer=nn.BatchNorm2d`` to reproduce the original
    (train batch >= 2 then). Upsampling a 1x1 map bilinearly is a broadcast, so it is done by
    ``expand``. In train mode the other ``BatchNorm2d`` layers need ``B * H * W >= 2``.

    There is no ``align_corners`` option: every ASPP interpolates the pooled 1x1 map, and
    bilinear interpolation of a 1x1 map gives the same constant map with ``align_corners=True``
    (the GALD authors) and ``False`` (torchvision, segmentation-models-pytorch and mmseg's
    default), so both configurations are this layer.

    When a rate is at least the feature side, its 3x3 conv only ever sees zero padding off the
    centre and acts as a 1x1 conv (as in every ASPP).

    torchvision's ``ASPP(2048, (12, 24, 36), 256)`` is ``ASPP(2048, out_channels=256,
    inner_channels=256, pool_norm_layer=nn.BatchNorm2d, dropout=0.5)``, up to its dropout,
    which zeroes single values where ``Dropout2d`` here zeroes whole channels (train mode only).

    Complexity (per image, ``N = H * W``): time
    ``O(N C D (1 + 9 len(rates)) + N C_out (2 + len(rates)) D)``;
    extra memory ``O(N D (2 + len(rates)))`` for the concatenated branches. No ``N^2`` term.

    Args:
        channels: input channels ``C``.
        out_channels: output channels ``C_out``; ``None`` (default) for ``C``.
        rates: dilation rates of the 3x3 branches (output stride 8: ``(12, 24, 36)``).
        inner_channels: channels ``D`` of every branch.
        dropout: ``Dropout2d`` probability on the output, in ``[0, 1)``.
        norm_layer: norm factory of the conv branches and of the fusion (every norm of the
            layer except the image-pooling branch's), called as ``norm_layer(num_channels)``.
        act_layer: activation factory of every branch and of the fusion, called as
            ``act_layer()``.
        pool_norm_layer: optional norm of the image-pooling branch; ``None`` (default) for none.

    Shape:
        - Input: :math:`(B, C, H, W)`
        - Output: :math:`(B, C_{out}, H, W)`

    Example:
        >>> layer = ASPP(64, out_channels=32, inner_channels=16)
        >>> layer(torch.randn(1, 64, 9, 7)).shape
        torch.Size([1, 32, 9, 7])
    """

    def __init__(
        self,
        channels: int,
        *,
        out_channels: int | None = None,
        rates: Sequence[int] = (12, 24, 36),
        inner_channels: int = 256,
        dropout: float = 0.1,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
        pool_norm_layer: LayerFactory | None = None,
    ) -> None:
        super().__init__()
        channels = self.channels = check_positive_int(channels, "channels")
        self.out_channels = check_positive_int(
            channels if out_channels is None else out_channels, "out_channels"
        )
        check_factory(norm_layer, "norm_layer")
        check_factory(act_layer, "act_layer")
        if pool_norm_layer is not None:
            check_factory(pool_norm_layer, "pool_norm_layer")
        self.rates = check_positive_int_sequence(rates, "rates")
        inner_channels = self.inner_channels = check_positive_int(inner_channels, "inner_channels")
        dropout = self.dropout = check_probability(dropout, "dropout")
        inner = self.inner_channels
        self.branch_1x1 = conv_norm_act(
            channels, inner, kernel_size=1, dilation=1, norm_layer=norm_layer, act_layer=act_layer
        )
        self.branches_atrous = nn.ModuleList(
            conv_norm_act(
                channels,
                inner,
                kernel_size=3,
                dilation=rate,
                norm_layer=norm_layer,
                act_layer=act_layer,
            )
            for rate in self.rates
        )
        self.branch_pool = conv_norm_act(
            channels,
            inner,
            kernel_size=1,
            dilation=1,
            norm_layer=pool_norm_layer,
            act_layer=act_layer,
            norm_name="pool_norm_layer",
            norm_hw=(1, 1),  # the image-pooling branch runs on the pooled 1x1 map
        )
        self.fuse = nn.Sequential(
            nn.Conv2d((2 + len(self.rates)) * inner, self.out_channels, 1, bias=False),
            make_norm(norm_layer, self.out_channels, self),
            make_act(act_layer, self),
            nn.Dropout2d(self.dropout),
        )

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, out_channels={self.out_channels}, rates={self.rates}, "
            f"inner_channels={self.inner_channels}, dropout={self.dropout}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature(x, self.channels, who=type(self).__name__)
        b, _, h, w = x.shape
        pooled = self.branch_pool(x.mean(dim=(2, 3), keepdim=True))
        feats = [self.branch_1x1(x)]
        feats.extend(branch(x) for branch in self.branches_atrous)
        feats.append(pooled.expand(b, self.inner_channels, h, w))
        return self.fuse(torch.cat(feats, dim=1))
