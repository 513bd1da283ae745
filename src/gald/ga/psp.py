"""Pyramid pooling module (PSPNet).

Reference: H. Zhao, J. Shi, X. Qi, X. Wang, J. Jia, "Pyramid Scene Parsing Network", CVPR 2017
(arXiv 1612.01105).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._layers import LayerFactory, make_act, make_norm
from .._validate import (
    check_bool,
    check_factory,
    check_feature,
    check_positive_int,
    check_positive_int_sequence,
)
from ..registry import register_ga


def adaptive_avg_matrix(
    size: int, bins: int, *, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The (bins, size) averaging matrix of adaptive average pooling along one axis.

    Row ``i`` averages the window ``[floor(i * size / bins), ceil((i + 1) * size / bins))``,
    the windows :func:`torch.nn.functional.adaptive_avg_pool2d` uses, so ``P_h @ x @ P_w^T``
    equals ``adaptive_avg_pool2d(x, (bins, bins))``. Built from tensor arithmetic only, so it
    follows a dynamic ``size`` through tracing and ONNX export.
    """
    index = torch.arange(bins, device=device)
    start = torch.div(index * size, bins, rounding_mode="floor")
    end = torch.div((index + 1) * size + bins - 1, bins, rounding_mode="floor")
    pos = torch.arange(size, device=device)
    window = (pos.unsqueeze(0) >= start.unsqueeze(1)) & (pos.unsqueeze(0) < end.unsqueeze(1))
    weights = window.to(dtype)
    return weights / weights.sum(dim=1, keepdim=True)


def adaptive_avg_pool(x: torch.Tensor, bins: int) -> torch.Tensor:
    """``adaptive_avg_pool2d(x, (bins, bins))`` as two matrix products (exportable for any size)."""
    h, w = x.shape[-2], x.shape[-1]
    p_h = adaptive_avg_matrix(h, bins, device=x.device, dtype=x.dtype)
    p_w = adaptive_avg_matrix(w, bins, device=x.device, dtype=x.dtype)
    return torch.matmul(torch.matmul(p_h, x), p_w.transpose(0, 1))


