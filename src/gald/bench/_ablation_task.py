"""The synthetic segmentation task of the LD ablation, and its metrics.

Every image holds a few large Voronoi regions and a few small squares, under per-pixel
Gaussian noise (std 1):

- large regions (classes ``0 .. LARGE_CLASSES-1``): a faint class colour (amplitude
  ``large_amplitude``, well below the noise), so a pixel's class is only clear from many
  pixels of its region: context;
- small objects (classes ``LARGE_CLASSES ..``): 2-6 px squares with a strong colour on a channel
  the large classes do not use, so they are clear from a few pixels: local evidence;
- the boundary band: pixels with a differently labelled pixel in their 3x3 neighbourhood.

The generator is a ``torch.Generator``: the same seed gives the same images on every machine
and for every model variant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LARGE_CLASSES = 4
SMALL_CLASSES = 2
NUM_CLASSES = LARGE_CLASSES + SMALL_CLASSES

# colours: large classes in the (R, G) plane, small classes along B
_LARGE_COLOURS = torch.tensor(
    [[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]]
)
_SMALL_COLOURS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])


def make_batch(
    gen: torch.Generator,
    batch: int,
    size: int,
    *,
    large_amplitude: float = 0.3,
    small_amplitude: float = 2.5,
    regions: tuple[int, int] = (3, 6),
    objects: tuple[int, int] = (3, 8),
    object_side: tuple[int, int] = (2, 6),
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (B, 3, S, S) float32, labels (B, S, S) int64)`` drawn from ``gen``."""
    # large regions: Voronoi cells of ``regions`` random centres, unused centre slots masked
    r_max = regions[1]
    n_regions = torch.randint(regions[0], regions[1] + 1, (batch, 1), generator=gen)
    centres = torch.rand(batch, r_max, 2, generator=gen) * size
    region_class = torch.randint(0, LARGE_CLASSES, (batch, r_max), generator=gen)
    coords = torch.arange(size, dtype=torch.float32)
    ys = coords.repeat_interleave(size).reshape(1, -1, 1)
    xs = coords.repeat(size).reshape(1, -1, 1)
    dist = (ys - centres[:, None, :, 0]).square() + (xs - centres[:, None, :, 1]).square()
    dist = dist.masked_fill((torch.arange(r_max) >= n_regions)[:, None, :], float("inf"))
    cell = dist.argmin(dim=-1)  # (B, S*S)
    labels = region_class.gather(1, cell).reshape(batch, size, size)
    # small objects: squares pasted over the regions
    o_max = objects[1]
    n_objects = torch.randint(objects[0], objects[1] + 1, (batch,), generator=gen).tolist()
    sides = torch.randint(object_side[0], object_side[1] + 1, (batch, o_max), generator=gen)
    corners = (torch.rand(batch, o_max, 2, generator=gen) * (size - sides[..., None] + 1)).long()
    classes = LARGE_CLASSES + torch.randint(0, SMALL_CLASSES, (batch, o_max), generator=gen)
    for b in range(batch):
        for i in range(n_objects[b]):
            side = int(sides[b, i])
            top, left = int(corners[b, i, 0]), int(corners[b, i, 1])
            labels[b, top : top + side, left : left + side] = classes[b, i]
    colours = torch.cat([_LARGE_COLOURS * large_amplitude, _SMALL_COLOURS * small_amplitude])
    images = colours[labels].permute(0, 3, 1, 2) + torch.randn(batch, 3, size, size, generator=gen)
    return images.contiguous(), labels


def class_weights(small_weight: float) -> torch.Tensor:
    """Cross-entropy class weights: 1 for the large classes, ``small_weight`` for the small
    ones (they cover about 2 % of the pixels)."""
    return torch.tensor([1.0] * LARGE_CLASSES + [float(small_weight)] * SMALL_CLASSES)


def boundary_band(labels: torch.Tensor) -> torch.Tensor:
    """Boolean (B, S, S): pixels with a differently labelled pixel in their 3x3 neighbourhood."""
    lab = labels[:, None].float()
    hi = F.max_pool2d(lab, 3, stride=1, padding=1)
    lo = -F.max_pool2d(-lab, 3, stride=1, padding=1)
    return (hi != lo)[:, 0]


def confusion(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int = NUM_CLASSES
) -> torch.Tensor:
    """(K, K) int64 counts, rows = target, columns = prediction."""
    idx = target.reshape(-1) * num_classes + pred.reshape(-1)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def class_iou(conf: torch.Tensor) -> torch.Tensor:
    """Per-class IoU (float64); NaN for a class absent from both target and prediction."""
    conf = conf.to(torch.float64)
    tp = conf.diagonal()
    union = conf.sum(0) + conf.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def metrics(conf_all: torch.Tensor, conf_boundary: torch.Tensor) -> dict[str, float]:
    """IoU in percent: ``large`` (mean over large classes), ``small`` (mean over small
    classes), ``boundary`` (mean IoU over the classes, on boundary-band pixels only) and
    ``miou`` (mean over all classes, all pixels)."""
    iou = class_iou(conf_all)
    biou = class_iou(conf_boundary)
    return {
        "large": 100.0 * float(iou[:LARGE_CLASSES].nanmean()),
        "small": 100.0 * float(iou[LARGE_CLASSES:].nanmean()),
        "boundary": 100.0 * float(biou.nanmean()),
        "miou": 100.0 * float(iou.nanmean()),
    }
