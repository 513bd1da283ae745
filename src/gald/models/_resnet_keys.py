"""What the keys of a ResNet state dict say about its layout: blocks per layer (so the depth),
and the ResNet-C/-D variants :class:`gald.models.DilatedResNet` does not implement. Shared by
the backbone's own checkpoint checks and :mod:`gald.convert`."""

from __future__ import annotations

import re
from collections.abc import Mapping

_LAYER_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")
RESNET_LAYERS: dict[int, tuple[int, int, int, int]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
"""Bottleneck blocks per layer of the ResNets the authors use (``DilatedResNet`` reads it)."""
DEPTHS = {blocks: depth for depth, blocks in RESNET_LAYERS.items()}


def layer_blocks(keys: list[str], prefix: str = "") -> tuple[int, ...]:
    """Blocks per ResNet layer in a state dict's keys (0 for a missing layer)."""
    counts = [0, 0, 0, 0]
    for key in keys:
        if key.startswith(prefix) and (m := _LAYER_KEY.match(key[len(prefix) :])):
            layer, block = int(m.group(1)) - 1, int(m.group(2))
            counts[layer] = max(counts[layer], block + 1)
    return tuple(counts)


_SHORTCUT_D = re.compile(r"^layer[1-4]\.\d+\.downsample\.(?:(1)\.weight|2\.\w+)$")
_DEEP_STEMS = (("conv1.0", "conv1.3", "conv1.6"), ("conv1", "conv2", "conv3"))


def _out_channels(value: object) -> int | None:
    """The output width of a conv weight (4-D), else ``None``."""
    shape = getattr(value, "shape", None)
    return int(shape[0]) if shape is not None and len(shape) == 4 else None


def resnet_d_problem(state_dict: Mapping[str, object], prefix: str = "") -> str | None:
    """What makes the ResNet under ``prefix`` one of the ResNet-C/-D layouts (timm's
    ``resnet50d``: a parameter-free average pool in front of each shortcut conv, so the conv is
    ``downsample.1`` and its norm ``downsample.2``; a deep stem 32/32/64 wide), which
    :class:`gald.models.DilatedResNet` does not implement; ``None`` for any other layout."""
    shortcut = None
    for key, value in state_dict.items():
        if isinstance(key, str) and key.startswith(prefix):
            m = _SHORTCUT_D.match(key[len(prefix) :])
            # downsample.1 is the norm in the authors' layout: only a conv weight there counts
            if m is not None and (m.group(1) is None or _out_channels(value) is not None):
                shortcut = key
                break
    stem = None
    for names in _DEEP_STEMS:
        keys = [f"{prefix}{n}.weight" for n in names]
        if names[1] == "conv2" and keys[1] not in state_dict:
            continue  # a 7x7 stem
        widths = [_out_channels(state_dict.get(k)) for k in keys]
        if all(w is not None for w in widths) and widths != [64, 64, 128]:
            stem = f"a deep stem {'/'.join(map(str, widths))} wide ({', '.join(names)})"
            break
    found = []
    if shortcut is not None:
        found.append(
            f"an average-pool shortcut ({shortcut}: the conv at downsample.1, its norm at "
            "downsample.2)"
        )
    if stem is not None:
        found.append(stem)
    if not found:
        return None
    layout = (
        "the ResNet-D layout (avg-pool shortcut, 32-wide stem) of timm's resnet50d / resnet101d"
        if shortcut is not None
        else "the ResNet-C stem (32-wide) of timm's resnet50c / resnet101c"
    )
    return (
        f"the state dict has {' and '.join(found)}: {layout}, which DilatedResNet does not implement; "
        "expected the GALD-Net authors' layout: a conv shortcut (downsample.0 the 1x1 conv, "
        "downsample.1 its norm) and a deep stem 64/64/128 wide (conv1.0 3->64, conv1.3 "
        "64->64, conv1.6 64->128), or torchvision's 7x7 stem (conv1 3->64) for "
        "DilatedResNet(deep_stem=False)"
    )
