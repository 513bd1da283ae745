"""DANet dual attention: position attention (PAM) and channel attention (CAM), gated and summed.

Reference: J. Fu et al., "Dual Attention Network for Scene Segmentation", CVPR 2019
(arXiv 1809.02983); the authors' ``PAM_Module`` and ``CAM_Module`` (junfu1115/DANet), restated
here from their documented semantics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
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

_BRANCHES = ("pam", "cam")


class _PositionAttention(nn.Module):
    """PAM without its residual: ``gamma * V softmax(Q^T K)^T`` (no 1/sqrt(d) scaling)."""

    def __init__(self, channels: int, inter_channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.inter_channels = inter_channels
        self.query_conv = nn.Conv2d(channels, inter_channels, 1)
        self.key_conv = nn.Conv2d(channels, inter_channels, 1)
        self.value_conv = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def reset_parameters(self) -> None:
        """``gamma`` back to zero (the branch starts silent); the convs have their own."""
        with torch.no_grad():
            self.gamma.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-2]
        # (B, 1, N, C') queries and keys, (B, 1, N, C) values: one attention head.
        tokens = "b c h w -> b 1 (h w) c"
        q = rearrange(self.query_conv(x), tokens)
        k = rearrange(self.key_conv(x), tokens)
        v = rearrange(self.value_conv(x), tokens)
        pad = self.channels - self.inter_channels  # a Python int: no tensor in the condition
        if pad > 0:
            # Fused (flash) kernels need one head size for q, k and v: zero-padding q and k to C
            # leaves every q.k unchanged and spares the N x N affinity the math fallback stores.
            q = F.pad(q, (0, pad))
            k = F.pad(k, (0, pad))
        out_dtype = v.dtype  # the values' dtype (a half model's, or autocast's)
        dtype = compute_dtype(out_dtype)
        # fused kernels also need a unit stride in the head dimension
        q, k, v = (t.to(dtype).contiguous() for t in (q, k, v))
        with autocast_off(x.device.type):
            y = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # (B, 1, N, C)
        y = rearrange(y.to(out_dtype), "b 1 (h w) c -> b c h w", h=h)
        return self.gamma * y


class _ChannelAttention(nn.Module):
    """CAM without its residual: ``gamma * softmax(max_row(E) - E) X`` with ``E = X X^T``."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def reset_parameters(self) -> None:
        """``gamma`` back to zero (the branch starts silent)."""
        with torch.no_grad():
            self.gamma.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        dtype = compute_dtype(x.dtype)
        with autocast_off(x.device.type):
            feats = x.reshape(b, c, h * w).to(dtype)
            energy = torch.matmul(feats, feats.transpose(1, 2))  # (B, C, C)
            energy = energy.amax(dim=-1, keepdim=True) - energy
            attn = torch.softmax(energy, dim=-1)
            y = torch.matmul(attn, feats)  # (B, C, N)
        return self.gamma * y.to(x.dtype).reshape(b, c, h, w)


