r"""BatchNorm folding for inference: ``gald.fuse(module)``.

Every eval-mode BatchNorm that directly follows a conv inside an ``nn.Sequential`` (the
:class:`~gald.LocalDistribution` branch, the :class:`~gald.GALD` ``down`` stage, the heads and
most context modules), or that a module declares as applied straight to a conv's output in its
forward code (the ``_fuse_pairs`` protocol below), is folded into that conv and replaced by
``nn.Identity``:

.. math::
    W' = W \cdot \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}, \qquad
    b' = (b - \mu) \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}} + \beta

The fold is PyTorch's ``torch.nn.utils.fuse_conv_bn_weights``, computed on float64 copies and
cast back to the conv's dtype, so the fused module matches the unfused one to rounding.
BatchNorms without running statistics are left untouched (they do not compute a fixed affine
map).

The ``_fuse_pairs`` protocol (private): a module class whose forward applies a BatchNorm
attribute directly, and only, to a conv attribute's output (``self.bn(self.conv(y))``, the
conv's output used nowhere else) declares it as ``_fuse_pairs = (("conv", "bn"), ...)``, with
attribute names (the conv's may be a dotted path to the last conv of a ``Sequential``).
:func:`fuse` folds each such pair and sets the BatchNorm attribute to ``nn.Identity``, so the
forward code runs unchanged; the unfused module's state dict is not affected by the
declaration.

Time O(C k^2) per folded pair, once.
"""

from __future__ import annotations

import copy
from typing import TypeVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import fuse_conv_bn_weights, parametrize

from ._layers import has_hooks, last_module, plain_sequential
from ._validate import check_bool

M = TypeVar("M", bound=nn.Module)

__all__ = ["fuse", "fuse_conv_bn"]


_CONVS = (nn.Conv1d, nn.Conv2d)
_CONV_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward)
_CONV_INNER = (nn.Conv1d._conv_forward, nn.Conv2d._conv_forward)
_BN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)


def _unfoldable(conv: nn.Module, bn: nn.Module) -> str | None:
    """Why the pair cannot be folded although both have the right types, or ``None``.

    The fold rewrites the stored ``conv.weight`` and replaces ``bn`` by the identity, which is
    exact only when the conv's forward convolves with the stored weight as it is and the norm
    does nothing but the affine normalisation: not for a conv subclass with its own forward
    (timm's ``StdConv2d`` standardises its weight), a parametrized or pruned conv (the weight
    is recomputed in every call), a norm subclass that adds an activation (timm's
    ``BatchNormAct2d``), or a module with hooks (they would see other tensors)."""
    inner = getattr(type(conv), "_conv_forward", None)
    if type(conv).forward not in _CONV_FORWARDS or inner not in _CONV_INNER:
        return f"conv's class {type(conv).__name__} has its own forward"
    if type(bn).forward not in _BN_FORWARDS:
        return f"bn's class {type(bn).__name__} has its own forward"
    for name, m in (("conv", conv), ("bn", bn)):
        if parametrize.is_parametrized(m):
            return f"{name} is parametrized (its weight is recomputed in every call)"
        if has_hooks(m):
            return f"{name} has hooks (pruning, or a user's forward or backward hook)"
    return None


def fuse_conv_bn(conv: nn.Conv1d | nn.Conv2d, bn: _BatchNorm) -> None:
    """Fold the eval-mode ``bn`` (applied right after ``conv``) into ``conv``, in place.

    ``conv`` is an ``nn.Conv2d`` or an ``nn.Conv1d``; ``bn`` any BatchNorm with
    ``conv.out_channels`` features (a ``BatchNorm2d`` applied to a (B, C, L, 1) view of a Conv1d
    output folds as well).

    Raises:
        TypeError: ``conv`` is not an ``nn.Conv1d`` or ``nn.Conv2d``, or ``bn`` not a BatchNorm.
        ValueError: ``bn`` is in training mode, has no running statistics, or its number of
            features differs from ``conv.out_channels``; or the pair cannot be folded exactly:
            a conv or norm subclass with its own forward (timm's ``StdConv2d``,
            ``BatchNormAct2d``), a parametrized conv (``weight_norm``, ``spectral_norm``), or a
            module with forward hooks (``torch.nn.utils.prune`` uses one).
    """
    if not isinstance(conv, _CONVS):
        raise TypeError(f"conv must be an nn.Conv1d or nn.Conv2d, got {type(conv).__name__}")
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
    reason = _unfoldable(conv, bn)
    if reason is not None:
        raise ValueError(f"cannot fold bn into conv exactly: {reason}")

    def f64(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().to(torch.float64)

    with torch.no_grad():
        # PyTorch's own formula, on float64 copies: the fold rounds once, into the conv's dtype
        w64, b64 = fuse_conv_bn_weights(
            conv.weight.detach().to(torch.float64),
            f64(conv.bias),
            bn.running_mean.to(torch.float64),
            bn.running_var.to(torch.float64),
            bn.eps,
            f64(bn.weight),
            f64(bn.bias),
        )
        conv.weight.copy_(w64.to(conv.weight.dtype))
        new_b = b64.detach().to(device=conv.weight.device, dtype=conv.weight.dtype)
        if conv.bias is None:
            conv.bias = nn.Parameter(new_b, requires_grad=conv.weight.requires_grad)
        else:
            conv.bias.copy_(new_b)


def _shared_convs(module: nn.Module) -> set[int]:
    """ids of the convs that appear more than once in ``module``, or whose weight or bias is
    also another module's (tied weights): folding into one would change the other use."""
    seen: dict[int, int] = {}
    owners: dict[int, set[int]] = {}  # parameter id -> ids of the modules holding it
    convs: dict[int, nn.Module] = {}
    for _, sub in module.named_modules(remove_duplicate=False):
        for p in sub.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(sub))
        if isinstance(sub, _CONVS):
            seen[id(sub)] = seen.get(id(sub), 0) + 1
            convs[id(sub)] = sub
    shared = {k for k, n in seen.items() if n > 1}
    for k, conv in convs.items():
        if any(len(owners[id(p)]) > 1 for p in conv.parameters(recurse=False)):
            shared.add(k)
    return shared


