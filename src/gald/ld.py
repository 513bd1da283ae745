"""Local Distribution (LD), the per-channel, per-position gate of GALD.

Reference: X. Li et al., "Global Aggregation then Local Distribution in Fully Convolutional
Networks", BMVC 2019 (arXiv 1909.07229); the authors' ``LocalAttenModule`` in
github.com/lxtGH/GALD-DGCNet, restated here from its documented semantics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._amp import autocast_off, compute_dtype
from ._checkpoint import checkpoint_once
from ._layers import (
    LayerFactory,
    conv_out_size,
    depthwise_stage,
    refuses_single_value,
    strided_min_size,
)
from ._validate import (
    PADDING_REMEDY,
    check_bool,
    check_choice,
    check_factory,
    check_feature,
    check_float,
    check_positive_int,
)
from .ops import ld_modulate

__all__ = ["IMPLS", "LocalDistribution", "strided_min_size"]

IMPLS = ("auto", "triton", "torch")
"""The kernels a :class:`LocalDistribution` (and :class:`~gald.GALD`) may be told to use."""


_NON_NEGATIVE = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)
"""Activations whose output is never negative (the gate of an LD ending in one is >= offset+0.5)."""


class LocalDistribution(nn.Module):
    r"""Local Distribution: ``x * (offset + M)`` with a per-channel, per-position mask ``M``.

    Reference: X. Li et al., "Global Aggregation then Local Distribution in Fully Convolutional
    Networks", BMVC 2019 (arXiv 1909.07229); the authors' ``LocalAttenModule`` in
    github.com/lxtGH/GALD-DGCNet, restated here from its documented semantics.

    The mask branch is ``num_stages`` x [depthwise stride-2 conv -> norm -> act]; its
    low-resolution output (the *logits*) is upsampled bilinearly (``align_corners=True``) to the
    input size and passed through a sigmoid: ``M = sigmoid(Up(branch(x)))``.

    .. math::
        \mathrm{out} = x \odot \big(\mathrm{offset} + \sigma(\mathrm{Up}(\mathrm{branch}(x)))\big)

    ``forward`` calls ``self.branch`` as an ordinary module (hooks, ``torch.func``, DDP and
    ``torch.compile`` see plain modules), then the fused op :func:`gald.ops.ld_modulate`, which
    keeps only ``x`` and the logits for backward instead of the full-resolution mask. With
    :meth:`set_grad_checkpointing` the branch runs under ``torch.utils.checkpoint`` and its
    activations are recomputed in backward. :func:`gald.fuse` folds the branch's BatchNorms into
    the convs for inference. The output has the memory format of the input.

    ``offset=1`` is the authors' ``LocalAttenModule`` (``x + x * M``); ``offset=0`` is a pure gate.

    .. note::
        With ``final_act=True`` (the default, as in the authors' code) a ReLU precedes the
        sigmoid, so ``M`` lies in ``[0.5, 1)``, not ``(0, 1)``. ``final_act=False`` (or a final
        activation that can go negative, such as GELU) frees the full range; see
        :attr:`gate_range`.

    Complexity: time O(B C H W (k^2 / 3 + h')), with ``h' ~ H/8`` the logits side; autograd
    keeps ``x``, the branch activations (O(B C H W / 4), none with checkpointing) and the logits.

    Args:
        channels: number of channels ``C`` of the input.
        num_stages: depthwise stride-2 stages in the mask branch (the authors use 3).
        kernel_size: kernel of every depthwise conv.
        padding: padding of every depthwise conv. ``0`` reproduces the authors' code exactly and
            needs ``H, W >= 15`` for 3 stages of ``k=3``; ``1`` accepts every ``H, W >= 1``; at
            most ``kernel_size // 2``. A norm that cannot normalise a 1x1 map (an instance
            norm, a GroupNorm with one channel per group) raises these to 23 and 9
            (:attr:`min_size`). In training mode at batch size 1 a BatchNorm refuses a
            stage whose map is 1x1: the input then needs a side of at least 9 (``padding=1``)
            or 23 (``padding=0``), and a ``ValueError`` says so (also under ``torch.compile``,
            where ``fullgraph=True`` reports it as an "Observed exception").
        final_act: apply ``act_layer`` after the last stage too.
        offset: the constant added to the mask.
        norm_layer: normalisation factory called as ``norm_layer(C)``.
        act_layer: activation factory called as ``act_layer()``.
        impl: kernel of the modulation: ``"auto"`` (Triton on CUDA when available, else plain
            PyTorch), ``"triton"`` or ``"torch"`` (to step around a misbehaving kernel); see
            :func:`gald.ops.ld_modulate`.

    Shape:
        - Input: :math:`(B, C, H, W)`
        - Output: :math:`(B, C, H, W)`
    """

    def __init__(
        self,
        channels: int,
        *,
        num_stages: int = 3,
        kernel_size: int = 3,
        padding: int = 1,
        final_act: bool = True,
        offset: float = 1.0,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        channels = self.channels = check_positive_int(channels, "channels")
        num_stages = self.num_stages = check_positive_int(
            num_stages, "num_stages", maximum=30, why="each stage halves the map"
        )
        kernel_size = self.kernel_size = check_positive_int(kernel_size, "kernel_size")
        padding = self.padding = check_positive_int(padding, "padding", minimum=0)
        if padding > kernel_size // 2:
            raise ValueError(
                f"padding must be at most kernel_size // 2 = {kernel_size // 2}: a stride-2 conv "
                f"padded more does not halve the map (the mask would be estimated at a finer "
                f"scale than the stages say), got padding={padding}"
            )
        offset = self.offset = check_float(offset, "offset")
        self.final_act = check_bool(final_act, "final_act")
        check_factory(norm_layer, "norm_layer")
        check_factory(act_layer, "act_layer")
        self.impl = check_choice(impl, "impl", IMPLS)
        self.grad_checkpointing = False
        self.branch = nn.Sequential(
            *(
                depthwise_stage(
                    channels,
                    kernel_size=kernel_size,
                    padding=padding,
                    norm_layer=norm_layer,
                    act_layer=act_layer if (i < num_stages - 1 or final_act) else None,
                    where=f"the LD's {channels}-channel mask stage {i}",
                )
                for i in range(num_stages)
            )
        )
        # a norm that cannot normalise a 1x1 map (instance norm, one channel per group) needs
        # every stage's output to be at least 2 on a side
        single = next(filter(None, map(refuses_single_value, self.branch)), None)
        start = 1 if single is None else 2
        self.min_size = strided_min_size(num_stages, kernel_size, padding, start=start)
        # what to suggest for a too-small input: padding=1 only where it accepts any size
        self._small_input_remedy: str | None = (
            PADDING_REMEDY
            if self.padding == 0 and strided_min_size(num_stages, kernel_size, 1, start=start) == 1
            else None
        )
        if single is not None:
            self._small_input_remedy = (
                f"its {type(single).__name__} cannot normalise the 1x1 map a mask stage would "
                "give a smaller input"
            )

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_stages={self.num_stages}, "
            f"kernel_size={self.kernel_size}, padding={self.padding}, "
            f"final_act={self.final_act}, offset={self.offset}, impl={self.impl!r}"
        )

    @property
    def gate_range(self) -> tuple[float, float, bool]:
        """``(low, high, low_included)``: the values the gate ``offset + M`` can take.

        ``M = sigmoid(logits)`` lies in ``(0, 1)``; when the last stage ends with an activation
        whose output is never negative (ReLU, ReLU6, Sigmoid, Hardsigmoid, Softplus) the logits
        are ``>= 0`` and ``M`` lies in ``[0.5, 1)``. Any other final activation (GELU, SiLU,
        LeakyReLU, ...) or ``final_act=False`` leaves the full ``(0, 1)``.
        """
        last = list(self.branch.modules())[-1]  # the last stage's act (or its norm)
        if self.final_act and isinstance(last, _NON_NEGATIVE):
            return self.offset + 0.5, self.offset + 1.0, True
        return self.offset, self.offset + 1.0, False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the branch in backward instead of keeping its activations (timm's switch).

        Saves the branch's activations, about two thirds of the input's size per LD in training
        (each stage keeps its norm's input and its activation's output, at 1/4, 1/16, ... of the
        input's positions), at the cost of running the branch twice. The branch then runs under
        ``torch.utils.checkpoint`` (non-reentrant), which restores the RNG state, so stochastic
        layers see the same randomness both times, and the recomputation leaves the branch's
        buffers untouched, so BatchNorm running statistics are updated once per step, as without
        checkpointing.

        Under ``torch.compile`` use an AOT backend (the default inductor, or ``aot_eager``):
        with ``backend="eager"`` the backward of a checkpointed branch with BatchNorm in
        training mode fails (``... is at version 2; expected version 1``), a PyTorch limitation
        shared by any checkpointed BatchNorm. ``torch.func`` transforms (``grad``, ``vjp``,
        ``jacrev``) refuse checkpointed code (``don't yet support saved tensor hooks``), a
        PyTorch limitation: switch checkpointing off for them.
        """
        enable = check_bool(enable, "enable")
        self.grad_checkpointing = enable

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Low-resolution mask logits ``branch(x)``, shape (B, C, h, w), in the dtype of ``x``."""
        check_feature(
            x,
            self.channels,
            min_hw=self.min_size,
            who=type(self).__name__,
            remedy=self._small_input_remedy,
        )
        if self.training and x.shape[0] == 1:
            self._check_single_sample(x.shape[-2:])
        if self.grad_checkpointing and torch.is_grad_enabled():
            logits = checkpoint_once(self.branch, x)
        else:
            logits = self.branch(x)
        # under autocast the branch may return a lower precision than x
        return logits if logits.dtype == x.dtype else logits.to(x.dtype)

    def _check_single_sample(self, hw: torch.Size) -> None:
        """At batch 1 in training mode a BatchNorm after a stage whose map is 1x1 sees one value
        per channel, which it refuses: say so here, naming the stage and the remedies."""
        h, w = hw
        for i, stage in enumerate(self.branch):
            h = conv_out_size(h, self.kernel_size, 2, self.padding)
            w = conv_out_size(w, self.kernel_size, 2, self.padding)
            norm = next(
                (
                    m
                    for m in stage.modules()
                    if isinstance(m, nn.modules.batchnorm._BatchNorm)
                    and not isinstance(m, nn.SyncBatchNorm)
                ),
                None,
            )
            if norm is not None and h * w == 1:
                # every stage's map at least 2 wide (or high): then none is 1x1
                side = strided_min_size(self.num_stages, self.kernel_size, self.padding, start=2)
                raise ValueError(
                    f"{type(self).__name__}: in training mode at batch size 1, mask stage {i} "
                    f"sees a 1x1 map for a {hw[0]}x{hw[1]} input, and its "
                    f"{type(norm).__name__} cannot normalise a single value per channel. Train "
                    f"with a batch of at least 2, SyncBatchNorm across GPUs, or an input side of "
                    f"at least {side}"
                )

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """The full-resolution mask ``sigmoid(Up(branch(x)))``, shape (B, C, H, W).

        Computed as the fused op computes it: in float32 for float16 and bfloat16 inputs (and
        returned in float32 then), in the input's dtype otherwise."""
        logits = self.logits(x).to(compute_dtype(x.dtype))
        with autocast_off(x.device.type):
            up = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)
            return torch.sigmoid(up)

    def forward(self, x: torch.Tensor, blend: torch.Tensor | None = None) -> torch.Tensor:
        """``x * (offset + M(x))``; with ``blend`` (a tensor broadcastable to ``x``, e.g. a
        per-channel ``(1, C, 1, 1)`` weight), ``x + blend * (x * (offset + M(x)) - x)``,
        computed as ``x + (blend * x) * (offset - 1 + M(x))`` so that ``blend = 0`` gives ``x``
        exactly, also where ``x * (offset + M)`` would overflow in half precision (the blend
        :class:`~gald.GALD` uses for ``init="identity"``; autograd then keeps ``blend * x``,
        one more full-size tensor, besides ``x`` and the logits)."""
        logits = self.logits(x)
        if blend is not None:
            if not isinstance(blend, torch.Tensor):
                raise TypeError(f"blend must be a tensor or None, got {type(blend).__name__}")
            if blend.dim() > x.dim() or any(
                b != 1 and b != s for b, s in zip(reversed(blend.shape), reversed(x.shape))
            ):
                raise ValueError(
                    f"blend must broadcast to x's shape {tuple(x.shape)} without enlarging it, "
                    f"got {tuple(blend.shape)}"
                )
        if blend is None:
            return ld_modulate(x, logits, self.offset, impl=self.impl)
        scaled = blend.to(x.dtype) * x
        return x + ld_modulate(scaled, logits, self.offset - 1.0, impl=self.impl)
