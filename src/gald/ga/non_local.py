"""Non-local block (NonLocal2d) with the four pairwise functions of the paper.

Reference: X. Wang, R. Girshick, A. Gupta, K. He, "Non-local Neural Networks", CVPR 2018
(arXiv 1711.07971). Defaults follow the configuration used by segmentation codebases
(reduction 2, ``1/sqrt(C')`` scaling, no subsampling, zero-initialised output norm).
"""

from __future__ import annotations

import math
from typing import Final

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from .._amp import autocast_off, compute_dtype
from .._layers import LayerFactory, make_norm
from .._validate import (
    check_bool,
    check_choice,
    check_feature,
    check_ignored_factories,
    check_positive_int,
    reduced_width,
)
from ..registry import register_ga

MODES: Final = ("embedded_gaussian", "gaussian", "dot_product", "concatenation")


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """(B, d, h, w) map -> contiguous (B, h w, d) tokens in :func:`compute_dtype` (float32 for
    half types).

    Contiguity matters: the fused CPU SDPA kernels need a unit stride on the last dimension
    and otherwise fall back to the math path, which materialises the affinity.
    """
    t = rearrange(t, "b d h w -> b (h w) d")
    return t.to(compute_dtype(t.dtype)).contiguous()


def _concat_rows(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``sum_j relu(a_i + b_j) g_j`` for a block of queries: a (B, n, 1), b (B, 1, Nk), g (B, Nk, C')."""
    return torch.matmul(torch.relu(a + b), g)


@register_ga("nonlocal")
class NonLocal2d(nn.Module):
    r"""Non-local block: every position attends to every (optionally subsampled) position.

    Reference: X. Wang, R. Girshick, A. Gupta, K. He, "Non-local Neural Networks", CVPR 2018 (arXiv
    1711.07971). Defaults follow the configuration used by segmentation codebases (reduction 2,
    ``1/sqrt(C')`` scaling, no subsampling, zero-initialised output norm).

    With :math:`\theta, \phi, g` 1x1 convs ``C -> C'`` (``C' = C // reduction``), keys and values
    taken from the optional 2x2 max-pooled map (``N_k`` positions),

    .. math::
        y_i = \sum_j w(x_i, x_j)\, g(x_j), \qquad
        z = x + \mathrm{norm}(W_z * y),

    where ``W_z`` is a 1x1 conv ``C' -> C`` and the pairwise weight ``w`` depends on ``mode``:

    - ``embedded_gaussian``: :math:`\mathrm{softmax}_j(s\,\theta_i^\top \phi_j)`;
    - ``gaussian``: :math:`\mathrm{softmax}_j(s\,x_i^\top x_j)` (no :math:`\theta, \phi` convs);
    - ``dot_product``: :math:`\theta_i^\top \phi_j / N_k`;
    - ``concatenation``: :math:`\mathrm{ReLU}(w^\top[\theta_i; \phi_j]) / N_k` with
      :math:`w \in \mathbb{R}^{2C'}` a bias-free 1x1 conv;

    with :math:`s = 1/\sqrt{d}` when ``use_scale`` (``d`` the width of the dot product: ``C'``,
    or ``C`` in ``gaussian`` mode) and :math:`s = 1` otherwise. ``use_scale`` only affects the
    two softmax modes. (mmcv ignores ``use_scale`` in ``gaussian`` mode; pass
    ``use_scale=False`` to match it and the paper.) With ``zero_init`` the weight of the output
    norm (or ``W_z`` itself when ``norm_layer=None``) starts at zero, so the block starts as the
    identity.

    The softmax modes run through :func:`torch.nn.functional.scaled_dot_product_attention` with
    the explicit scale ``s``: this code never builds the ``N x N_k`` affinity, and fused
    (flash / memory-efficient) kernels keep only ``O(N)`` statistics for backward; the math
    fallback (e.g. float64) still materialises it. ``dot_product`` is computed by associativity
    as :math:`\theta_i^\top (\sum_j \phi_j g_j^\top) / N_k`. ``concatenation`` is inherently
    pairwise; it is computed in blocks of query rows holding at most ``chunk_elements`` affinity
    values, and each block is recomputed in backward (activation checkpointing), so neither pass
    holds the full affinity in eager mode; under ``torch.compile``, ``torch.export`` and ONNX
    export it is one block (a shape-dependent Python loop cannot be traced generically), so
    there it costs ``O(N N_k)`` memory. Attention logits, softmax and the aggregation run in float32 under
    autocast; the result is cast back.

    ``sub_sample`` max-pools the keys and values with a 2x2 window, stride 2 and
    ``ceil_mode=True`` (so ``N_k = ceil(H/2) * ceil(W/2)`` and a 1-pixel side still works; for
    even sides this equals the usual floor-mode pool).

    Complexity (per image, ``N = H * W``):

    =====================  ===============  =============================================
    mode                   time             extra memory
    =====================  ===============  =============================================
    embedded_gaussian      O(N N_k C')      O(N C') with a fused SDPA kernel
    gaussian               O(N N_k C)       O(N C) (values zero-padded to ``C`` channels,
                                            as the fused CPU kernel needs)
    dot_product            O(N C'^2)        O(N C' + C'^2)
    concatenation          O(N N_k C')      O(chunk_elements) per block, both passes
                                            (eager); O(N N_k) when traced
    =====================  ===============  =============================================

    plus the four 1x1 convs, O(N C C').

    .. note::
        On CPU the fused (flash) SDPA *backward* is slower than the math path: with torch 2.13
        on 2 threads at 97x97, ``C' = 256``, batch 1, it took about 22 s against 7.7 s for the
        math backend, which in exchange keeps the 338 MiB affinity per image. To trade memory
        for speed, run training under
        ``torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)``.

    In train mode a ``BatchNorm2d`` output norm needs more than one value per channel, i.e.
    ``B * H * W >= 2``.

    Norms and activations: ``norm_layer`` builds the output norm, the block's only norm. The
    block has no activation layer (the ReLU of the ``concatenation`` pairwise function is part
    of its definition); ``act_layer`` is accepted, so that one model-wide choice can be handed
    to every GA layer, but replaces nothing.

    Args:
        channels: input and output channels ``C``.
        reduction: ``C' = C // reduction`` (must be ``>= 1``).
        mode: one of ``"embedded_gaussian"``, ``"gaussian"``, ``"dot_product"``,
            ``"concatenation"``.
        use_scale: scale the softmax logits by ``1/sqrt(d)``.
        sub_sample: 2x2 max-pool the keys and values (``N_k ~ N / 4``).
        zero_init: zero-initialise the output norm weight (identity block at init).
        norm_layer: factory for the output norm, called as ``norm_layer(C)``; ``None`` for no
            norm (``W_z`` then has a bias).
        act_layer: accepted for a uniform GA signature; the block has no activation layer.
        chunk_elements: ``concatenation`` mode only: the most affinity values held at once.

    Shape:
        - Input: :math:`(B, C, H, W)`
        - Output: :math:`(B, C, H, W)`

    Example:
        >>> layer = NonLocal2d(64)
        >>> layer(torch.randn(2, 64, 9, 7)).shape
        torch.Size([2, 64, 9, 7])
    """

    # (conv, norm) applied as norm(conv(y)) in forward: gald.fuse folds them
    _fuse_pairs = (("conv_out", "norm"),)

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 2,
        mode: str = "embedded_gaussian",
        use_scale: bool = True,
        sub_sample: bool = False,
        zero_init: bool = True,
        norm_layer: LayerFactory | None = nn.BatchNorm2d,
        act_layer: LayerFactory | None = None,
        chunk_elements: int = 1 << 22,
    ) -> None:
        super().__init__()
        channels = self.channels = check_positive_int(channels, "channels")
        self.reduction = check_positive_int(reduction, "reduction")
        inter_channels = reduced_width(channels, self.reduction)
        check_choice(mode, "mode", MODES)
        self.inter_channels = inter_channels
        self.mode = mode
        self.use_scale = check_bool(use_scale, "use_scale")
        self.sub_sample = check_bool(sub_sample, "sub_sample")
        self.zero_init = check_bool(zero_init, "zero_init")
        chunk_elements = self.chunk_elements = check_positive_int(chunk_elements, "chunk_elements")
        check_ignored_factories(norm_layer=norm_layer, act_layer=act_layer)
        inter = self.inter_channels

        self.g = nn.Conv2d(channels, inter, 1)
        self.theta: nn.Conv2d | None = None
        self.phi: nn.Conv2d | None = None
        if mode != "gaussian":
            self.theta = nn.Conv2d(channels, inter, 1)
            self.phi = nn.Conv2d(channels, inter, 1)
        self.concat_project: nn.Conv2d | None = None
        if mode == "concatenation":
            self.concat_project = nn.Conv2d(2 * inter, 1, 1, bias=False)
        self.pool: nn.MaxPool2d | None = (
            nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True) if self.sub_sample else None
        )
        self.conv_out = nn.Conv2d(inter, channels, 1, bias=norm_layer is None)
        self.norm: nn.Module = (
            make_norm(norm_layer, channels, self) if norm_layer is not None else nn.Identity()
        )
        if self.zero_init:
            self._zero_output()

    def _zero_output(self) -> None:
        weight = getattr(self.norm, "weight", None)
        if isinstance(weight, torch.Tensor):
            nn.init.zeros_(weight)
        else:
            nn.init.zeros_(self.conv_out.weight)
            if self.conv_out.bias is not None:
                nn.init.zeros_(self.conv_out.bias)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, reduction={self.reduction}, "
            f"inter_channels={self.inter_channels}, mode={self.mode!r}, "
            f"use_scale={self.use_scale}, sub_sample={self.sub_sample}, "
            f"zero_init={self.zero_init}"
            + (f", chunk_elements={self.chunk_elements}" if self.mode == "concatenation" else "")
        )

    def _keys(self, t: torch.Tensor) -> torch.Tensor:
        return self.pool(t) if self.pool is not None else t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature(x, self.channels, who=type(self).__name__)
        h = x.shape[-2]
        inter = self.inter_channels
        value = self._keys(self.g(x))  # (B, C', hk, wk)
        nk = value.shape[-2] * value.shape[-1]
        v = _tokens(value)  # (B, Nk, C')
        if self.mode == "gaussian":
            q_map, k_map = x, self._keys(x)
        else:
            assert self.theta is not None
            assert self.phi is not None
            q_map, k_map = self.theta(x), self._keys(self.phi(x))
        d = q_map.shape[1]
        q = _tokens(q_map)  # (B, N, d)
        k = _tokens(k_map)  # (B, Nk, d)

        with autocast_off(x.device.type):
            if self.mode in ("embedded_gaussian", "gaussian"):
                scale = 1.0 / math.sqrt(d) if self.use_scale else 1.0
                # The fused CPU kernel needs values as wide as queries: pad g with zero
                # channels in gaussian mode (d = C > C') and drop them after.
                v_in = F.pad(v, (0, d - inter)) if d > inter else v
                y = F.scaled_dot_product_attention(
                    q.unsqueeze(1), k.unsqueeze(1), v_in.unsqueeze(1), scale=scale
                ).squeeze(1)[..., :inter]
            elif self.mode == "dot_product":
                y = torch.matmul(q, torch.matmul(k.transpose(1, 2), v)) / nk
            else:
                y = self._concatenation(q, k, v) / nk
        y = rearrange(y.to(x.dtype), "b (h w) d -> b d h w", h=h)
        return x + self.norm(self.conv_out(y))

    def _concatenation(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # w^T [theta_i; phi_j] = w_theta^T theta_i + w_phi^T phi_j: two scalars per position.
        assert self.concat_project is not None
        weight = self.concat_project.weight.reshape(2, self.inter_channels, 1).to(q.dtype)
        a = torch.matmul(q, weight[0])  # (B, N, 1)
        kb = torch.matmul(k, weight[1]).transpose(1, 2)  # (B, 1, Nk)
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            # Tracers (torch.compile, torch.export, ONNX) get one block: a Python loop over
            # shape-dependent chunks would bake the traced size into the graph.
            return _concat_rows(a, kb, v)
        b, n, nk = q.shape[0], q.shape[1], k.shape[1]
        rows = max(1, self.chunk_elements // max(1, b * nk))
        recompute = torch.is_grad_enabled() and (
            a.requires_grad or kb.requires_grad or v.requires_grad
        )
        blocks = []
        for start in range(0, n, rows):
            a_block = a[:, start : start + rows]
            if recompute:
                out = checkpoint(_concat_rows, a_block, kb, v, use_reentrant=False)
                assert isinstance(out, torch.Tensor)
                blocks.append(out)
            else:
                blocks.append(_concat_rows(a_block, kb, v))
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
