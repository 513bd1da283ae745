"""GloRe, the graph-based global reasoning unit.

Reference: Y. Chen et al., "Graph-Based Global Reasoning Networks", CVPR 2019
(arXiv 1811.12814); the authors' ``GloRe_Unit_2D`` (facebookresearch/GloRe), restated here from
its documented semantics, with the output norm zero-initialised as its comment intends.
"""

from __future__ import annotations

import torch
from torch import nn

from .._amp import autocast_off, compute_dtype, run_unscaled
from .._layers import LayerFactory, make_act, make_norm
from .._validate import check_bool, check_factory, check_feature, check_positive_int
from ..registry import register_ga


class _GraphConv(nn.Module):
    """One GCN layer on a (B, S, K) node-state matrix: ``W_s act(V + (W_n V^T + b_n)^T)``."""

    def __init__(self, num_state: int, num_node: int, act_layer: LayerFactory) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(num_node, num_node, 1)  # mixes nodes (the adjacency)
        self.act = make_act(act_layer, self)
        self.conv2 = nn.Conv1d(num_state, num_state, 1, bias=False)  # mixes states

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        h = v + self.conv1(v.transpose(1, 2)).transpose(1, 2)
        return self.conv2(self.act(h))


@register_ga("glore")
class GloRe(nn.Module):
    r"""Global reasoning unit: project pixels onto graph nodes, run a GCN, project back.

    Reference: Y. Chen et al., "Graph-Based Global Reasoning Networks", CVPR 2019 (arXiv
    1811.12814); the authors' ``GloRe_Unit_2D`` (facebookresearch/GloRe), restated here from its
    documented semantics, with the output norm zero-initialised as its comment intends.

    With ``S`` (``num_state``) and ``K`` (``num_node``) 1x1 convs (with bias) of the input,
    :math:`S \in \mathbb{R}^{S \times N}` and :math:`B \in \mathbb{R}^{K \times N}`:

    .. math::
        V = S B^\top \;(/N \text{ if normalize}), \qquad
        h = V + (W_n V^\top + b_n)^\top, \qquad
        h' = W_s\, \mathrm{act}(h), \qquad
        \mathrm{out} = x + \mathrm{norm}\big(W_e\, (h' B)\big),

    where :math:`W_n` (``K x K``, with bias) mixes nodes, :math:`W_s` (``S x S``, no bias)
    mixes states and :math:`W_e` is a 1x1 conv ``S -> C`` without bias. The weight of the output
    norm is zero-initialised, so the layer is the identity at initialisation (the authors' code
    comments this but leaves the default init of 1). Submodule names follow the authors' code
    (``conv_state``, ``conv_proj``, ``gcn.conv1``, ``gcn.conv2``, ``conv_extend``, ``blocker``).

    ``normalize=True`` (the default here; the authors default to ``False``) divides ``V`` by
    ``N`` so its scale does not grow with the input size. The projection ``V`` is accumulated in
    fp32 under autocast.

    The authors' output norm is ``BatchNorm2d(C, eps=1e-4)``; here it is ``norm_layer(C)``, with
    the factory's own eps (1e-5 for ``nn.BatchNorm2d``). To reproduce the outputs of weights
    trained with their code, pass ``normalize=False`` and
    ``norm_layer=functools.partial(nn.BatchNorm2d, eps=1e-4)``: with a small running variance
    the two eps give visibly different outputs.

    Train mode needs more than one value per channel in the output BatchNorm: a batch of one
    works for ``H * W > 1``; a 1x1 map needs batch >= 2.

    Complexity (``N = H * W``): time O(N C (S + K) + N S K), memory O(N (S + K)); no N x N
    term.

    Args:
        channels: input and output channels ``C``.
        num_state: graph state channels ``S``; defaults to ``max(1, C // 2)``.
        num_node: graph nodes ``K``; defaults to ``max(1, C // 4)``.
        normalize: divide the projection by ``N = H * W``.
        norm_layer: output normalisation factory called as ``norm_layer(C)``.
        act_layer: GCN activation factory called as ``act_layer()``.

    Shape:
        - Input: :math:`(B, C, H, W)`
        - Output: :math:`(B, C, H, W)`

    Example:
        >>> layer = GloRe(64)
        >>> layer(torch.randn(2, 64, 9, 7)).shape
        torch.Size([2, 64, 9, 7])
    """

    # (conv, norm) applied as norm(conv(y)) in forward: gald.fuse folds them
    _fuse_pairs = (("conv_extend", "blocker"),)

    def __init__(
        self,
        channels: int,
        *,
        num_state: int | None = None,
        num_node: int | None = None,
        normalize: bool = True,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        channels = self.channels = check_positive_int(channels, "channels")
        self.num_state = check_positive_int(
            max(1, channels // 2) if num_state is None else num_state, "num_state"
        )
        self.num_node = check_positive_int(
            max(1, channels // 4) if num_node is None else num_node, "num_node"
        )
        normalize = check_bool(normalize, "normalize")
        self.normalize = normalize
        check_factory(norm_layer, "norm_layer")
        check_factory(act_layer, "act_layer")
        self.conv_state = nn.Conv2d(channels, self.num_state, 1)
        self.conv_proj = nn.Conv2d(channels, self.num_node, 1)
        self.gcn = _GraphConv(self.num_state, self.num_node, act_layer)
        self.conv_extend = nn.Conv2d(self.num_state, channels, 1, bias=False)
        self.blocker = make_norm(norm_layer, channels, self)
        weight = getattr(self.blocker, "weight", None)
        if isinstance(weight, nn.Parameter):
            nn.init.zeros_(weight)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_state={self.num_state}, "
            f"num_node={self.num_node}, normalize={self.normalize}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature(x, self.channels, who=type(self).__name__)
        b, _, h, w = x.shape
        n = h * w
        states = self.conv_state(x).reshape(b, self.num_state, n)
        proj = self.conv_proj(x).reshape(b, self.num_node, n)
        dtype = compute_dtype(states.dtype)
        with autocast_off(x.device.type):
            v = torch.matmul(states.to(dtype), proj.to(dtype).transpose(1, 2))  # (B, S, K)
            if self.normalize:
                v = v / n
        # without normalize, v sums N positions: the graph, the back-projection, conv_extend and
        # its norm run in float32 under autocast, where fp16 copies would overflow
        v = run_unscaled(self.gcn, v)
        with autocast_off(x.device.type):
            y = torch.matmul(v.to(dtype), proj.to(dtype)).reshape(b, self.num_state, h, w)
        out = run_unscaled(self.blocker, run_unscaled(self.conv_extend, y))
        return x + out.to(torch.promote_types(x.dtype, states.dtype))
