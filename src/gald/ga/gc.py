"""Global context block (GCNet).

Reference: Y. Cao, J. Xu, S. Lin, F. Wei, H. Hu, "GCNet: Non-local Networks Meet
Squeeze-Excitation Networks and Beyond", ICCV Workshops 2019 (arXiv 1904.11492).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import torch
from torch import nn

from .._amp import autocast_off, compute_dtype
from .._layers import LayerFactory, make_act, make_norm
from .._validate import (
    check_choice,
    check_factory,
    check_feature,
    check_float,
    check_ordered_items,
    check_positive_int,
)
from ..registry import register_ga

POOLINGS: Final = ("att", "avg")
FUSIONS: Final = ("add", "mul")


def channel_layer_norm(channels: int) -> nn.Module:
    """``LayerNorm([channels, 1, 1])``: the norm GCNet puts on its (B, C r, 1, 1) bottleneck."""
    return nn.LayerNorm([channels, 1, 1])


def _check_fusion(fusion: object) -> tuple[str, ...]:
    """``"add"``, ``"mul"`` or a sequence of distinct names from them, as a tuple in
    ``FUSIONS`` order."""
    names = (
        [fusion]
        if isinstance(fusion, str)
        else check_ordered_items(fusion, "fusion", "names from ('add', 'mul')")
    )
    if not all(isinstance(n, str) for n in names):
        raise TypeError(
            f"fusion must be 'add', 'mul' or a tuple of them, got {type(fusion).__name__} "
            f"{fusion!r}"
        )
    if not names or any(n not in FUSIONS for n in names) or len(set(names)) != len(names):
        raise ValueError(
            f"fusion must be 'add', 'mul' or a tuple of distinct names from {FUSIONS}, "
            f"got {fusion!r}"
        )
    return tuple(n for n in FUSIONS if n in set(map(str, names)))


@register_ga("gc")
class GlobalContext(nn.Module):
    r"""Global context block: one attention-pooled context vector, transformed and fused.

    Reference: Y. Cao, J. Xu, S. Lin, F. Wei, H. Hu, "GCNet: Non-local Networks Meet
    Squeeze-Excitation Networks and Beyond", ICCV Workshops 2019 (arXiv 1904.11492).

    With ``W_k`` a 1x1 conv ``C -> 1`` and ``C_r = int(C * ratio)``:

    .. math::
        \alpha_j = \mathrm{softmax}_j(W_k x_j), \qquad
        c = \sum_j \alpha_j x_j \quad(\text{"att"}) \quad\text{or}\quad
        c = \tfrac{1}{N}\sum_j x_j \quad(\text{"avg"}),

    .. math::
        t_f = W_{2,f}\, \mathrm{act}(\mathrm{LN}(W_{1,f}\, c)) \quad (f \in \text{fusion}),

    .. math::
        \mathrm{out} = x + t_{add} \;(\text{"add"}), \qquad
        \mathrm{out} = x \odot \sigma(t_{mul}) \;(\text{"mul"}), \qquad
        \mathrm{out} = x \odot \sigma(t_{mul}) + t_{add} \;(\text{both}),

    each fusion with its own transform: ``W_1`` a 1x1 conv ``C -> C_r``, ``LN`` a LayerNorm over
    ``[C_r, 1, 1]`` and ``W_2`` a 1x1 conv ``C_r -> C`` whose weight and bias start at zero.
    With both (mmcv's ``fusion_types=("channel_add", "channel_mul")``) the gate is applied
    first and the term added after, in mmcv's order. So ``"add"`` starts as the identity and
    ``"mul"`` (alone or with ``"add"``) starts as ``x * sigmoid(0) = x / 2`` (as in GCNet and
    mmcv). The context is the same vector for every position (query-independent).

    The pooling logits, the softmax over the ``N`` positions and the weighted sum run in
    float32 under autocast; the context is cast back after.

    Norms and activations: the bottleneck LayerNorm is part of GCNet's definition (it works on
    one (C_r, 1, 1) vector per sample, so it has no batch statistics) and is set by
    ``bottleneck_norm_layer``; ``norm_layer`` is accepted, so that one model-wide choice (for
    instance ``nn.SyncBatchNorm``) can be handed to every GA layer, but replaces nothing here.
    ``act_layer`` replaces the activation of every transform.

    Complexity (per image, ``N = H * W``): time ``O(N C)`` for pooling and fusion plus
    ``O(C C_r)`` per transform; extra memory ``O(N)`` for the attention weights.

    Args:
        channels: input and output channels ``C``.
        ratio: bottleneck ratio in ``(0, 1]``, ``C_r = int(C * ratio) >= 1`` (a share of the
            channels, as in GCNet and mmcv's ``ContextBlock``: ``1/4``, not ``4``).
        pooling: ``"att"`` (attention pooling) or ``"avg"`` (global average).
        fusion: ``"add"`` (channel add), ``"mul"`` (sigmoid channel gate) or both, as
            ``("add", "mul")`` (in any order; one transform each).
        norm_layer: accepted for a uniform GA signature; replaces no norm (see above).
        act_layer: activation factory of the transforms, called as ``act_layer()``.
        bottleneck_norm_layer: factory for the bottleneck norm, called as
            ``bottleneck_norm_layer(C_r)`` on a (B, C_r, 1, 1) map; defaults to
            ``LayerNorm([C_r, 1, 1])``.

    Shape:
        - Input: :math:`(B, C, H, W)`
        - Output: :math:`(B, C, H, W)`

    Example:
        >>> layer = GlobalContext(64, fusion=("add", "mul"))
        >>> layer(torch.randn(2, 64, 9, 7)).shape
        torch.Size([2, 64, 9, 7])
    """

    def __init__(
        self,
        channels: int,
        *,
        ratio: float = 1 / 4,
        pooling: str = "att",
        fusion: str | Sequence[str] = "add",
        norm_layer: LayerFactory | None = None,
        act_layer: LayerFactory = nn.ReLU,
        bottleneck_norm_layer: LayerFactory = channel_layer_norm,
    ) -> None:
        super().__init__()
        channels = self.channels = check_positive_int(channels, "channels")
        ratio = check_float(ratio, "ratio")
        if not 0 < ratio <= 1:
            raise ValueError(
                f"ratio must be in (0, 1], the bottleneck's share of the channels "
                f"(hidden = int(channels * ratio), GCNet uses 1/4 or 1/16); got {ratio}. "
                "Unlike DualGCN's ratio it multiplies: for a reduction by r pass ratio=1/r"
            )
        hidden = int(channels * ratio)  # as mmcv's ContextBlock
        if hidden < 1:
            raise ValueError(
                f"ratio={ratio} leaves no channels: int(channels * ratio) must be >= 1, "
                f"got channels={channels}"
            )
        check_choice(pooling, "pooling", POOLINGS)
        self.fusion = _check_fusion(fusion)
        if norm_layer is not None:
            check_factory(norm_layer, "norm_layer")
        check_factory(act_layer, "act_layer")
        check_factory(bottleneck_norm_layer, "bottleneck_norm_layer")
        self.ratio = float(ratio)
        self.hidden_channels = hidden
        self.pooling = pooling
        self.conv_mask: nn.Conv2d | None = nn.Conv2d(channels, 1, 1) if pooling == "att" else None
        self.transforms = nn.ModuleDict()
        for name in self.fusion:
            last = nn.Conv2d(hidden, channels, 1)
            nn.init.zeros_(last.weight)
            if last.bias is not None:
                nn.init.zeros_(last.bias)
            self.transforms[name] = nn.Sequential(
                nn.Conv2d(channels, hidden, 1),
                make_norm(bottleneck_norm_layer, hidden, self, "bottleneck_norm_layer", (1, 1)),
                make_act(act_layer, self),
                last,
            )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Checkpoints of the single-fusion layer from before both fusions were supported keep
        # the transform under ``transform.``; it is the one transform of this layer.
        old = prefix + "transform."
        if len(self.fusion) == 1:
            new = f"{prefix}transforms.{self.fusion[0]}."
            for key in [k for k in state_dict if k.startswith(old)]:
                state_dict[new + key[len(old) :]] = state_dict.pop(key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, ratio={self.ratio}, hidden_channels={self.hidden_channels}, "
            f"pooling={self.pooling!r}, fusion={self.fusion}"
        )

    def _context(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if self.conv_mask is None:
            return x.mean(dim=(2, 3), keepdim=True)
        logits = self.conv_mask(x).reshape(b, 1, h * w)
        wide = compute_dtype(x.dtype)
        with autocast_off(x.device.type):
            weights = torch.softmax(logits.to(wide), dim=-1)  # (B, 1, N)
            context = torch.matmul(x.reshape(b, c, h * w).to(wide), weights.transpose(1, 2))
        return context.reshape(b, c, 1, 1).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature(x, self.channels, who=type(self).__name__)
        context = self._context(x)
        out = x
        if "mul" in self.transforms:
            out = out * torch.sigmoid(self.transforms["mul"](context))
        if "add" in self.transforms:
            out = out + self.transforms["add"](context)
        return out
