"""Compact Generalized Non-Local block (CGNL) with the dot-product kernel.

Reference: K. Yue et al., "Compact Generalized Non-local Network", NeurIPS 2018
(arXiv 1810.13125), in the configuration the GALD authors use (``SpatialCGNL``, groups=8,
GroupNorm, no scale).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._validate import check_divisible, check_feature, check_positive_int
from ..registry import register_ga


@register_ga("cgnl")
class CGNL(nn.Module):
    r"""Compact generalized non-local block (dot-product kernel, grouped).

    With :math:`\theta, \phi, g` 1x1 convs ``C -> C'`` (no bias) split into ``G`` channel groups,

    .. math::
        a_k = \sum_{c \in k,\, i} \phi_{c,i}\, g_{c,i}
              \;\big(/\sqrt{|k| \cdot N}\text{ if use\_scale}\big), \qquad
        y_k = a_k\, \theta_k, \qquad
        \mathrm{out} = \mathrm{GN}_G(W_z * y) + x,

    where :math:`a_k` is one scalar per sample and group and :math:`W_z` is a grouped 1x1 conv
    ``C' -> C``. The scalar grows with ``N = H * W`` (the authors' behaviour; GroupNorm partly
    compensates).

    Complexity: time O(N C C'), memory O(N C'); no N x N term.

    Args:
        channels: input and output channels ``C``.
        inter_channels: ``C'``; defaults to ``C // 2``.
        groups: channel groups ``G``; must divide ``C`` and ``C'``.
        use_scale: divide each group's scalar by ``sqrt(|k| * H * W)``.

    Shape:
        - Input: :math:`(B, C, H, W)`
        - Output: :math:`(B, C, H, W)`
    """

    def __init__(
        self,
        channels: int,
        *,
        inter_channels: int | None = None,
        groups: int = 8,
        use_scale: bool = False,
    ) -> None:
        super().__init__()
        self.channels = check_positive_int(channels, "channels")
        if inter_channels is None:
            inter_channels = channels // 2
        self.inter_channels = check_positive_int(inter_channels, "inter_channels")
        self.groups = check_positive_int(groups, "groups")
        check_divisible(channels, groups, "channels", "groups")
        check_divisible(self.inter_channels, groups, "inter_channels", "groups")
        self.use_scale = bool(use_scale)
        self.t = nn.Conv2d(channels, self.inter_channels, 1, bias=False)
        self.p = nn.Conv2d(channels, self.inter_channels, 1, bias=False)
        self.g = nn.Conv2d(channels, self.inter_channels, 1, bias=False)
        self.z = nn.Conv2d(self.inter_channels, channels, 1, groups=groups, bias=False)
        self.gn = nn.GroupNorm(groups, channels)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, inter_channels={self.inter_channels}, "
            f"groups={self.groups}, use_scale={self.use_scale}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature(x, self.channels, who=type(self).__name__)
        b, _, h, w = x.shape
        groups = self.groups
        n = (self.inter_channels // groups) * h * w  # elements per group (explicit: B may be 0)
        t = self.t(x).reshape(b, groups, n)
        p = self.p(x).reshape(b, groups, 1, n)
        g = self.g(x).reshape(b, groups, n, 1)
        a = torch.matmul(p, g).reshape(b, groups, 1)  # one scalar per sample and group
        if self.use_scale:
            a = a / math.sqrt((self.inter_channels // groups) * h * w)
        y = (a * t).reshape(b, self.inter_channels, h, w)
        return self.gn(self.z(y)) + x
