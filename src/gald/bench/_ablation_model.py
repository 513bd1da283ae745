"""Paired model variants of the LD ablation: same initial weights, different context slot.

The model is a 5-conv backbone to output stride 4 followed by :class:`gald.GALDHead` whose
``gald`` slot holds one of

- ``none``: ``nn.Identity()`` (no context module),
- ``ga``: ``gald.GALD(..., ld=False)`` (global aggregation only),
- ``ld``: ``gald.GALD(..., ld=True)`` (global aggregation then local distribution).

Each sub-module is built under its own seed (backbone, head, GA, GALD block), so adding or
removing a part does not shift the random numbers of the others; the ``ga`` block then takes
the ``ld`` block's weights for every parameter they share. :func:`check_pairing` compares the
variants parameter by parameter and buffer by buffer, and fails loudly on any difference.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..block import GALD
from ..head import GALDHead
from ..registry import create_ga

VARIANTS = ("none", "ga", "ld")
_PARTS = {"backbone": 1, "head": 2, "ga": 3, "gald": 4}


@contextlib.contextmanager
def seeded(seed: int, part: str) -> Iterator[None]:
    """Run a block under a seed derived from (``seed``, ``part``), leaving the global RNG as it
    was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1009 + _PARTS[part])
        yield


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class Backbone(nn.Sequential):
    """Five 3x3 conv -> BN -> ReLU layers, output stride 4, ``channels`` output channels."""

    def __init__(self, channels: int) -> None:
        half = max(channels // 2, 1)
        super().__init__(
            _conv(3, half, 2),
            _conv(half, half, 1),
            _conv(half, channels, 2),
            _conv(channels, channels, 1),
            _conv(channels, channels, 1),
        )


class Segmenter(nn.Module):
    """Backbone -> GALD head -> logits at output stride 4."""

    def __init__(self, backbone: nn.Module, head: GALDHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_variants(
    seed: int,
    *,
    ga: str,
    channels: int,
    num_classes: int,
    offset: float,
    final_act: bool,
    ga_kwargs: dict[str, Any] | None = None,
) -> dict[str, Segmenter]:
    """The three variants for one seed, with identical weights wherever they share a part."""
    with seeded(seed, "backbone"):
        backbone = Backbone(channels)
    with seeded(seed, "head"):
        # the head's own GALD slot is replaced below; an identity GA keeps its build cheap
        head = GALDHead(channels, num_classes, channels=channels, ga_module=nn.Identity())
    with seeded(seed, "ga"):
        ga_module = create_ga(ga, channels, **(ga_kwargs or {}))
    with seeded(seed, "gald"):
        ld_block = GALD(
            channels, copy.deepcopy(ga_module), ld=True, offset=offset, final_act=final_act
        )
    with seeded(seed, "gald"):
        ga_block = GALD(channels, copy.deepcopy(ga_module), ld=False)
    shared = {k: v for k, v in ld_block.state_dict().items() if not k.startswith("ld.")}
    ga_block.load_state_dict(shared, strict=True)
    blocks: dict[str, nn.Module] = {"none": nn.Identity(), "ga": ga_block, "ld": ld_block}
    models = {}
    for name in VARIANTS:
        h = copy.deepcopy(head)
        h.gald = copy.deepcopy(blocks[name])  # type: ignore[assignment]
        models[name] = Segmenter(copy.deepcopy(backbone), h)
    check_pairing(models)
    return models


def check_pairing(models: Mapping[str, nn.Module]) -> None:
    """Raise ``RuntimeError`` unless every tensor the variants share is bitwise identical and
    the variants differ only in their context slot (``head.gald``)."""
    states = {name: m.state_dict() for name, m in models.items()}
    names = list(states)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            sa, sb = states[a], states[b]
            only = sorted(set(sa) ^ set(sb))
            stray = [k for k in only if not k.startswith("head.gald.")]
            if stray:
                raise RuntimeError(f"variants {a!r} and {b!r} differ outside head.gald: {stray}")
            diff = [k for k in set(sa) & set(sb) if not torch.equal(sa[k], sb[k])]
            if diff:
                raise RuntimeError(
                    f"variants {a!r} and {b!r} start from different weights in {sorted(diff)}"
                )
    if "ld" in states and "ga" in states:
        extra = sorted(set(states["ld"]) - set(states["ga"]))
        if not extra or any(not k.startswith("head.gald.ld.") for k in extra):
            raise RuntimeError(f"the ld variant should add exactly head.gald.ld.*, adds {extra}")


class ConstantGate(nn.Module):
    """``x * gate[c]``: an LD replaced by a fixed per-channel scale."""

    def __init__(self, gate: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("gate", gate.detach().reshape(1, -1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate: torch.Tensor = self.gate  # type: ignore[assignment]
        return x * gate.to(x.dtype)


def freeze_gate(model: Segmenter, channel_mean: tuple[float, ...] | list[float]) -> Segmenter:
    """A copy of a trained ``ld`` variant whose LD is replaced by its mean gate per channel:
    what is left of the LD once its spatial and per-sample variation is removed."""
    block = model.head.gald
    if not isinstance(block, GALD) or block.ld is None:
        raise ValueError("freeze_gate needs the 'ld' variant (a GALD block with an LD)")
    frozen = copy.deepcopy(model)
    # a fixed scale in the LD slot (GALD calls whatever module .ld holds)
    frozen.head.gald.ld = ConstantGate(torch.tensor(channel_mean, dtype=torch.float32))  # type: ignore[assignment]
    return frozen


def fold_gate_into_convb(
    model: Segmenter, channel_mean: tuple[float, ...] | list[float]
) -> Segmenter:
    """A copy of a trained ``ld`` variant without its LD, the per-channel mean gate folded into
    the input channels of the head's next conv: ``conv(y * g) = conv_{W diag(g)}(y)`` exactly
    for a zero-padded conv (the padded zeros stay zero), so this equals :func:`freeze_gate` up
    to rounding."""
    block = model.head.gald
    if not isinstance(block, GALD) or block.ld is None:
        raise ValueError("fold_gate_into_convb needs the 'ld' variant (a GALD block with an LD)")
    folded = copy.deepcopy(model)
    folded.head.gald.ld = None
    conv = folded.head.convb[0]
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.padding_mode != "zeros":
        raise ValueError(f"the head's convb must start with a dense zero-padded conv, got {conv}")
    with torch.no_grad():
        g = torch.tensor(channel_mean, dtype=conv.weight.dtype)
        conv.weight.mul_(g.reshape(1, -1, 1, 1))
    return folded
