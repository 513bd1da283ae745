"""DGCNet's dual graph convolution: a coordinate-space graph and a feature-space graph.

Reference: L. Zhang, X. Li et al., "Dual Graph Convolutional Network for Semantic
Segmentation", BMVC 2019 (arXiv 1909.06121); the authors' ``DualGCN`` and ``SpatialGCN`` in
github.com/lxtGH/GALD-DGCNet (``libs/models/DualGCNNet.py``), restated here from their
documented semantics.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._amp import autocast_off, compute_dtype, run_unscaled
from .._layers import LayerFactory, make_act, make_norm
from .._validate import check_factory, check_feature, check_positive_int, reduced_width
from ..registry import register_ga


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient.

    Works around a silent CPU bug (seen in torch 2.13): BatchNorm's backward returns a wrong
    input gradient when the incoming gradient of a batch-1 tensor has channels-last-like
    strides with a batch stride below ``C * H * W``, which the transposed graph products below
    produce. ``contiguous()`` is a no-op for gradients that are already dense.
    """

    # forward and setup_context apart, and a vmap rule: the form torch.func transforms accept
    generate_vmap_rule = True

    @staticmethod
    def forward(t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return t.view_as(t)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad.contiguous()


def _norm_2d(norm: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``norm(t)`` for a (B, C, H, W) tensor whose output feeds reshapes and transposes."""
    return _DenseGrad.apply(norm(t))


def _norm_1d(norm: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D norm to a (B, C, L) tensor through a (B, C, L, 1) view.

    For BatchNorm this is exactly ``BatchNorm1d`` (same statistics over B and L, same state
    dict), and it lets one ``norm_layer`` factory serve the 1-D and the 2-D norms.
    """
    return _DenseGrad.apply(norm(t.unsqueeze(-1))).squeeze(-1)


class _SpatialGCN(nn.Module):
    r"""The coordinate-space graph on a (B, C, h, w) map, with ``C2 = max(1, C // 2)``.

    .. math::
        A = \mathrm{softmax}_j\big(Q V^\top\big) \in \mathbb{R}^{C_2 \times C_2}, \quad
        Y = A^\top K, \quad
        \mathrm{out} = \mathrm{act}\big(x + \mathrm{norm}(W_o\, \mathrm{norm}(W_g Y))\big),

    with ``K, V, Q`` 1x1 convs ``C -> C2`` (with bias) flattened to (C2, N), ``W_g`` a
    ``C2 x C2`` Conv1d without bias and ``W_o`` a 1x1 conv ``C2 -> C`` with bias.
    """

    _fuse_pairs = (("conv_wg", "bn_wg"),)  # bn_wg(conv_wg(y)) in forward: gald.fuse folds it

    def __init__(self, channels: int, norm_layer: LayerFactory, act_layer: LayerFactory) -> None:
        super().__init__()
        inter = max(1, channels // 2)
        self.inter_channels = inter
        self.node_k = nn.Conv2d(channels, inter, 1)
        self.node_v = nn.Conv2d(channels, inter, 1)
        self.node_q = nn.Conv2d(channels, inter, 1)
        self.conv_wg = nn.Conv1d(inter, inter, 1, bias=False)
        self.bn_wg = make_norm(norm_layer, inter, self)
        self.out = nn.Sequential(
            nn.Conv2d(inter, channels, 1),
            make_norm(norm_layer, channels, self),
        )
        self.act = make_act(act_layer, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        c2, n = self.inter_channels, h * w
        k = self.node_k(x).reshape(b, c2, n)
        v = self.node_v(x).reshape(b, c2, n)
        q = self.node_q(x).reshape(b, c2, n)
        dtype = compute_dtype(k.dtype)
        with autocast_off(x.device.type):
            attn = torch.softmax(torch.matmul(q.to(dtype), v.to(dtype).transpose(1, 2)), dim=-1)
            y = torch.matmul(attn.transpose(1, 2), k.to(dtype))  # (B, C2, N)
        y = _norm_1d(self.bn_wg, self.conv_wg(y.to(k.dtype)))
        return self.act(self.out(y.reshape(b, c2, h, w)) + x)


@register_ga("dualgcn")
class DualGCN(nn.Module):
    r"""Dual graph convolution (DGCNet): coordinate-space and feature-space graphs, fused.

    Reference: L. Zhang, X. Li et al., "Dual Graph Convolutional Network for Semantic Segmentation",
    BMVC 2019 (arXiv 1909.06121); the authors' ``DualGCN`` and ``SpatialGCN`` in
    github.com/lxtGH/GALD-DGCNet (``libs/models/DualGCNNet.py``), restated here from their
    documented semantics.

    *Coordinate space.* ``L`` = 3 x [depthwise 3x3 conv, stride 2, padding 1, no bias -> norm]
    (no activation) gives a copy of ``x`` at about 1/8 of its side; a spatial GCN (see below)
    reasons over its positions; the result is upsampled bilinearly (``align_corners=True``) and
    applied as an unbounded multiplicative map: :math:`x_l = x \odot \mathrm{Up}(G(L(x))) + x`.
    ``G`` is :math:`\mathrm{act}(u + \mathrm{norm}(W_o\,\mathrm{norm}(W_g\, A^\top K)))` on the
    small map ``u`` with :math:`A = \mathrm{softmax}_j(Q V^\top)` a ``C/2 x C/2`` channel
    affinity of 1x1 projections ``K, V, Q`` (unscaled logits, as the authors).

    *Feature space.* With :math:`\Phi` (1x1 ``C -> 2C/r`` -> norm, the states) and
    :math:`\Theta` (1x1 ``C -> C/r`` -> norm, the nodes), flattened over ``N``:

    .. math::
        Z_0 = \Phi \Theta^\top, \quad
        Z = \mathrm{norm}\big(W_g\, (Z_0 + \mathrm{norm}(W_a Z_0^\top)^\top)\big), \quad
        x_g = \mathrm{act}\big(x + \mathrm{norm}(W_3\, Z \Theta)\big),

    with :math:`W_a` (``C/r x C/r``) the learned adjacency over nodes and :math:`W_g`
    (``2C/r x 2C/r``) the state update, both Conv1d without bias. ``Z_0`` is not divided by
    ``N`` (as the authors).

    *Output.* :math:`\mathrm{out} = \mathrm{norm}(W_f\, [x_l, x_g])` with :math:`W_f` a 1x1
    conv ``2C -> C``. The layer is not an identity at initialisation.

    Every norm is ``norm_layer(channels)``; the three 1-D norms of the authors
    (``BatchNorm1d``) are applied as ``norm_layer`` on a (B, C, L, 1) view, which for BatchNorm
    is the same computation and the same state dict. Submodule names follow the authors' code,
    so their ``DualGCN`` weights load with ``load_state_dict``. Logits, softmax and graph
    projections run in fp32 under autocast.

    The padded strided convs accept every ``H, W >= 1``. Train mode needs more than one value
    per channel in each BatchNorm: the coordinate branch reaches a 1x1 map for ``H, W <= 8``,
    and the state update normalises over the ``C // r`` nodes, so with a batch of 1 train mode
    fails on maps of 8x8 and smaller, and at any size when ``C // r == 1``; a batch of 2 or more
    trains at every size.

    Complexity (``N = H * W``): time O(N C^2) (the ``2C -> C`` fusion and the 1x1 projections
    dominate; the coordinate graph works on about N / 64 positions), memory O(N C); the graphs
    themselves are ``C/2 x C/2`` and ``2C/r x C/r``.

    Args:
        channels: input and output channels ``C``.
        ratio: node reduction ``r``: ``C // r`` nodes with ``2 * (C // r)`` states; must be
            ``<= C``.
        norm_layer: normalisation factory called as ``norm_layer(num_channels)``.
        act_layer: activation factory called as ``act_layer()``.

    Shape:
        - Input: :math:`(B, C, H, W)`
        - Output: :math:`(B, C, H, W)`

    Example:
        >>> layer = DualGCN(64)
        >>> layer.eval()(torch.randn(1, 64, 9, 7)).shape
        torch.Size([1, 64, 9, 7])
    """

    # (conv, norm) applied as norm(conv(t)) in forward: gald.fuse folds them
    _fuse_pairs = (
        ("phi", "bn_phi"),
        ("theta", "bn_theta"),
        ("conv_adj", "bn_adj"),
        ("conv_wg", "bn_wg"),
        ("conv3", "bn3"),
    )

    def __init__(
        self,
        channels: int,
        *,
        ratio: int = 4,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        channels = self.channels = check_positive_int(channels, "channels")
        ratio = self.ratio = check_positive_int(ratio, "ratio")
        reduced_width(channels, ratio, "ratio")  # at least one node
        check_factory(norm_layer, "norm_layer")
        check_factory(act_layer, "act_layer")
        nodes = channels // ratio
        states = 2 * nodes
        self.num_node, self.num_state = nodes, states

        # coordinate space
        stages: list[nn.Module] = []
        for _ in range(3):
            stages.append(
                nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels, bias=False)
            )
            stages.append(make_norm(norm_layer, channels, self))
        self.local = nn.Sequential(*stages)
        self.gcn_local_attention = _SpatialGCN(channels, norm_layer, act_layer)

        # feature space
        self.phi = nn.Conv2d(channels, states, 1, bias=False)
        self.bn_phi = make_norm(norm_layer, states, self)
        self.theta = nn.Conv2d(channels, nodes, 1, bias=False)
        self.bn_theta = make_norm(norm_layer, nodes, self)
        self.conv_adj = nn.Conv1d(nodes, nodes, 1, bias=False)
        self.bn_adj = make_norm(norm_layer, nodes, self)
        self.conv_wg = nn.Conv1d(states, states, 1, bias=False)
        self.bn_wg = make_norm(norm_layer, states, self)
        self.conv3 = nn.Conv2d(states, channels, 1, bias=False)
        self.bn3 = make_norm(norm_layer, channels, self)
        self.act = make_act(act_layer, self)

        self.final = nn.Sequential(
            nn.Conv2d(2 * channels, channels, 1, bias=False),
            make_norm(norm_layer, channels, self),
        )

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, ratio={self.ratio}, num_node={self.num_node}, "
            f"num_state={self.num_state}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature(x, self.channels, who=type(self).__name__)
        b, _, h, w = x.shape
        n = h * w

        # coordinate space: a multiplicative map from the graph on the 1/8 copy
        local = self.gcn_local_attention(self.local(x))
        local = F.interpolate(local, size=(h, w), mode="bilinear", align_corners=True)
        local_feat = x * local + x

        # feature space: project N pixels onto C/r nodes with 2C/r states
        states = _norm_2d(self.bn_phi, self.phi(x)).reshape(b, self.num_state, n)
        nodes = _norm_2d(self.bn_theta, self.theta(x)).reshape(b, self.num_node, n)
        dtype = compute_dtype(states.dtype)
        with autocast_off(x.device.type):
            z_idt = torch.matmul(
                states.to(dtype), nodes.to(dtype).transpose(1, 2)
            )  # (B, 2C/r, C/r)
        # z_idt sums N positions: the small graph convs run in their parameters' dtype with
        # autocast off (float32 under autocast; an fp16 copy would overflow on large maps)
        with autocast_off(x.device.type):
            z_idt = z_idt.to(self.conv_adj.weight.dtype)
            z = _norm_1d(self.bn_adj, self.conv_adj(z_idt.transpose(1, 2))).transpose(1, 2)
            z = _norm_1d(self.bn_wg, self.conv_wg(z + z_idt))
        with autocast_off(x.device.type):
            y = torch.matmul(z.to(dtype), nodes.to(dtype))  # re-projection, (B, 2C/r, N)
        y = y.reshape(b, self.num_state, h, w)
        # a sum over N positions: conv3 and its norm run in float32 under autocast, where an
        # fp16 copy of y (or of conv3's output) would overflow on large maps
        g = run_unscaled(self.bn3, run_unscaled(self.conv3, y))
        global_feat = self.act(x + g.to(torch.promote_types(x.dtype, states.dtype)))

        return self.final(torch.cat((local_feat, global_feat), dim=1))
