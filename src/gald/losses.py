"""Losses of the GALD training recipe.

The poly learning-rate decay of the recipe is PyTorch's own
``torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=T, power=0.9)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._amp import compute_dtype
from ._validate import check_float, check_int, check_positive_int

__all__ = ["OhemCrossEntropy"]


class OhemCrossEntropy(nn.Module):
    r"""Cross-entropy with online hard-example mining, as in the authors' training code.

    Among the valid pixels (``target != ignore_index``) let :math:`p` be the softmax probability
    of the target class. If fewer than ``min_kept`` pixels are valid there is no mining (plain
    cross-entropy over the valid pixels). Otherwise the threshold is ``thresh``, raised to the
    ``min_kept``-th smallest :math:`p` when that is larger, and the loss is the cross-entropy
    averaged (class-weighted as ``F.cross_entropy`` does) over the valid pixels with
    :math:`p \le` threshold.

    Nothing is sorted: :math:`p` comes from one log-softmax gather, the ``min_kept``-th value from
    ``kthvalue``, and the loss reuses the same log-probabilities. The computation has no
    data-dependent Python branch, so it compiles without graph breaks.

    The loss has the logits' dtype, as ``F.cross_entropy``'s, except under autocast, where it
    is float32 as autocast makes ``F.cross_entropy``'s.

    Labels are checked: a label outside ``[0, K)`` that is not ``ignore_index`` raises a
    ``ValueError`` naming it (``F.cross_entropy`` would index out of bounds, a device-side
    assert on CUDA). The check is one reduction over the labels and, on CUDA, one
    synchronisation per call; it is skipped under ``torch.compile``.

    Deviation: when no pixel is kept (for instance an all-ignore crop) the loss is ``0`` (still
    attached to the graph) rather than the ``NaN`` of ``F.cross_entropy``.

    Every argument is keyword-only (``OhemCrossEntropy(255, 0.7)`` is a ``TypeError``): the
    positional order of ``nn.CrossEntropyLoss`` starts with ``weight``, and a silent mix-up of
    ``ignore_index`` with ``weight`` is worse than a word more.

    Args:
        weight: optional per-class weight, shape ``(num_classes,)``.
        ignore_index: label of pixels that do not count.
        thresh: probability threshold (0.7 in the recipe).
        min_kept: minimum number of pixels kept (100 000 in the recipe).

    Shape:
        - logits: :math:`(B, K, H, W)`, at label resolution (upsample first).
        - target: :math:`(B, H, W)`, integer labels in ``[0, K)`` or ``ignore_index``.
        - output: scalar.

    References:
        A. Shrivastava, A. Gupta, R. Girshick, "Training Region-based Object Detectors with
        Online Hard Example Mining", CVPR 2016 (the idea); the pixel-level form with a
        probability threshold and a minimum number of kept pixels follows the authors' code
        (github.com/lxtGH/GALD-DGCNet, ``libs/core/loss.py``).
    """

    def __init__(
        self,
        *,
        weight: torch.Tensor | None = None,
        ignore_index: int = 255,
        thresh: float = 0.7,
        min_kept: int = 100_000,
    ) -> None:
        super().__init__()
        ignore_index = check_int(ignore_index, "ignore_index")
        thresh = check_float(thresh, "thresh")
        if not 0.0 <= thresh <= 1.0:
            raise ValueError(f"thresh must be in [0, 1], got {thresh}")
        min_kept = check_positive_int(min_kept, "min_kept", minimum=0)
        if weight is not None:
            if not isinstance(weight, torch.Tensor):
                raise TypeError(f"weight must be a Tensor or None, got {type(weight).__name__}")
            if weight.ndim != 1 or not weight.is_floating_point():
                raise ValueError(
                    f"weight must be a 1-D floating tensor (num_classes,), got shape "
                    f"{tuple(weight.shape)} and dtype {weight.dtype}"
                )
        self.ignore_index = ignore_index
        self.thresh = thresh
        self.min_kept = min_kept
        self.weight: torch.Tensor | None
        self.register_buffer("weight", weight)

    def extra_repr(self) -> str:
        weight = "None" if self.weight is None else f"<{self.weight.numel()} class weights>"
        return (
            f"ignore_index={self.ignore_index}, thresh={self.thresh}, min_kept={self.min_kept}, "
            f"weight={weight}"
        )

    def _check(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        for name, value in (("logits", logits), ("target", target)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if logits.ndim != 4:
            raise ValueError(f"logits must be 4-D (B, K, H, W), got shape {tuple(logits.shape)}")
        if not logits.is_floating_point():
            raise TypeError(f"logits must have a floating dtype, got {logits.dtype}")
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(
                f"target must hold integer labels (any integer dtype), got {target.dtype}"
            )
        expected = (logits.shape[0], *logits.shape[2:])
        if tuple(target.shape) != tuple(expected):
            raise ValueError(
                f"target must have shape (B, H, W) = {tuple(expected)} to match logits "
                f"{tuple(logits.shape)}, got {tuple(target.shape)} (upsample the logits to the "
                "label size first)"
            )
        if self.weight is not None and self.weight.shape[0] != logits.shape[1]:
            raise ValueError(
                f"weight must have {logits.shape[1]} entries (one per class), got "
                f"{self.weight.shape[0]}"
            )
        if logits.shape[1] < 1:
            raise ValueError(
                f"logits must have at least one class, got shape {tuple(logits.shape)}"
            )
        if logits.device != target.device:
            raise ValueError(
                f"logits and target must be on one device, got {logits.device} and {target.device}"
            )

    def _check_labels(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """``target`` (int64) holds classes of ``logits`` or ``ignore_index`` only."""
        if torch.compiler.is_compiling():  # a data-dependent check would break the graph
            return
        # a label outside [0, K) would index out of bounds below (a device-side assert on CUDA,
        # which ends the process); one reduction over the labels tells the user which
        bad = ((target < 0) | (target >= logits.shape[1])) & (target != self.ignore_index)
        if bool(bad.any()):
            values = torch.unique(target[bad])
            shown = ", ".join(str(v) for v in values[:5].tolist())
            raise ValueError(
                f"target must hold labels in [0, {logits.shape[1]}) (the logits' classes) or "
                f"ignore_index={self.ignore_index}, got {shown}"
                + (f" and {values.numel() - 5} other values" if values.numel() > 5 else "")
            )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._check(logits, target)
        target = target.long()
        self._check_labels(logits, target)
        valid = target != self.ignore_index
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        # half-precision logits are upcast: the softmax and the sums run in fp32 at least
        work = logits.to(compute_dtype(logits.dtype))
        logp = F.log_softmax(work, dim=1)
        logp_t = logp.gather(1, safe_target.unsqueeze(1)).squeeze(1)  # (B, H, W)
        prob = logp_t.detach().exp()
        numel = logp_t.numel()
        k = min(self.min_kept, numel)
        threshold = torch.tensor(self.thresh, dtype=logp_t.dtype, device=logp_t.device)
        if k > 0 and self.min_kept <= numel:
            # Invalid pixels get a probability of 2, above every real one: when fewer than
            # min_kept pixels are valid, the k-th smallest is 2 and every valid pixel is kept,
            # which is exactly the "no mining" branch of the rule.
            prob_all = torch.where(valid, prob, torch.full_like(prob, 2.0))
            kth = prob_all.reshape(-1).kthvalue(k).values
            threshold = torch.maximum(threshold, kth)
        elif self.min_kept > numel:
            threshold = torch.full_like(threshold, 2.0)  # fewer valid pixels than min_kept
        kept = valid & (prob <= threshold)
        if self.weight is not None:
            w = self.weight.to(logp_t.dtype)[safe_target] * kept
        else:
            w = kept.to(logp_t.dtype)
        denom = w.sum()
        # (-logp) * w, not -(logp * w): a loss without kept pixels is +0, not -0
        loss = (logp_t.neg() * w).sum() / denom.clamp_min(torch.finfo(logp_t.dtype).tiny)
        # the logits' dtype, as F.cross_entropy; under autocast the computed float32 (float64
        # for float64 logits), as autocast gives F.cross_entropy (a bfloat16 loss would round
        # the logged value to 3 digits)
        if torch.is_autocast_enabled(logits.device.type):
            return loss
        return loss.to(logits.dtype)
