"""Building blocks shared by the LD, the GALD block, the heads and the GA layers."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeGuard

import torch
from torch import nn

from ._modes import dry_run
from ._validate import first_line

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


def first_tensor(module: nn.Module) -> torch.Tensor | None:
    """The module's first parameter, else its first buffer: where its device and dtype are read."""
    ref: torch.Tensor | None = next(iter(module.parameters()), None)
    return ref if ref is not None else next(iter(module.buffers()), None)


def probe_setting(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of a dry run's inputs: those of the module's first parameter or
    buffer (float32 for an integer one), the CPU and float32 for a module without any."""
    ref = first_tensor(module)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    return device, dtype


def check_norm_runs(
    norm: nn.Module,
    factory: object,
    channels: int,
    name: str = "norm_layer",
    hw: tuple[int, int] | None = None,
) -> None:
    """Run ``norm`` once in eval mode, without gradients, on a small (2, channels, *hw) map on
    its own device and dtype (a meta tensor for a norm built on the meta device): a factory
    that builds a layer for another layout (``nn.LayerNorm`` normalises the last dimension) is
    refused here, by name, rather than at the first forward. ``hw`` defaults to (2, 3), (2, 5)
    for 3 channels, so that a last-dimension norm cannot pass by coincidence; a norm that only
    ever sees (B, C, 1, 1) maps is probed with ``hw=(1, 1)``."""
    if hw is None:
        hw = (2, 3 if channels != 3 else 5)
    shape = (2, channels, *hw)
    exc = _norm_error(norm, shape)
    if exc is not None:
        raise ValueError(
            f"{name}={factory!r} builds {norm!r}, which cannot normalise a (B, C, H, W) feature "
            f"map: on a {shape} input it raised {type(exc).__name__}: "
            f"{first_line(str(exc))}. The norms take (B, C, H, W) maps: nn.BatchNorm2d, "
            "nn.SyncBatchNorm, functools.partial(nn.GroupNorm, 32), or a channels-first layer "
            "norm"
        ) from exc


def _norm_error(norm: nn.Module, shape: tuple[int, ...]) -> Exception | None:
    """What ``norm`` raises on a zero input of ``shape`` in eval mode, without gradients, on its
    own device and dtype (``None`` when it runs)."""
    device, dtype = probe_setting(norm)
    probe = torch.zeros(shape, device=device, dtype=dtype)
    try:
        with dry_run(norm):
            norm(probe)
    except Exception as exc:  # the norm refuses this map
        return exc
    return None


def refuses_single_value(stage: nn.Module) -> nn.Module | None:
    """The first norm in ``stage`` that cannot normalise a (1, C, 1, 1) map in eval mode (an
    ``nn.InstanceNorm2d``, a GroupNorm with one channel per group), or ``None``. A stride-2
    stage whose output is 1x1 then fails at every batch size (the instance norm) or at batch 1,
    so such a stage needs an output of at least 2 on a side."""
    for norm in stage.modules():
        if not isinstance(norm, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            continue
        channels = getattr(norm, "num_features", None) or getattr(norm, "num_channels", None)
        if isinstance(channels, int) and _norm_error(norm, (1, channels, 1, 1)) is not None:
            return norm
    return None


def make_norm2d(
    factory: LayerFactory,
    name: str,
    channels: int,
    *,
    purpose: str,
    hw: tuple[int, int] | None = None,
) -> nn.Module:
    """``factory(channels)`` as :func:`make_layer` builds it, checked to normalise a
    (B, C, *hw) map (:func:`check_norm_runs`)."""
    norm = make_layer(factory, name, channels, purpose=purpose)
    check_norm_runs(norm, factory, channels, name, hw)
    return norm


def make_norm(
    norm_layer: LayerFactory,
    channels: int,
    owner: nn.Module,
    name: str = "norm_layer",
    hw: tuple[int, int] | None = None,
) -> nn.Module:
    """``norm_layer(channels)`` for a layer ``owner``, errors naming the argument ``name``;
    ``hw`` is the map size the norm sees when it is always the same (``(1, 1)``)."""
    return make_norm2d(
        norm_layer, name, channels, purpose=f"a norm of {type(owner).__name__}", hw=hw
    )


def make_act(act_layer: LayerFactory, owner: nn.Module) -> nn.Module:
    """``act_layer()`` for a layer ``owner``, errors naming the argument."""
    return make_layer(act_layer, "act_layer", purpose=f"an activation of {type(owner).__name__}")


def conv_out_size(
    size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1
) -> int:
    """The output side of a convolution (or a floor-mode pooling) on an input side ``size``."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def strided_min_size(
    num_stages: int, kernel_size: int, padding: int, stride: int = 2, *, start: int = 1
) -> int:
    """Smallest side a chain of ``num_stages`` strided convs accepts so that its output side is
    at least ``start`` (each stage's output side >= 1)."""
    size = start
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
        make_norm2d(norm_layer, "norm_layer", channels, purpose=f"the norm of {where}"),
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
    norm_name: str = "norm_layer",
    norm_hw: tuple[int, int] | None = None,
) -> nn.Sequential:
    """``kernel_size`` conv ("same" padding, bias only without a norm) -> norm -> act.

    ``norm_name`` is the argument errors about the norm name; ``norm_hw`` the map size the norm
    always sees, if it does (:func:`check_norm_runs`)."""
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
            make_norm2d(
                norm_layer, norm_name, out_channels, purpose=f"the norm of {where}", hw=norm_hw
            )
        )
    layers.append(make_layer(act_layer, "act_layer", purpose=f"the activation of {where}"))
    return nn.Sequential(*layers)


def has_hooks(m: nn.Module) -> bool:
    """Whether ``m`` has forward or backward hooks of its own (which may change its output or
    gradients, so that it is not just its forward code)."""
    return bool(
        m._forward_pre_hooks or m._forward_hooks or m._backward_hooks or m._backward_pre_hooks
    )


def plain_sequential(m: nn.Module) -> TypeGuard[nn.Sequential]:
    """``m`` is a non-empty ``nn.Sequential`` (or a subclass keeping its forward) without hooks:
    its output is exactly its last child's."""
    return (
        isinstance(m, nn.Sequential)
        and type(m).forward is nn.Sequential.forward
        and not has_hooks(m)
        and len(m) > 0
    )


def last_module(m: nn.Module) -> nn.Module:
    """The module whose output ``m``'s output is: ``m`` itself, or the last child of a plain
    ``Sequential`` followed down (a separable conv written as ``Sequential(depthwise,
    pointwise)`` ends in its pointwise conv; a head ``Sequential(..., conv)`` in its classifier)."""
    while plain_sequential(m):
        m = m[-1]
    return m
