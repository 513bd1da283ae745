"""EMA, the expectation-maximization attention unit of EMANet.

Reference: X. Li et al., "Expectation-Maximization Attention Networks for Semantic
Segmentation", ICCV 2019 (arXiv 1907.13426); the authors' ``EMAU`` (XiaLiPKU/EMANet) and the
moving average of the bases from their ``train.py``, restated here from their documented
semantics.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .._amp import autocast_off, compute_dtype
from .._layers import LayerFactory, make_act, make_norm
from .._validate import check_bool, check_factory, check_feature, check_float, check_positive_int
from ..registry import register_ga

_EPS = 1e-6  # the authors' epsilon, both in the responsibilities and in the L2 norm


def _l2norm(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t / (_EPS + t.norm(dim=dim, keepdim=True))


def _em_step(flat: torch.Tensor, mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One E-step and one M-step: ``flat`` (B, C, N), ``mu`` (B, C, K) -> ``z`` (B, N, K), ``mu``."""
    z = torch.softmax(torch.matmul(flat.transpose(1, 2), mu), dim=2)
    resp = z / (_EPS + z.sum(dim=1, keepdim=True))  # responsibilities normalised over N
    return z, _l2norm(torch.matmul(flat, resp), dim=1)


@register_ga("ema")
class EMA(nn.Module):
    r"""Expectation-maximization attention: reconstruct the feature from ``K`` learned bases.

    Reference: X. Li et al., "Expectation-Maximization Attention Networks for Semantic
    Segmentation", ICCV 2019 (arXiv 1907.13426); the authors' ``EMAU`` (XiaLiPKU/EMANet) and the
    moving average of the bases from their ``train.py``, restated here from their documented
    semantics.

    With :math:`X = W_1 x + b_1 \in \mathbb{R}^{C \times N}` (1x1 conv) and bases
    :math:`\mu \in \mathbb{R}^{C \times K}` (columns L2-normalised), ``T`` EM iterations

    .. math::
        Z = \mathrm{softmax}_k(X^\top \mu), \qquad
        \mu = \mathrm{L2norm}_C\big(X Z\, \mathrm{diag}(\epsilon + \textstyle\sum_n Z_{nk})^{-1}\big),

    then

    .. math::
        \mathrm{out} = \mathrm{act}\big(x + \mathrm{norm}(W_2\, \mathrm{act}(\mu Z^\top))\big),

    with ``Z`` from the last E-step and ``mu`` from the last M-step (as the authors), ``W_2`` a
    1x1 conv without bias and :math:`\epsilon = 10^{-6}`. The EM iterations run in fp32 under
    autocast.

    *Bases.* ``bases`` is a (1, C, K) buffer, drawn from N(0, 2/K) and L2-normalised over C.
    In train mode (and for a non-empty batch), each forward updates it in place under
    ``no_grad``: :math:`\mu_{buf} \leftarrow \mathrm{L2norm}(m\, \mu_{buf} + (1 - m)\,
    \mathrm{mean}_B(\mu))`, the authors' moving average (which they run in ``train.py``) with
    ``m = momentum``; the final L2 norm (not in the authors' code) keeps every column on the unit
    sphere. Nothing is communicated across processes inside ``forward``: under data parallelism
    (with ``broadcast_buffers=False``) each rank drifts on its own data until you call
    :meth:`sync_bases`. Because training
    mutates the buffer, the outputs of one batch depend on earlier batches and on the other
    samples of the batch; only eval mode is batch-independent.

    *Gradients (a quirk of the authors' code).* With ``em_grad=False`` (the default, as the
    authors) the EM loop runs under ``no_grad``, so ``mu`` and ``Z`` are constants for autograd:
    the reconstruction is detached from the input and **the first conv (``conv1``) receives no
    gradient**; only ``conv2``, the norm and the identity path train (under
    ``DistributedDataParallel`` pass ``find_unused_parameters=True``). ``em_grad=True``
    backpropagates through all ``T`` iterations, so ``conv1`` trains too (memory O(T N K) for
    backward).

    Submodule names follow the authors' code (``conv1``, ``conv2.0``, ``conv2.1``); their buffer
    ``mu`` is called ``bases`` here.

    Train mode needs more than one value per channel in the BatchNorm: a batch of one works for
    ``H * W > 1``; a 1x1 map needs batch >= 2.

    Complexity (``N = H * W``): time O(N C^2 + T N C K), memory O(N C + N K).

    Args:
        channels: input and output channels ``C``.
        num_bases: number of bases ``K``.
        iterations: EM iterations ``T`` (>= 1).
        momentum: weight ``m`` of the old bases in the moving average, in [0, 1].
        em_grad: backpropagate through the EM iterations.
        norm_layer: normalisation factory called as ``norm_layer(C)``.
        act_layer: activation factory called as ``act_layer()``.

    Shape:
        - Input: :math:`(B, C, H, W)`
        - Output: :math:`(B, C, H, W)`

    Example:
        >>> layer = EMA(64, num_bases=16)
        >>> layer.eval()(torch.randn(2, 64, 9, 7)).shape
        torch.Size([2, 64, 9, 7])
    """

    bases: torch.Tensor

    def __init__(
        self,
        channels: int,
        *,
        num_bases: int = 64,
        iterations: int = 3,
        momentum: float = 0.9,
        em_grad: bool = False,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        channels = self.channels = check_positive_int(channels, "channels")
        num_bases = self.num_bases = check_positive_int(num_bases, "num_bases")
        iterations = self.iterations = check_positive_int(iterations, "iterations")
        momentum = check_float(momentum, "momentum")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.momentum = float(momentum)
        em_grad = check_bool(em_grad, "em_grad")
        self.em_grad = em_grad
        check_factory(norm_layer, "norm_layer")
        check_factory(act_layer, "act_layer")

        self.register_buffer("bases", torch.empty(1, channels, num_bases))
        self.reset_parameters()
        self.conv1 = nn.Conv2d(channels, channels, 1)
        self.conv2 = nn.Sequential(
            nn.Conv2d(channels, channels, 1, bias=False),
            make_norm(norm_layer, channels, self),
        )
        self.recon_act = make_act(act_layer, self)
        self.out_act = make_act(act_layer, self)
        for conv in (self.conv1, self.conv2[0]):
            assert isinstance(conv, nn.Conv2d)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    def reset_parameters(self) -> None:
        """Draw the bases afresh (normal, scaled by sqrt(2 / K), then unit columns), as at
        construction; the convs and norms have their own ``reset_parameters``."""
        k = self.bases.shape[-1]
        with torch.no_grad():
            draw = torch.randn(self.bases.shape, device=self.bases.device, dtype=self.bases.dtype)
            self.bases.copy_(F.normalize(draw * math.sqrt(2.0 / k), dim=1))

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_bases={self.num_bases}, "
            f"iterations={self.iterations}, momentum={self.momentum}, em_grad={self.em_grad}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature(x, self.channels, who=type(self).__name__)
        feats = self.conv1(x)
        b, c, h, w = feats.shape
        dtype = compute_dtype(feats.dtype)
        grad_ctx = contextlib.nullcontext() if self.em_grad else torch.no_grad()
        with autocast_off(x.device.type):
            flat = feats.reshape(b, c, h * w).to(dtype)  # (B, C, N)
            # a copy: the moving-average update below writes into the buffer in place, and
            # autograd (em_grad=True) must keep the bases this forward used
            mu = self.bases.to(dtype=dtype, copy=True).expand(b, c, self.num_bases)  # (B, C, K)
            with grad_ctx:
                z, mu = _em_step(flat, mu)  # z (B, N, K), mu (B, C, K)
                for _ in range(self.iterations - 1):
                    z, mu = _em_step(flat, mu)
            recon = torch.matmul(mu, z.transpose(1, 2))  # (B, C, N)
        if self.training and b > 0:
            self._update_bases(mu)
        recon = recon.to(feats.dtype).reshape(b, c, h, w)
        return self.out_act(x + self.conv2(self.recon_act(recon)))

    @torch.no_grad()
    def _update_bases(self, mu: torch.Tensor) -> None:
        batch_mean = mu.detach().mean(dim=0, keepdim=True).to(self.bases.dtype)
        mixed = self.momentum * self.bases + (1.0 - self.momentum) * batch_mean
        # exact normalisation (no additive epsilon), so unit columns do not shrink step by step
        self.bases.copy_(F.normalize(mixed, dim=1))

    @torch.no_grad()
    def sync_bases(self, process_group: Any = None) -> None:
        """Average ``bases`` over the ranks of ``process_group`` (then re-normalise).

        Call it yourself, e.g. after each optimiser step or every few steps; ``forward`` never
        communicates. A no-op when ``torch.distributed`` is unavailable or not initialised.
        Note that ``DistributedDataParallel`` with its default ``broadcast_buffers=True`` already
        overwrites every rank's buffers with rank 0's at each forward (so only rank 0's data
        shapes the bases); use ``broadcast_buffers=False`` plus this method to average instead.

        Args:
            process_group: the group to average over; ``None`` is the default (world) group.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        dist.all_reduce(self.bases, op=dist.ReduceOp.SUM, group=process_group)
        self.bases.copy_(F.normalize(self.bases, dim=1))  # the mean's direction; norm 1