def _try_fold(conv: object, bn: object, shared: set[int]) -> bool:
    """Fold ``bn`` into ``conv`` when ``bn`` is an eval-mode BatchNorm with running statistics
    and ``conv``'s width and ``conv`` a Conv1d/Conv2d used at one place only; say whether it did."""
    if not isinstance(conv, _CONVS) or id(conv) in shared:
        return False
    if not isinstance(bn, _BatchNorm) or bn.training or bn.running_mean is None:
        return False
    if bn.num_features != conv.out_channels or _unfoldable(conv, bn) is not None:
        return False
    fuse_conv_bn(conv, bn)
    return True


def _fold_sequential(seq: nn.Sequential, shared: set[int]) -> int:
    """Fold every eval-mode BatchNorm that directly follows a conv of matching width (or a plain
    ``Sequential`` that ends in one)."""
    folded = 0
    for i in range(len(seq) - 1):
        if _try_fold(last_module(seq[i]), seq[i + 1], shared):
            seq[i + 1] = nn.Identity().eval()  # the folded norm was in eval mode
            folded += 1
    return folded


def _fold_declared(module: nn.Module, shared: set[int]) -> int:
    """Fold the (conv, bn) attribute pairs that ``module`` declares in ``_fuse_pairs``."""
    folded = 0
    for conv_name, bn_name in getattr(module, "_fuse_pairs", ()):
        try:
            conv: nn.Module | None = module.get_submodule(conv_name)  # dotted names allowed
        except AttributeError:
            conv = None
        if _try_fold(conv, getattr(module, bn_name, None), shared):
            setattr(module, bn_name, nn.Identity().eval())  # as the folded norm was
            folded += 1
    return folded


def fuse(module: M, *, inplace: bool = False) -> M:
    """Fold, for inference, every eval-mode BatchNorm applied directly to a conv's output.

    Folded (into the conv, the BatchNorm replaced by ``nn.Identity``):

    - a BatchNorm that directly follows a ``Conv2d`` or ``Conv1d`` inside an ``nn.Sequential``
      (or a subclass that keeps ``nn.Sequential``'s forward), or follows such a ``Sequential``
      that ends in one (a separable conv written as ``Sequential(depthwise, pointwise)``, as in
      smp's ``SeparableConv2d``): the LD branches, the GALD ``down`` stages, the heads' conv
      blocks and the conv -> BN pairs of a wrapped context module (torchvision's and smp's
      ASPP, PSP blocks);
    - the (conv, BatchNorm) attribute pairs a module declares in its ``_fuse_pairs`` because its
      forward code applies the norm straight to the conv's output: the output norms of
      ``nonlocal`` (``conv_out``/``norm``) and ``glore`` (``conv_extend``/``blocker``), and the
      six conv -> norm pairs of ``dualgcn`` (``phi``, ``theta``, ``conv_adj``, ``conv_wg``,
      ``conv3`` and the coordinate graph's ``conv_wg``).

    With these, no BatchNorm of a :class:`~gald.GALD` or :class:`~gald.GALDHead` with a
    registered GA is left. Left alone: a BatchNorm after a non-conv op (a pooling, a sum, an
    activation, or a norm first in a ``Sequential``), one inside a module's forward code that
    does not declare it (a ``Sequential`` subclass with its own ``forward`` included: it may
    call its children in another order, or add a residual before the norm), a BatchNorm in training mode or without running statistics, and any
    norm of a conv used at two places in the model, or whose weight is tied to another module's
    (folding it would change the other use), and any pair the fold would not reproduce exactly:
    a conv or norm subclass with its own forward (timm's ``StdConv2d``, ``Conv2dSame``,
    ``BatchNormAct2d``), a parametrized conv (``weight_norm``, ``spectral_norm``), a conv or norm
    with forward hooks (``torch.nn.utils.prune`` works through one).
    Other norms (``GroupNorm``, ``LayerNorm``, ``FrozenBatchNorm2d``) are never touched.

    Args:
        module: any module, in eval mode (``module.eval()``).
        inplace: fold in ``module`` itself instead of a deep copy.

    Returns:
        The fused module (a copy unless ``inplace``). Its outputs equal the unfused module's in
        eval mode to rounding. It is meant for inference: putting it back in training mode does
        not bring the BatchNorms back. Its state dict differs from the unfused one (the folded
        BatchNorms' keys are gone, and convs that had no bias gain one): keep the unfused
        checkpoint, and fuse after loading it.

    Raises:
        ValueError: ``module`` is in training mode (its BatchNorms normalise with batch
            statistics and cannot be folded).

    Shape:
        Unchanged: the fused module takes and returns what ``module`` does.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    inplace = check_bool(inplace, "inplace")
    if module.training:
        raise ValueError(
            f"fuse: module ({type(module).__name__}) must be in eval mode (call module.eval() "
            "first); a training-mode BatchNorm normalises with batch statistics and cannot be "
            "folded into a conv"
        )
    target = module if inplace else copy.deepcopy(module)
    shared = _shared_convs(target)
    for sub in list(target.modules()):
        # a subclass with its own forward may call its children in another order or combine
        # them (a residual sum before the norm): only the plain chain is known to be conv -> bn
        if plain_sequential(sub):
            _fold_sequential(sub, shared)
        _fold_declared(sub, shared)
    return target
