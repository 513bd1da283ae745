r"""BatchNorm folding for inference: ``gald.fuse(module)``.

Every eval-mode BatchNorm that directly follows a depthwise conv of a
:class:`~gald.LocalDistribution` branch or of the :class:`~gald.GALD` ``down`` stage is folded
into that conv and replaced by ``nn.Identity``:

.. math::
    W' = W \cdot \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}, \qquad
    b' = (b - \mu) \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}} + \beta

The fold is computed in float64 and cast back to the conv's dtype, so the fused module matches
the unfused one to rounding. BatchNorms in training mode, or without running statistics, are
left untouched (they do not compute a fixed affine map). The fused module is meant for
inference: putting it back in training mode does not bring the BatchNorms back.

Time O(C k^2) per folded pair, once.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .block import GALD
from .ld import LocalDistribution

__all__ = ["fuse", "fuse_conv_bn"]


def fuse_conv_bn(conv: nn.Conv2d, bn: _BatchNorm) -> None:
    """Fold the eval-mode ``bn`` (applied right after ``conv``) into ``conv``, in place.

    Raises:
        TypeError: ``conv`` is not an ``nn.Conv2d`` or ``bn`` not a BatchNorm.
        ValueError: ``bn`` is in training mode, has no running statistics, or its number of
            features differs from ``conv.out_channels``.
    """
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
    if not isinstance(bn, _BatchNorm):
        raise TypeError(f"bn must be a BatchNorm module, got {type(bn).__name__}")
    if bn.training or bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            "bn must be in eval mode with running statistics to be folded, got "
            f"training={bn.training}, track_running_stats={bn.track_running_stats}"
        )
    if bn.num_features != conv.out_channels:
        raise ValueError(
            f"bn has {bn.num_features} features, expected conv.out_channels={conv.out_channels}"
        )
    with torch.no_grad():
        w = conv.weight.detach().to(torch.float64)
        scale = torch.rsqrt(bn.running_var.to(torch.float64) + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.detach().to(torch.float64)
        shift = -bn.running_mean.to(torch.float64) * scale
        if bn.bias is not None:
            shift = shift + bn.bias.detach().to(torch.float64)
        if conv.bias is not None:
            shift = shift + conv.bias.detach().to(torch.float64) * scale
        new_w = (w * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype)
        conv.weight.copy_(new_w)
        new_b = shift.to(device=conv.weight.device, dtype=conv.weight.dtype)
        if conv.bias is None:
            conv.bias = nn.Parameter(new_b, requires_grad=conv.weight.requires_grad)
        else:
            conv.bias.copy_(new_b)


def _fold_stage(stage: nn.Module) -> int:
    """Fold ``stage[1]`` into ``stage[0]`` for a ``[conv, eval BatchNorm, ...]`` stage."""
    if not isinstance(stage, nn.Sequential) or len(stage) < 2:
        return 0
    conv, bn = stage[0], stage[1]
    if not (isinstance(conv, nn.Conv2d) and conv.groups == conv.in_channels == conv.out_channels):
        return 0
    if not isinstance(bn, _BatchNorm) or bn.training or bn.running_mean is None:
        return 0
    fuse_conv_bn(conv, bn)
    stage[1] = nn.Identity()
    return 1


def fuse(module: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fold the BatchNorms of every LD branch and GALD ``down`` stage into their convs.

    Args:
        module: any module; every :class:`~gald.LocalDistribution` and :class:`~gald.GALD`
            inside it (itself included) is fused. Put it in eval mode first: training-mode
            BatchNorms are not folded.
        inplace: fold in ``module`` itself instead of a deep copy.

    Returns:
        The fused module (a copy unless ``inplace``). Its outputs equal the unfused module's in
        eval mode to rounding.

    Shape:
        Unchanged: the fused module takes and returns what ``module`` does.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    target = module if inplace else copy.deepcopy(module)
    for sub in list(target.modules()):
        if isinstance(sub, LocalDistribution):
            for stage in sub.branch:
                _fold_stage(stage)
        elif isinstance(sub, GALD) and sub.down is not None:
            _fold_stage(sub.down)
    return target