@register_ga("danet")
class DualAttention(nn.Module):
    r"""DANet's position and channel attention as one residual layer.

    Reference: J. Fu et al., "Dual Attention Network for Scene Segmentation", CVPR 2019 (arXiv
    1809.02983); the authors' ``PAM_Module`` and ``CAM_Module`` (junfu1115/DANet), restated here
    from their documented semantics.

    With :math:`X \in \mathbb{R}^{C \times N}` (``N = H * W``), ``Q, K`` 1x1 convs ``C -> C'``
    (``C' = C // reduction``, at least 1: a larger ``reduction`` is a ``ValueError``) and ``V`` a 1x1 conv ``C -> C`` (all with bias):

    .. math::
        \mathrm{PAM}(X) = V\, \mathrm{softmax}_j(Q_i^\top K_j)^\top, \qquad
        \mathrm{CAM}(X) = \mathrm{softmax}_j\big(\max_{j'} E_{ij'} - E_{ij}\big)\, X,
        \quad E = X X^\top,

    .. math::
        \mathrm{out} = X + \gamma_p\, \mathrm{PAM}(X) + \gamma_c\, \mathrm{CAM}(X),

    with the learnable scalars :math:`\gamma_p, \gamma_c` initialised to 0, so the layer is the
    identity at initialisation. The PAM logits are not scaled (``scale=1.0``, as in DANet); the
    attention runs through :func:`torch.nn.functional.scaled_dot_product_attention`, so fused
    kernels never store the ``N x N`` affinity (338 MiB per image at 97x97 in fp32). Fused
    kernels need equal head sizes, so ``Q`` and ``K`` are zero-padded from ``C'`` to ``C``
    channels first: the logits are unchanged, the ``Q^T K`` product costs ``C`` instead of
    ``C'`` per pair (measured on CPU at (1, 512, 97, 97): about 10 % slower than the
    unpadded math path, with about a fifth of its peak memory).

    .. note::
        The residual ``x`` is counted once. DANet's head wraps each branch in its own convs and
        sums the two branch outputs, so each branch carries its own copy of the input; a
        standalone layer instead adds both gated terms to a single identity.

    .. note::
        The CAM subtracts each energy from its row maximum before the softmax, as DANet does.
        Softmax is shift-invariant, so this equals ``softmax(-E)``: a channel attends most to the
        channels it is *least* similar to. It is kept for parity with the authors' weights.

    Logits and softmax run in fp32 under autocast (and the result is cast back).

    The layer has no norm and no activation: ``norm_layer`` and ``act_layer`` are accepted, so
    that one model-wide choice (for instance ``nn.SyncBatchNorm``) can be handed to every GA
    layer, but replace nothing here.

    Complexity (``N = H * W``): PAM time O(N^2 C), memory O(N C) with a fused SDPA kernel
    (O(N^2) where a backend falls back to the plain math path); CAM time O(N C^2), memory
    O(C^2).

    Args:
        channels: input and output channels ``C``.
        reduction: PAM query/key reduction; ``C' = C // reduction`` must be at least 1.
        branches: the branches to use, a non-empty sub-sequence of ``("pam", "cam")``.
        norm_layer: accepted for a uniform GA signature; the layer has no norm.
        act_layer: accepted for a uniform GA signature; the layer has no activation.

    Shape:
        - Input: :math:`(B, C, H, W)`
        - Output: :math:`(B, C, H, W)`

    Example:
        >>> layer = DualAttention(64)
        >>> layer(torch.randn(2, 64, 9, 7)).shape
        torch.Size([2, 64, 9, 7])
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 8,
        branches: Sequence[str] = _BRANCHES,
        norm_layer: LayerFactory | None = None,
        act_layer: LayerFactory | None = None,
    ) -> None:
        super().__init__()
        check_ignored_factories(norm_layer=norm_layer, act_layer=act_layer)
        channels = self.channels = check_positive_int(channels, "channels")
        reduction = self.reduction = check_positive_int(reduction, "reduction")
        if isinstance(branches, str) or not isinstance(branches, Sequence):
            raise TypeError(
                "branches must be a tuple or list of branch names from ('pam', 'cam'), "
                f"got {type(branches).__name__} {branches!r}"
            )
        chosen = tuple(branches)
        if (
            not chosen
            or any(name not in _BRANCHES for name in chosen)
            or len(set(chosen)) != len(chosen)
        ):
            raise ValueError(
                "branches must be a non-empty sequence of distinct names from ('pam', 'cam'), "
                f"got {chosen!r}"
            )
        self.branches = tuple(name for name in _BRANCHES if name in chosen)
        self.inter_channels = reduced_width(channels, reduction)
        self.pam: _PositionAttention | None = (
            _PositionAttention(channels, self.inter_channels) if "pam" in chosen else None
        )
        self.cam: _ChannelAttention | None = _ChannelAttention() if "cam" in chosen else None

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, reduction={self.reduction}, "
            f"inter_channels={self.inter_channels}, branches={self.branches}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature(x, self.channels, who=type(self).__name__)
        out = x
        if self.pam is not None:
            out = out + self.pam(x)
        if self.cam is not None:
            out = out + self.cam(x)
        return out
