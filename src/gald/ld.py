"""Local Distribution (LD), the per-channel, per-position gate of GALD.

Reference: X. Li et al., "Global Aggregation then Local Distribution in Fully Convolutional
Networks", BMVC 2019 (arXiv 1909.07229); the authors' ``LocalAttenModule`` in
github.com/lxtGH/GALD-DGCNet, restated here from its documented semantics.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._layers import LayerFactory, depthwise_stage, strided_min_size
from ._validate import check_feature, check_positive_int
from .ops import ld_modulate
from .ops._depthwise_cl import depthwise_conv_cl, is_depthwise
from .ops._ld_train_cpu import ld_train_cpu
from .ops._replay import replayable, run_chain


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def eager_cpu(x: torch.Tensor) -> bool:
    """Whether the eager CPU fast paths may run on ``x``.

    They need a float32 CPU tensor (oneDNN's channels_last kernels; float64 convs are much slower
    in channels_last), no autocast (their backward replays the forward outside the autocast
    region), and no compiler, exporter or tracer at work (those get the plain modules, which
    they optimise or export themselves).
    """
    if x.device.type != "cpu" or x.dtype != torch.float32 or _autocast_on():
        return False
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return not torch.onnx.is_in_onnx_export()


def _hooked(modules: Sequence[nn.Module]) -> bool:
    """Whether any module (or any of its children) carries hooks; the fast paths call the first
    conv functionally and may run later layers twice, so hooked chains get the plain path."""
    glob = nn.modules.module
    if (
        glob._global_forward_hooks
        or glob._global_forward_pre_hooks
        or glob._global_backward_hooks
        or glob._global_backward_pre_hooks
    ):
        return True
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        for top in modules
        for m in top.modules()
    )


def _split_chain(
    x: torch.Tensor, stages: Iterable[nn.Module]
) -> tuple[nn.Conv2d, list[nn.Module]] | None:
    """(first depthwise conv, every later layer) of a chain of ``[conv, norm, act?]`` stages, or
    ``None`` when the chain was edited into another structure or ``x`` does not fit it."""
    stage_list = list(stages)
    seqs = [s for s in stage_list if isinstance(s, nn.Sequential)]
    if not stage_list or len(seqs) != len(stage_list):
        return None
    layers = [m for stage in seqs for m in stage]
    if not layers or _hooked(stage_list):
        return None
    conv = layers[0]
    if not isinstance(conv, nn.Conv2d) or not is_depthwise(conv) or x.shape[1] != conv.in_channels:
        return None
    return conv, layers[1:]


def run_depthwise_chain(x: torch.Tensor, stages: Iterable[nn.Module]) -> torch.Tensor:
    """``stages(x)`` for a chain of ``[depthwise conv, norm, act?]`` stages, fast on CPU.

    On the eager CPU path the chain runs in channels_last (an NCHW ``x`` is converted slab by
    slab inside the first conv, see :mod:`gald.ops._depthwise_cl`) and the output is
    channels_last. Any other case, or a chain edited into another structure, runs the modules
    as they are.
    """
    split = _split_chain(x, stages) if eager_cpu(x) else None
    if split is None:
        for stage in stages:
            x = stage(x)
        return x
    z = depthwise_conv_cl(x, split[0])
    if not torch.is_grad_enabled():
        return run_chain(split[1], z, owns_input=True)
    for m in split[1]:
        z = m(z)
    return z


class LocalDistribution(nn.Module):
    r"""Local Distribution: ``x * (offset + M)`` with a per-channel, per-position mask ``M``.

    The mask branch is ``num_stages`` x [depthwise stride-2 conv -> norm -> act]; its low-resolution
    output (the *logits*) is upsampled bilinearly (``align_corners=True``) to the input size and
    passed through a sigmoid: ``M = sigmoid(Up(branch(x)))``. The modulation runs through the fused
    op :func:`gald.ops.ld_modulate`, which never keeps a full-resolution mask for backward.

    .. math::
        \mathrm{out} = x \odot \big(\mathrm{offset} + \sigma(\mathrm{Up}(\mathrm{branch}(x)))\big)

    On CPU (eager, float32) the branch runs in channels_last whatever the input's memory format,
    and in training the whole LD is one autograd node that keeps only ``x``, the branch's first
    activation and the logits for backward (the later activations are recomputed;
    :mod:`gald.ops._ld_train_cpu`). The output has the memory format of the input.
    :func:`gald.fuse` folds the branch's BatchNorms into the convs for inference.

    Complexity: time O(B C H W (k^2 / 4 + h)), with ``h ~ H/8`` the logits height;
    autograd keeps ``x`` plus O(B C H W / 4).

    ``offset=1`` is the authors' ``LocalAttenModule`` (``x + x * M``); ``offset=0`` is a pure gate.

    .. note::
        With ``final_act=True`` (the default, as in the authors' code) a ReLU precedes the
        sigmoid, so ``M`` lies in ``[0.5, 1)``, not ``(0, 1)``. ``final_act=False`` frees the full
        range.

    Args:
        channels: number of channels ``C`` of the input.
        num_stages: depthwise stride-2 stages in the mask branch (the authors use 3).
        kernel_size: kernel of every depthwise conv.
        padding: padding of every depthwise conv. ``0`` reproduces the authors' code exactly and
            needs ``H, W >= 15`` for 3 stages of ``k=3``; ``1`` accepts every ``H, W >= 1``.
        final_act: apply ``act_layer`` after the last stage too.
        offset: the constant added to the mask.
        norm_layer: normalisation factory called as ``norm_layer(C)``.
        act_layer: activation factory called as ``act_layer()``.

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
    ) -> None:
        super().__init__()
        self.channels = check_positive_int(channels, "channels")
        self.num_stages = check_positive_int(num_stages, "num_stages")
        self.kernel_size = check_positive_int(kernel_size, "kernel_size")
        self.padding = check_positive_int(padding, "padding", minimum=0)
        if not isinstance(offset, (int, float)) or isinstance(offset, bool):
            raise TypeError(f"offset must be a float, got {type(offset).__name__}")
        self.offset = float(offset)
        self.final_act = bool(final_act)
        self.min_size = strided_min_size(num_stages, kernel_size, padding)
        self.branch = nn.Sequential(
            *(
                depthwise_stage(
                    channels,
                    kernel_size=kernel_size,
                    padding=padding,
                    norm_layer=norm_layer,
                    act_layer=act_layer if (i < num_stages - 1 or final_act) else None,
                )
                for i in range(num_stages)
            )
        )

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_stages={self.num_stages}, "
            f"kernel_size={self.kernel_size}, padding={self.padding}, "
            f"final_act={self.final_act}, offset={self.offset}"
        )

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        check_feature(x, self.channels, min_hw=self.min_size, who=type(self).__name__)
        return run_depthwise_chain(x, self.branch)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Low-resolution mask logits ``branch(x)``, shape (B, C, h, w)."""
        return self._branch(x)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """The full-resolution mask ``sigmoid(Up(branch(x)))``, shape (B, C, H, W)."""
        logits = self._branch(x)
        return torch.sigmoid(
            F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature(x, self.channels, min_hw=self.min_size, who=type(self).__name__)
        if torch.is_grad_enabled() and eager_cpu(x):
            split = _split_chain(x, self.branch)
            if split is not None and replayable(split[1]):
                # eager CPU training: the whole LD as one autograd node (same kernels as
                # ld_modulate; see gald.ops._ld_train_cpu)
                return ld_train_cpu(x, split[0], split[1], self.offset)
        logits = run_depthwise_chain(x, self.branch)
        # under autocast the branch may return a lower precision than x
        if logits.dtype != x.dtype:
            logits = logits.to(x.dtype)
        return ld_modulate(x, logits, self.offset)
