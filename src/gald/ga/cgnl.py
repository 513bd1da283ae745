"""Compact Generalized Non-Local block (CGNL) with the dot-product kernel.

Reference: K. Yue et al., "Compact Generalized Non-local Network", NeurIPS 2018
(arXiv 1810.13125), in the configuration the GALD authors use (``SpatialCGNL``, groups=8,
GroupNorm, no scale).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._amp import autocast_off, compute_dtype
from .._layers import LayerFactory
from .._validate import (
    check_bool,
    check_divisible,
    check_feature,
    check_ignored_factories,
    check_positive_int,
)
from ..registry import register_ga


@register_ga("cgnl")
class CGNL(nn.Module):
    r"""Compact generalized non-local block (dot-product kernel, grouped).

    Reference: K. Yue et al., "Compact Generalized Non-local Network", NeurIPS 2018 (arXiv
    1810.13125), in the configuration the GALD authors use (``SpatialCGNL``, groups=8,
    GroupNorm, no scale).

    With :math:`\theta, \phi, g` 1x1 convs ``C -> C'`` (no bias) split into ``G`` channel groups,

    .. math::
        a_k = \sum_{c \in k,\, i} \phi_{c,i}\, g_{c,i}
              \;\big(/\sqrt{|k| \cdot N}\text{ if use\_scale}\big), \qquad
        y_k = a_k\, \theta_k, \qquad
        \mathrm{out} = \mathrm{GN}_G(W_z * y) + x,

    where :math:`a_k` is one scalar per sample and group and :math:`W_z` is a grouped 1x1 conv
    ``C' -> C``. The scalar grows with ``N = H * W`` (the authors' behaviour; GroupNorm partly
    compensates).

    Half precision: the per-group sum runs over ``|k| * H * W`` products (about 300 000 at
    97x97 with the defaults) and easily exceeds the float16 range, so it is accumulated in
    float32 (float64 for float64 inputs), with autocast disabled; the scaled features, ``W_z``
    and the GroupNorm follow in that dtype (GroupNorm cancels the scale of :math:`a_k`, but only
    once it is applied), and the result is cast back to the input dtype before the residual.
    The three input projections run in the input (or autocast) dtype.

    Norms and activations: the GroupNorm is part of CGNL's definition (its groups are the
    block's channel groups) and has no batch statistics; the block has no activation.
    ``norm_layer`` and ``act_layer`` are accepted, so that one model-wide choice (for instance
    ``nn.SyncBatchNorm``) can be handed to every GA layer, but replace nothing here.

    Complexity: time O(N C C'), memory O(N C'); no N x N term.

    Args:
        channels: input and output channels ``C``.
        inter_channels: ``C'``; defaults to ``C // 2``.
        groups: channel groups ``G``; must divide ``C`` and ``C'``.
        use_scale: divide each group's scalar by ``sqrt(|k| * H * W)``.
        norm_layer: accepted for a uniform GA signature; replaces no norm (see above).
        act_layer: accepted for a uniform GA signature; the block has no activation.

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
        norm_layer: LayerFactory | None = None,
        act_layer: LayerFactory | None = None,
    ) -> None:
        super().__init__()
        channels = self.channels = check_positive_int(channels, "channels")
        groups = self.groups = check_positive_int(groups, "groups")
        if inter_channels is None:
            # the default C' = C // 2: name the argument the caller gave, and the widths it takes
            if channels % (2 * groups) != 0:
                step = 2 * groups
                below, above = channels - channels % step, channels - channels % step + step
                nearest = f"{below} or {above}" if below else f"{above}"
                raise ValueError(
                    f"channels={channels} must be a multiple of 2 * groups = {step} with the "
                    f"default inter_channels = channels // 2 (groups={groups} divides channels "
                    f"and inter_channels): use channels={nearest}, or pass inter_channels and "
                    "groups that fit"
                )
            inter_channels = channels // 2
        inter_channels = self.inter_channels = check_positive_int(inter_channels, "inter_channels")
        check_divisible(channels, groups, "channels", "groups")
        check_divisible(self.inter_channels, groups, "inter_channels", "groups")
        self.use_scale = check_bool(use_scale, "use_scale")
        check_ignored_factories(norm_layer=norm_layer, act_layer=act_layer)
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
        t, p, g = self.t(x), self.p(x), self.g(x)
        dtype = compute_dtype(t.dtype)
        with autocast_off(x.device.type):
            t = t.to(dtype).reshape(b, groups, n)
            p = p.to(dtype).reshape(b, groups, 1, n)
            g = g.to(dtype).reshape(b, groups, n, 1)
            a = torch.matmul(p, g).reshape(b, groups, 1)  # one scalar per sample and group
            if self.use_scale:
                # a tensor op on the size, not math.sqrt: torch.export and ONNX keep N symbolic
                a = a * torch.rsqrt(a.new_ones(()) * n)
            y = (a * t).reshape(b, self.inter_channels, h, w)
            z = F.conv2d(y, self.z.weight.to(dtype), groups=groups)
            z = F.group_norm(
                z, groups, self.gn.weight.to(dtype), self.gn.bias.to(dtype), self.gn.eps
            )
        return z.to(x.dtype) + x
