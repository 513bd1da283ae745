"""Recurrent criss-cross attention (CCNet).

Reference: Z. Huang, X. Wang, L. Huang, C. Huang, Y. Wei, W. Liu, "CCNet: Criss-Cross Attention
for Semantic Segmentation", ICCV 2019 / TPAMI 2020 (arXiv 1811.11721).
"""

from __future__ import annotations

import torch
from torch import nn

from .._amp import autocast_off, compute_dtype
from .._layers import LayerFactory
from .._validate import (
    check_feature,
    check_ignored_factories,
    check_positive_int,
    reduced_width,
)
from ..registry import register_ga


@register_ga("criss_cross")
class CrissCrossAttention(nn.Module):
    r"""Criss-cross attention applied ``recurrence`` times with shared weights (RCCA).

    Reference: Z. Huang, X. Wang, L. Huang, C. Huang, Y. Wei, W. Liu, "CCNet: Criss-Cross Attention
    for Semantic Segmentation", ICCV 2019 / TPAMI 2020 (arXiv 1811.11721).

    For a position :math:`u = (h, w)` let :math:`\Omega_u` be the ``H + W - 1`` positions of its
    row and column, the centre counted once. With ``q, k`` 1x1 convs ``C -> C // reduction`` and
    ``v`` a 1x1 conv ``C -> C`` (all with bias), one pass is

    .. math::
        A_{u,j} = \mathrm{softmax}_{j \in \Omega_u}\big(q_u^\top k_j\big), \qquad
        \mathrm{CCA}(x)_u = x_u + \gamma \sum_{j \in \Omega_u} A_{u,j}\, v_j,

    with one softmax jointly over the row and the column and a learnable scalar
    :math:`\gamma` initialised to 0 (so the layer starts as the identity). The output is
    :math:`\mathrm{CCA}^{R}(x)` for ``R = recurrence``; two passes already connect every pair of
    positions.

    The column logits include the centre, the row logits include it again; the column copy is
    masked out with a boolean diagonal built on the input's device at every call, so exactly
    one copy enters the softmax. Logits, softmax and aggregation run in float32 under autocast
    (cast back after). Pure PyTorch (``einsum``), any device.

    The layer has no norm and no activation: ``norm_layer`` and ``act_layer`` are accepted, so
    that one model-wide choice (for instance ``nn.SyncBatchNorm``) can be handed to every GA
    layer, but replace nothing here.

    Complexity (per image and pass, ``N = H * W``): time ``O(N (H + W) (C' + C))`` with
    ``C' = C // reduction``; extra memory ``O(N (H + W))`` for the attention, kept for
    backward once per pass; no ``N x N`` term.

    Args:
        channels: input and output channels ``C``.
        recurrence: number of passes ``R`` with shared weights.
        reduction: ``C' = C // reduction`` for the query and key convs (must be ``>= 1``).
        norm_layer: accepted for a uniform GA signature; the layer has no norm.
        act_layer: accepted for a uniform GA signature; the layer has no activation.

    Shape:
        - Input: :math:`(B, C, H, W)`
        - Output: :math:`(B, C, H, W)`

    Example:
        >>> layer = CrissCrossAttention(64)
        >>> layer(torch.randn(2, 64, 9, 7)).shape
        torch.Size([2, 64, 9, 7])
    """

    def __init__(
        self,
        channels: int,
        *,
        recurrence: int = 2,
        reduction: int = 8,
        norm_layer: LayerFactory | None = None,
        act_layer: LayerFactory | None = None,
    ) -> None:
        super().__init__()
        check_ignored_factories(norm_layer=norm_layer, act_layer=act_layer)
        channels = self.channels = check_positive_int(channels, "channels")
        recurrence = self.recurrence = check_positive_int(recurrence, "recurrence")
        self.reduction = check_positive_int(reduction, "reduction")
        inter_channels = reduced_width(channels, self.reduction)
        self.inter_channels = inter_channels
        self.query = nn.Conv2d(channels, self.inter_channels, 1)
        self.key = nn.Conv2d(channels, self.inter_channels, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def reset_parameters(self) -> None:
        """``gamma`` back to zero (the block starts as the identity); the convs have their own."""
        with torch.no_grad():
            self.gamma.zero_()

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, reduction={self.reduction}, "
            f"inter_channels={self.inter_channels}, recurrence={self.recurrence}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature(x, self.channels, who=type(self).__name__)
        for _ in range(self.recurrence):
            x = self._cca(x)
        return x

    def _cca(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-2]
        q = self.query(x)
        cdt = compute_dtype(q.dtype)
        q = q.to(cdt)
        k = self.key(x).to(cdt)
        v = self.value(x).to(cdt)
        with autocast_off(x.device.type):
            # column logits (B, H, W, H): position (h, w) against (h', w) for every h'
            col = torch.einsum("bchw,bckw->bhwk", q, k)
            rows = torch.arange(h, device=x.device)
            centre = (rows.unsqueeze(1) == rows.unsqueeze(0)).unsqueeze(1)  # (H, 1, H)
            col = col.masked_fill(centre, float("-inf"))
            # row logits (B, H, W, W): position (h, w) against (h, w') for every w'
            row = torch.einsum("bchw,bchk->bhwk", q, k)
            att = torch.softmax(torch.cat([col, row], dim=-1), dim=-1)
            att_col, att_row = att[..., :h], att[..., h:]
            out = torch.einsum("bhwk,bckw->bchw", att_col, v) + torch.einsum(
                "bhwk,bchk->bchw", att_row, v
            )
        return x + self.gamma.to(x.dtype) * out.to(x.dtype)