@register_ga("psp")
class PyramidPooling(nn.Module):
    r"""Pyramid pooling: context pooled at several grid sizes, upsampled and fused with ``x``.

    Reference: H. Zhao, J. Shi, X. Qi, X. Wang, J. Jia, "Pyramid Scene Parsing Network", CVPR 2017
    (arXiv 1612.01105).

    Changes the width: maps ``channels`` to ``out_channels`` (default ``channels``), as the
    PSPNet heads of mmseg (``channels``) and segmentation-models-pytorch do.

    For every bin count ``b`` in ``bins`` (``C_b = branch_channels``, by default
    ``C // len(bins)``):

    .. math::
        P_b = \mathrm{Up}\Big(\mathrm{act}\big(\mathrm{pnorm}(W_b * \mathrm{AvgPool}_{b \times b}(x))\big)\Big),
        \qquad
        \mathrm{out} = \mathrm{act}\big(\mathrm{norm}(W_3 * [x, P_{b_1}, \dots, P_{b_k}])\big),

    with ``W_b`` a 1x1 conv ``C -> C_b``, ``W_3`` a 3x3 conv (padding 1) to ``C_out`` channels,
    ``Up`` bilinear (``align_corners=True`` by default, as the authors and PSPNet; mmseg's
    ``PSPHead`` uses ``False``) and ``AvgPool`` adaptive average pooling. The output is the fused
    map (no residual), as in PSPNet.

    mmseg's ``PSPHead(in_channels=C, channels=D)`` is ``PyramidPooling(C, out_channels=D,
    branch_channels=D, pool_norm_layer=nn.BatchNorm2d, align_corners=False)`` (checked against
    segmentation-models-pytorch's ``PSPModule`` of UPerNet, the same structure, to float64
    rounding). segmentation-models-pytorch's ``PSPNet`` decoder is a close relative but not this
    layer: its ``b = 1`` branch has a biased conv and no norm while the others have BatchNorm,
    and it fuses with a 1x1 conv; wrap it with :func:`gald.wrap` to keep it as it is.

    Adaptive pooling is computed as an exact averaging-matrix product built from the input size
    (see :func:`adaptive_avg_pool`): it equals ``F.adaptive_avg_pool2d`` and, unlike it, exports
    to ONNX for every input size, dynamic height and width included.

    Normalisation of the pooled branches (``pool_norm_layer``): PSPNet puts BatchNorm there, but
    the ``b = 1`` branch then normalises a 1x1 map and fails in train mode at batch 1. The
    default here is **no norm** on the pooled branches (their 1x1 convs get a bias) and the
    norm only after the fusion conv, so every batch size trains. Pass
    ``pool_norm_layer=nn.BatchNorm2d`` to reproduce PSPNet exactly (train batch >= 2 then).
    In train mode the fusion ``BatchNorm2d`` needs ``B * H * W >= 2``.

    Complexity (per image, ``N = H * W``): time ``O(N C \sum_b b)`` for the pooling products,
    ``O(C C_b \sum_b b^2)`` for the branch convs and ``O(9 N C_out (C + k C_b))`` for the fusion
    conv (dominant); extra memory ``O(N k C_b)`` for the upsampled branches. No ``N^2`` term.

    Args:
        channels: input channels ``C``.
        out_channels: output channels ``C_out``; ``None`` (default) for ``C``.
        bins: grid sizes of the pyramid (distinct positive ints).
        branch_channels: width ``C_b`` of every pooled branch; ``None`` (default) for
            ``C // len(bins)`` (PSPNet); mmseg uses ``C_out``.
        align_corners: ``align_corners`` of the bilinear upsampling of the pooled branches.
        norm_layer: factory for the norm after the fusion conv, called as
            ``norm_layer(C_out)``; the pooled branches take ``pool_norm_layer`` instead.
        act_layer: activation factory of every branch and of the fusion, called as
            ``act_layer()``.
        pool_norm_layer: optional norm of the pooled branches, called as
            ``pool_norm_layer(C_b)``; ``None`` (default) for none.

    Shape:
        - Input: :math:`(B, C, H, W)`
        - Output: :math:`(B, C_{out}, H, W)`

    Example:
        >>> layer = PyramidPooling(64, out_channels=32)
        >>> layer(torch.randn(1, 64, 9, 7)).shape
        torch.Size([1, 32, 9, 7])
    """

    def __init__(
        self,
        channels: int,
        *,
        out_channels: int | None = None,
        bins: Sequence[int] = (1, 2, 3, 6),
        branch_channels: int | None = None,
        align_corners: bool = True,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
        pool_norm_layer: LayerFactory | None = None,
    ) -> None:
        super().__init__()
        channels = self.channels = check_positive_int(channels, "channels")
        self.out_channels = check_positive_int(
            channels if out_channels is None else out_channels, "out_channels"
        )
        self.bins = check_positive_int_sequence(bins, "bins")
        if len(self.bins) == 0:
            raise ValueError("bins must not be empty, got ()")
        if len(set(self.bins)) != len(self.bins):
            raise ValueError(f"bins must be distinct, got {self.bins}")
        if branch_channels is None:
            if channels // len(self.bins) < 1:
                raise ValueError(
                    f"channels={channels} is smaller than len(bins)={len(self.bins)}: every "
                    "branch needs channels // len(bins) >= 1 (or pass branch_channels)"
                )
            branch_channels = channels // len(self.bins)
        branch_channels = self.branch_channels = check_positive_int(
            branch_channels, "branch_channels"
        )
        align_corners = check_bool(align_corners, "align_corners")
        self.align_corners = align_corners
        check_factory(norm_layer, "norm_layer")
        check_factory(act_layer, "act_layer")
        if pool_norm_layer is not None:
            check_factory(pool_norm_layer, "pool_norm_layer")
        with_bias = pool_norm_layer is None
        self.branches = nn.ModuleList()
        for _ in self.bins:
            layers: list[nn.Module] = [nn.Conv2d(channels, self.branch_channels, 1, bias=with_bias)]
            if pool_norm_layer is not None:
                layers.append(
                    make_norm(pool_norm_layer, self.branch_channels, self, "pool_norm_layer")
                )
            layers.append(make_act(act_layer, self))
            self.branches.append(nn.Sequential(*layers))
        self.fuse = nn.Sequential(
            nn.Conv2d(
                channels + len(self.bins) * self.branch_channels,
                self.out_channels,
                3,
                padding=1,
                bias=False,
            ),
            make_norm(norm_layer, self.out_channels, self),
            make_act(act_layer, self),
        )

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, out_channels={self.out_channels}, bins={self.bins}, "
            f"branch_channels={self.branch_channels}, align_corners={self.align_corners}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature(x, self.channels, who=type(self).__name__)
        size = (x.shape[-2], x.shape[-1])
        feats = [x]
        for bins, branch in zip(self.bins, self.branches):
            pooled = branch(adaptive_avg_pool(x, bins))
            feats.append(
                F.interpolate(pooled, size=size, mode="bilinear", align_corners=self.align_corners)
            )
        return self.fuse(torch.cat(feats, dim=1))
