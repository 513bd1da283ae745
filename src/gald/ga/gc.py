"""Global context block (GCNet).

Reference: Y. Cao, J. Xu, S. Lin, F. Wei, H. Hu, "GCNet: Non-local Networks Meet
Squeeze-Excitation Networks and Beyond", ICCV Workshops 2019 (arXiv 1904.11492).
"""

from __future__ import annotations

from typing import Final

import torch
from torch import nn

from .._amp import autocast_off
from .._layers import LayerFactory
from .._validate import check_feature, check_positive_int
from ..registry import register_ga

POOLINGS: Final = ("att", "avg")
FUSIONS: Final = ("add", "mul")



def channel_layer_norm(channels: int) -> nn.Module:
    """``LayerNorm([channels, 1, 1])``: the norm GCNet puts on its (B, C r, 1, 1) bottleneck."""
    return nn.LayerNorm([channels, 1, 1])


@register_ga("gc")
class GlobalContext(nn.Module):
    r"""Global context block: one attention-pooled context vector, transformed and fused.

    With ``W_k`` a 1x1 conv ``C -> 1`` and ``C_r = int(C * ratio)``:

    .. math::
        \alpha_j = \mathrm{softmax}_j(W_k x_j), \qquad
        c = \sum_j \alpha_j x_j \quad(\text{``att''}) \quad\text{or}\quad
        c = \tfrac{1}{N}\sum_j x_j \quad(\text{``avg''}),

    .. math::
        t = W_2\, \mathrm{act}(\mathrm{LN}(W_1 c)), \qquad
        \mathrm{out} = x + t \;(\text{``add''}) \quad\text{or}\quad
        \mathrm{out} = x \odot \sigma(t) \;(\text{``mul''}),

    with ``W_1`` a 1x1 conv ``C -> C_r``, ``LN`` a LayerNorm over ``[C_r, 1, 1]`` and ``W_2`` a
    1x1 conv ``C_r -> C`` whose weight and bias start at zero. So ``"add"`` starts as the
    identity and ``"mul"`` starts as ``x * sigmoid(0) = x / 2`` (as in GCNet and mmcv). The
    context is the same vector for every position (query-independent).

    The pooling logits, the softmax over the ``N`` positions and the weighted sum run in
    float32 under autocast; the context is cast back after.

    Complexity (per image, ``N = H * W``): time ``O(N C)`` for pooling and fusion plus
    ``O(C C_r)`` for the transform; extra memory ``O(N)`` for the attention weights.

    Args:
        channels: input and output channels ``C``.
        ratio: bottleneck ratio, ``C_r = int(C * ratio) >= 1``.
        pooling: ``"att"`` (attention pooling) or ``"avg"`` (global average).
        fusion: ``"add"`` (channel add) or ``"mul"`` (sigmoid channel gate).
        norm_layer: factory for the bottleneck norm, called as ``norm_layer(C_r)`` on a
            (B, C_r, 1, 1) map; defaults to ``LayerNorm([C_r, 1, 1])``.
        act_layer: activation factory, called as ``act_layer()``.

    Shape:
        - Input: :math:`(B, C, H, W)`
        - Output: :math:`(B, C, H, W)`

    Example:
        >>> layer = GlobalContext(64)
        >>> layer(torch.randn(2, 64, 9, 7)).shape
        torch.Size([2, 64, 9, 7])
    """

    def __init__(
        self,
        channels: int,
        *,
        ratio: float = 1 / 4,
        pooling: str = "att",
        fusion: str = "add",
        norm_layer: LayerFactory = channel_layer_norm,
        act_layer: LayerFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        self.channels = check_positive_int(channels, "channels")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise TypeError(f"ratio must be a float, got {type(ratio).__name__}")
        if not ratio > 0:
            raise ValueError(f"ratio must be > 0, got {ratio}")
        hidden = int(channels * ratio)  # as mmcv's ContextBlock
        if hidden < 1:
            raise ValueError(
                f"ratio={ratio} leaves no channels: int(channels * ratio) must be >= 1, "
                f"got channels={channels}"
            )
        for value, name, options in ((pooling, "pooling", POOLINGS), (fusion, "fusion", FUSIONS)):
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a str, got {type(value).__name__}")
            if value not in options:
                raise ValueError(f"{name} must be one of {options}, got {value!r}")
        self.ratio = float(ratio)
        self.hidden_channels = hidden
        self.pooling = pooling
        self.fusion = fusion
        self.conv_mask: nn.Conv2d | None = (
            nn.Conv2d(channels, 1, 1) if pooling == "att" else None
        )
        last = nn.Conv2d(hidden, channels, 1)
        nn.init.zeros_(last.weight)
        if last.bias is not None:
            nn.init.zeros_(last.bias)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), norm_layer(hidden), act_layer(), last
        )

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, hidden_channels={self.hidden_channels}, "
            f"pooling={self.pooling!r}, fusion={self.fusion!r}"
        )

    def _context(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if self.conv_mask is None:
            return x.mean(dim=(2, 3), keepdim=True)
        logits = self.conv_mask(x).reshape(b, 1, h * w)
        wide = torch.promote_types(x.dtype, torch.float32)
        with autocast_off(x.device.type):
            weights = torch.softmax(logits.to(wide), dim=-1)  # (B, 1, N)
            context = torch.matmul(x.reshape(b, c, h * w).to(wide), weights.transpose(1, 2))
        return context.reshape(b, c, 1, 1).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature(x, self.channels, who=type(self).__name__)
        term = self.transform(self._context(x))
        if self.fusion == "mul":
            return x * torch.sigmoid(term)
        return x + term
