"""Building blocks shared by the LD, the GALD block, the heads and the GA layers."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

LayerFactory = Callable[..., nn.Module]
"""A callable that builds a layer: ``norm_layer(num_channels)`` or ``act_layer()``."""


def strided_min_size(num_stages: int, kernel_size: int, padding: int, stride: int = 2) -> int:
    """Smallest side a chain of ``num_stages`` strided convs accepts (each output side >= 1)."""
    size = 1
    for _ in range(num_stages):
        # the smallest s with floor((s + 2p - k) / stride) + 1 >= size
        size = max(1, stride * (size - 1) + kernel_size - 2 * padding)
    return size


def depthwise_stage(
    channels: int,
    *,
    kernel_size: int,
    padding: int,
    norm_layer: LayerFactory,
    act_layer: LayerFactory | None,
) -> nn.Sequential:
    """Depthwise ``kernel_size`` stride-2 conv (with bias, as the authors) -> norm -> act."""
    layers: list[nn.Module] = [
        nn.Conv2d(
            channels, channels, kernel_size, stride=2, padding=padding, groups=channels, bias=True
        ),
        norm_layer(channels),
    ]
    if act_layer is not None:
        layers.append(act_layer())
    return nn.Sequential(*layers)


def conv_norm_act(
    in_channels: int,
    out_channels: int,
    *,
    norm_layer: LayerFactory | None,
    act_layer: LayerFactory,
    kernel_size: int = 3,
    dilation: int = 1,
) -> nn.Sequential:
    """``kernel_size`` conv ("same" padding, bias only without a norm) -> norm -> act."""
    padding = dilation * (kernel_size - 1) // 2
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            padding=padding,
            dilation=dilation,
            bias=norm_layer is None,
        )
    ]
    if norm_layer is not None:
        layers.append(norm_layer(out_channels))
    layers.append(act_layer())
    return nn.Sequential(*layers)
