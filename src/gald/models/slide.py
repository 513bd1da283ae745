"""Sliding-window evaluation of a segmentation network, with optional flip and multi-scale.

Reference: the evaluation of the GALD-Net authors (``predict_sliding`` of
github.com/lxtGH/GALD-DGCNet ``eval.py``): overlapping crops, zero padding of crops that do not
fill the window, logits averaged where crops overlap.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._amp import compute_dtype
from .._modes import eval_mode
from .._validate import (
    check_bool,
    check_feature,
    check_float,
    check_ordered_items,
    check_positive_int,
    check_size_pair,
)

__all__ = ["slide_inference"]


def _starts(size: int, crop: int, stride: int) -> list[int]:
    """Window starts along one side: every ``stride``, the last window flush with the end."""
    if size <= crop:
        return [0]
    count = math.ceil((size - crop) / stride) + 1
    return [min(i * stride, size - crop) for i in range(count)]


_OUTPUTS = (
    "the model must return logits (B, num_classes, h, w), a dict with 'out' or a list/tuple "
    "whose first item is the logits"
)


def _logits(output: object, num_classes: int, crop: tuple[int, int], batch: int) -> torch.Tensor:
    if isinstance(output, Mapping):
        if "out" not in output:
            raise TypeError(f"{_OUTPUTS}, got a dict with keys {list(output)}")
        output = output["out"]
    elif isinstance(output, (list, tuple)):
        if not output:
            raise TypeError(f"{_OUTPUTS}, got an empty {type(output).__name__}")
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"{_OUTPUTS}, got {type(output).__name__}")
    if output.ndim != 4:
        raise ValueError(f"{_OUTPUTS}, got a {output.ndim}-D tensor of shape {tuple(output.shape)}")
    if output.shape[0] != batch:
        raise ValueError(
            f"the model returned logits for {output.shape[0]} images (shape "
            f"{tuple(output.shape)}) from a crop batch of {batch}"
        )
    if output.shape[1] != num_classes:
        raise ValueError(
            f"num_classes={num_classes} but the model returned {output.shape[1]} channels "
            f"(shape {tuple(output.shape)})"
        )
    if output.shape[-2:] != crop:
        output = F.interpolate(output, size=crop, mode="bilinear", align_corners=True)
    return output


def _slide(
    model: Callable[[torch.Tensor], object],
    images: torch.Tensor,
    crop: tuple[int, int],
    stride: tuple[int, int],
    num_classes: int,
    flip: bool,
) -> torch.Tensor:
    batch, _, height, width = images.shape
    total: torch.Tensor | None = None
    count = torch.zeros(1, 1, height, width, device=images.device, dtype=torch.float32)
    for y in _starts(height, crop[0], stride[0]):
        for x in _starts(width, crop[1], stride[1]):
            h, w = min(crop[0], height - y), min(crop[1], width - x)
            tile = images[:, :, y : y + h, x : x + w]
            if (h, w) != crop:  # only when the image is smaller than the crop
                tile = F.pad(tile, (0, crop[1] - w, 0, crop[0] - h))
            logits = _logits(model(tile), num_classes, crop, batch)
            if flip:
                flipped = _logits(model(tile.flip(-1)), num_classes, crop, batch).flip(-1)
                logits = (logits + flipped) / 2
            if total is None:
                total = logits.new_zeros(
                    batch, num_classes, height, width, dtype=compute_dtype(logits.dtype)
                )
            total[:, :, y : y + h, x : x + w] += logits[:, :, :h, :w]
            count[:, :, y : y + h, x : x + w] += 1
    assert total is not None  # at least one window
    return total / count.to(total.dtype)


def slide_inference(
    model: Callable[[torch.Tensor], object],
    images: torch.Tensor,
    *,
    crop_size: int | tuple[int, int],
    stride: int | tuple[int, int],
    num_classes: int,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
) -> torch.Tensor:
    r"""Sliding-window logits of ``model`` over ``images``, averaged where windows overlap.

    Along each side, windows of ``crop_size`` start every ``stride`` pixels, the last one flush
    with the image end. A side shorter than the crop gets one window, zero-padded at the bottom
    or right to the crop size (images are normalised, so zero is the mean) and cropped back.
    Each window's logits are upsampled to the crop (bilinear, ``align_corners=True``) if the
    model returns them smaller; logits, not probabilities, are averaged (as the GALD-Net
    authors). With ``flip=True`` every window is also run mirrored left-right and the two are
    averaged; with several ``scales`` the images are resized (bilinear, ``align_corners=True``;
    side ``round(scale * H)``), slid over, resized back and the results averaged.

    The model is called with one window of the whole batch at a time, ``(B, C, *crop_size)``,
    under ``torch.no_grad()``, so memory stays bounded by one crop batch plus the accumulators,
    whatever the image size: the ``(B, num_classes, H, W)`` result and, for a scale other than
    1, the resized images, one ``(B, num_classes, sH, sW)`` accumulator at that scale (4x
    the result's size at scale 2) and its logits resized back, added to the result in place. An ``nn.Module`` runs in
    eval mode (BatchNorm uses, and does not update, its running statistics); the training flag
    of each of its submodules is restored afterwards.

    Args:
        model: a callable returning logits ``(B, num_classes, h, w)``, a dict with ``"out"`` (as
            :class:`GALDNet`) or a list/tuple whose first item is the logits.
        images: normalised images.
        crop_size: window size, an int or ``(h, w)``.
        stride: step between windows, an int or ``(h, w)``, at most ``crop_size`` (the authors
            use two thirds of the crop).
        num_classes: channels of the logits.
        flip: average with the left-right mirrored windows.
        scales: image scales to average over (finite and positive).

    Shape:
        - Input: :math:`(B, C, H, W)`
        - Output: :math:`(B, \text{num\_classes}, H, W)`, float32 for half-precision logits.
    """
    if not callable(model):
        raise TypeError(
            f"model must be a callable (an nn.Module) mapping images to logits, got "
            f"{type(model).__name__}"
        )
    check_feature(images, None, name="images", who="slide_inference")
    crop = check_size_pair(crop_size, "crop_size")
    step = check_size_pair(stride, "stride")
    if step[0] > crop[0] or step[1] > crop[1]:
        raise ValueError(
            f"stride must be at most crop_size (or pixels between windows are never predicted), "
            f"got stride={step} and crop_size={crop}"
        )
    num_classes = check_positive_int(num_classes, "num_classes")
    flip = check_bool(flip, "flip")
    items = check_ordered_items(scales, "scales", "positive floats")
    scales = [check_float(s, f"scales[{i}]") for i, s in enumerate(items)]
    if not scales:
        raise ValueError("scales must not be empty, got an empty sequence")
    if not all(s > 0 for s in scales):
        raise ValueError(f"scales must hold positive numbers, got {scales}")

    height, width = images.shape[-2:]
    result: torch.Tensor | None = None
    # an nn.Module runs in eval mode (BatchNorm on its running statistics, which a train-mode
    # call would update); every submodule's own flag is restored afterwards
    modes = eval_mode(model) if isinstance(model, nn.Module) else contextlib.nullcontext()
    with modes, torch.no_grad():
        for scale in scales:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            scaled = images
            if size != (height, width):
                scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=True)
            logits = _slide(model, scaled, crop, step, num_classes, flip)
            if size != (height, width):
                logits = F.interpolate(
                    logits, size=(height, width), mode="bilinear", align_corners=True
                )
            if result is None:
                result = logits
            else:
                result.add_(logits)  # in place: no third full-size tensor
            del logits
    assert result is not None
    return result.div_(len(scales)) if len(scales) > 1 else result
