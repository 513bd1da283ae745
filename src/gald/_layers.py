"""Building blocks shared by the LD, the GALD block, the heads and the GA layers."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

LayerFactory = Callable[..., nn.Module]
"""A callable that builds a layer: ``norm_layer(num_channels)`` or ``act_layer()``."""


def make_layer(factory: LayerFactory, name: str, *args: int, purpose: str) -> nn.Module:
    """``factory(*args)``, with an error naming the argument ``name`` and what the layer is for
    when the factory cannot build it (``partial(nn.GroupNorm, 32)`` on 16 channels) or builds
    something that is not a module."""
    call = f"{name}({', '.join(map(str, args))})"
    try:
        layer = factory(*args)
    except (TypeError, ValueError) as exc:
        kind = TypeError if isinstance(exc, TypeError) else ValueError
        raise kind(
            f"{name}={factory!r} cannot build {purpose}: {call} raised {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(layer, nn.Module):
        raise TypeError(
            f"{name}={factory!r} must build an nn.Module ({purpose}), but {call} returned "
            f"{type(layer).__name__} {layer!r}"
        )
    return layer


def make_norm(
    norm_layer: LayerFactory, channels: int, owner: nn.Module, name: str = "norm_layer"
) -> nn.Module:
    """``norm_layer(channels)`` for a layer ``owner``, errors naming the argument ``name``."""
    return make_layer(norm_layer, name, channels, purpose=f"a norm of {type(owner).__name__}")


def make_act(act_layer: LayerFactory, owner: nn.Module) -> nn.Module:
    """``act_layer()`` for a layer ``owner``, errors naming the argument."""
    return make_layer(act_layer, "act_layer", purpose=f"an activation of {type(owner).__name__}")


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
    where: str = "a depthwise stage",
) -> nn.Sequential:
    """Depthwise ``kernel_size`` stride-2 conv (with bias, as the authors) -> norm -> act.

    ``where`` names the stage in error messages ("GALD's downsample stage")."""
    layers: list[nn.Module] = [
        nn.Conv2d(
            channels, channels, kernel_size, stride=2, padding=padding, groups=channels, bias=True
        ),
        make_layer(norm_layer, "norm_layer", channels, purpose=f"the norm of {where}"),
    ]
    if act_layer is not None:
        layers.append(make_layer(act_layer, "act_layer", purpose=f"the activation of {where}"))
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
    where = f"a {in_channels} -> {out_channels} conv block"
    if norm_layer is not None:
        layers.append(
            make_layer(norm_layer, "norm_layer", out_channels, purpose=f"the norm of {where}")
        )
    layers.append(make_layer(act_layer, "act_layer", purpose=f"the activation of {where}"))
    return nn.Sequential(*layers)
