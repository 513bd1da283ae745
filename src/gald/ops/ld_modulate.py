"""The Local Distribution modulation ``x * (offset + sigmoid(Up(logits)))``.

Placeholder dispatch: only the reference path exists so far; the fused op lands with issue 3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ld_modulate_reference(
    x: torch.Tensor, logits: torch.Tensor, offset: float = 1.0, *, align_corners: bool = True
) -> torch.Tensor:
    """Plain-ops formula, kept as the oracle: ``x * (offset + sigmoid(Up(logits, x.shape[-2:])))``."""
    mask = torch.sigmoid(
        F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=align_corners)
    )
    return x * (offset + mask)


def ld_modulate(
    x: torch.Tensor,
    logits: torch.Tensor,
    offset: float = 1.0,
    *,
    align_corners: bool = True,
    impl: str | None = None,
) -> torch.Tensor:
    """Compute ``x * (offset + sigmoid(Up(logits, x.shape[-2:])))``.

    Shape:
        - x: (B, C, H, W)
        - logits: (B, C, h, w)
        - output: (B, C, H, W)
    """
    return ld_modulate_reference(x, logits, offset, align_corners=align_corners)
