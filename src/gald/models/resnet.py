"""Dilated (atrous) ResNet-50/101 with the deep stem: the backbone of GALD-Net.

Reference: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (bottleneck
blocks, stride on the 3x3 conv); the deep stem of Bag-of-Tricks ResNet-C; dilation with
multi-grid as in DeepLabv3 (Chen et al., 2017); the configuration of the GALD-Net authors
(github.com/lxtGH/GALD-DGCNet, X. Li et al., BMVC 2019).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._checkpoint import checkpoint_once
from .._layers import LayerFactory, conv_out_size, make_norm2d
from .._validate import (
    check_bool,
    check_factory,
    check_feature,
    check_int,
    check_positive_int_sequence,
)
from ._resnet_keys import DEPTHS, RESNET_LAYERS, layer_blocks, resnet_d_problem

__all__ = ["DilatedResNet"]

_EXPANSION = 4


class _Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1, each followed by norm; ReLU after the residual sum."""

    # each norm is applied straight to its conv's output: gald.fuse folds them
    _fuse_pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def __init__(
        self,
        in_channels: int,
        planes: int,
        *,
        stride: int,
        dilation: int,
        norm_layer: LayerFactory,
    ) -> None:
        super().__init__()
        out_channels = planes * _EXPANSION
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = norm_layer(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                norm_layer(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _check_checkpoint(
    net: DilatedResNet, state_dict: Mapping[str, Any], prefix: str, strict: bool
) -> None:
    """Raise a ``ValueError`` naming what was expected and received when the state dict's keys
    under ``prefix`` hold a ResNet of another depth (with ``strict`` only: otherwise missing and
    unexpected keys are allowed), a stem of the other layout or the ResNet-D layout (shape
    mismatches either way). Anything else is left to :meth:`torch.nn.Module.load_state_dict`."""
    where = f"DilatedResNet (keys {prefix}*)" if prefix else "DilatedResNet"
    keys = [k for k in state_dict if isinstance(k, str)]
    if not prefix and keys and all(k.startswith("module.") for k in keys):
        raise ValueError(
            f"{where}: every key of the state dict starts with 'module.' (a DataParallel or "
            "DistributedDataParallel checkpoint): convert it with "
            "gald.convert.imagenet_to_backbone, which strips the prefix, or strip it with "
            "torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(state_dict, 'module.')"
        )
    if (problem := resnet_d_problem(state_dict, prefix)) is not None:
        raise ValueError(f"{where}: {problem}")
    if f"{prefix}conv2.weight" in state_dict:
        raise ValueError(
            f"{where}: the state dict has the deep stem as separate conv1, conv2, conv3 (an "
            "ImageNet checkpoint): convert it with gald.convert.imagenet_to_backbone"
        )
    plain, deep = f"{prefix}conv1.weight" in state_dict, f"{prefix}conv1.0.weight" in state_dict
    if net.deep_stem and plain:
        shape = getattr(state_dict[f"{prefix}conv1.weight"], "shape", None)
        raise ValueError(
            f"{where}: the state dict has a 7x7 stem (conv1.weight of shape "
            f"{tuple(shape) if shape is not None else '?'}); this DilatedResNet has the deep "
            "stem: build DilatedResNet(deep_stem=False)"
        )
    if not net.deep_stem and deep:
        raise ValueError(
            f"{where}: the state dict has the deep stem (conv1.0 ... conv1.6); this "
            "DilatedResNet has the 7x7 stem: build DilatedResNet(deep_stem=True)"
        )
    blocks = layer_blocks(keys, prefix)
    expected = RESNET_LAYERS[net.depth]
    if not any(blocks) or blocks == expected:
        return
    found = DEPTHS.get(blocks)  # type: ignore[arg-type]
    received = (
        f"is a ResNet-{found} ({blocks[2]} blocks in layer3)"
        if found is not None
        else f"has ResNet layers with {list(blocks)} blocks"
    )
    message = (
        f"{where}: the state dict {received}; this DilatedResNet has depth={net.depth} "
        f"({list(expected)} blocks)"
        + (f": build it with depth={found}" if found is not None else "")
    )
    if strict:
        raise ValueError(message)
    # strict=False allows missing and unexpected keys on purpose (a subset of the layers loads
    # quietly), but a layer present with another number of blocks, part of it left at its random
    # initialisation, is rarely wanted: say so without refusing.
    if any(got and got != want for got, want in zip(blocks, expected, strict=True)):
        warnings.warn(message, stacklevel=3)


def _pool_out_ceil(size: int, kernel: int, stride: int, padding: int) -> int:
    out = -(-(size + 2 * padding - kernel) // stride) + 1
    if (out - 1) * stride >= size + padding:  # the last window must start inside the input
        out -= 1
    return out


class DilatedResNet(nn.Module):
    r"""Dilated ResNet-50/101 returning the ``layer3`` and ``layer4`` features.

    Reference: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (bottleneck
    blocks, stride on the 3x3 conv); the deep stem of Bag-of-Tricks ResNet-C; dilation with
    multi-grid as in DeepLabv3 (Chen et al., 2017); the configuration of the GALD-Net authors
    (github.com/lxtGH/GALD-DGCNet, X. Li et al., BMVC 2019).

    Stem (``deep_stem=True``): three 3x3 convs 3->64 (stride 2), 64->64, 64->128 with norm + ReLU
    between them, then norm + ReLU, then a 3x3 stride-2 max-pool with ``ceil_mode=True``. With
    ``deep_stem=False`` the stem is the classic 7x7 stride-2 conv to 64 channels, norm + ReLU and
    the max-pool in floor mode, as torchvision's ResNet (so its weights give the same feature
    grid). Then bottleneck
    layers ``[3, 4, 6, 3]`` (depth 50) or ``[3, 4, 23, 3]`` (depth 101); ``layer2`` has stride 2.

    - ``output_stride=8``: ``layer3`` dilation 2, ``layer4`` dilation 4 times ``multi_grid``
      (the default ``(1, 2, 4)`` gives 4, 8, 16), as the GALD-Net authors.
    - ``output_stride=16``: ``layer3`` stride 2, ``layer4`` dilation 2 times ``multi_grid``.

    The multi-grid factors apply to the three blocks of ``layer4``, one each. Parameter names follow
    the authors' checkpoints (``conv1`` is an ``nn.Sequential`` stem, then ``bn1``,
    ``layer1``-``layer4``) so their weights load directly; see
    :func:`gald.convert.imagenet_to_backbone` for ImageNet weights in either stem layout.

    Args:
        depth: 50 or 101.
        output_stride: 8 or 16.
        multi_grid: dilation factors of the three ``layer4`` blocks, one per block, or one
            factor for all of them.
        deep_stem: the three-conv stem (``True``, 128 channels) or the 7x7 stem (``False``).
        norm_layer: normalisation factory, e.g. ``nn.SyncBatchNorm`` or torchvision's
            ``FrozenBatchNorm2d``.

    Attributes:
        channels: ``(1024, 2048)``, the widths of the two returned features.
        output_stride: the stride of both features.

    Shape:
        - Input: :math:`(B, 3, H, W)`
        - Output: ``(c3, c4)`` of shapes :math:`(B, 1024, h, w)` and :math:`(B, 2048, h, w)`, with
          :math:`h, w` given by :meth:`feature_size` (about :math:`H/8` at output stride 8).
    """

    grad_checkpointing: bool = False  # also for instances pickled before the switch existed

    def __init__(
        self,
        depth: int = 101,
        *,
        output_stride: int = 8,
        multi_grid: Sequence[int] = (1, 2, 4),
        deep_stem: bool = True,
        norm_layer: LayerFactory = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        depth = check_int(depth, "depth")
        if depth not in RESNET_LAYERS:
            raise ValueError(f"depth must be one of {sorted(RESNET_LAYERS)}, got {depth!r}")
        output_stride = check_int(output_stride, "output_stride")
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride!r}")
        grid = check_positive_int_sequence(multi_grid, "multi_grid")
        if len(grid) not in (1, RESNET_LAYERS[depth][3]):
            raise ValueError(
                f"multi_grid must hold one dilation factor per layer4 block "
                f"({RESNET_LAYERS[depth][3]}) or one for all of them, got {len(grid)}: {grid}"
            )
        deep_stem = check_bool(deep_stem, "deep_stem")
        check_factory(norm_layer, "norm_layer")
        self.depth = depth
        self.output_stride = output_stride
        self.multi_grid = grid
        self.deep_stem = deep_stem
        self.channels: tuple[int, int] = (256 * _EXPANSION, 512 * _EXPANSION)

        stem_width = 128 if deep_stem else 64
        self.conv1: nn.Module
        if deep_stem:
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False),
                # built through make_norm2d: a factory that does not build a module, or builds
                # one for another layout, is refused here by name
                make_norm2d(norm_layer, "norm_layer", 64, purpose="a norm of DilatedResNet"),
                nn.ReLU(inplace=True),
                nn.Conv2d(64, 64, 3, padding=1, bias=False),
                norm_layer(64),
                nn.ReLU(inplace=True),
                nn.Conv2d(64, 128, 3, padding=1, bias=False),
            )
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = make_norm2d(
            norm_layer, "norm_layer", stem_width, purpose="a norm of DilatedResNet"
        )
        # bn1 follows the stem's last conv: gald.fuse folds it
        self._fuse_pairs = (("conv1.6" if deep_stem else "conv1", "bn1"),)
        self.relu = nn.ReLU(inplace=True)
        # ceil mode as the authors with their deep stem; floor mode as torchvision's 7x7 ResNet
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=deep_stem)

        blocks = RESNET_LAYERS[depth]
        if output_stride == 8:
            strides, dilations = (1, 2, 1, 1), (1, 1, 2, 4)
        else:
            strides, dilations = (1, 2, 2, 1), (1, 1, 1, 2)
        in_channels = stem_width
        layers: list[nn.Sequential] = []
        for index, (planes, n, stride, dilation) in enumerate(
            zip((64, 128, 256, 512), blocks, strides, dilations)
        ):
            grids = (grid * n if len(grid) == 1 else grid) if index == 3 else (1,) * n
            stage = []
            for i in range(n):
                stage.append(
                    _Bottleneck(
                        in_channels,
                        planes,
                        stride=stride if i == 0 else 1,
                        dilation=dilation * grids[i],
                        norm_layer=norm_layer,
                    )
                )
                in_channels = planes * _EXPANSION
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self._init_weights()
        self.grad_checkpointing = False

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm)) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def feature_size(self, size: int) -> int:
        """The side of both returned features for an input side ``size`` (0 when too small)."""
        s = conv_out_size(size, 3 if self.deep_stem else 7, 2, 1 if self.deep_stem else 3)
        if s < 1:
            return 0
        s = _pool_out_ceil(s, 3, 2, 1) if self.deep_stem else conv_out_size(s, 3, 2, 1)
        s = conv_out_size(s, 3, 2, 1)  # layer2
        if self.output_stride == 16:
            s = conv_out_size(s, 3, 2, 1)  # layer3
        return max(s, 0)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """:meth:`torch.nn.Module.load_state_dict`, first raising a ``ValueError`` that names the
        depth or the stem layout when the checkpoint has another one."""
        _check_checkpoint(self, state_dict, "", strict)
        return super().load_state_dict(state_dict, strict, assign)

    def extra_repr(self) -> str:
        return (
            f"depth={self.depth}, output_stride={self.output_stride}, "
            f"multi_grid={self.multi_grid}, deep_stem={self.deep_stem}"
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each bottleneck block in backward instead of keeping its activations
        (timm's switch): the backbone then keeps about one feature map per block, at the cost
        of a second forward of every block. The blocks run under ``torch.utils.checkpoint``
        (non-reentrant) and their BatchNorm running statistics are updated once per step, as
        without checkpointing (the LD's :meth:`~gald.LocalDistribution.set_grad_checkpointing`
        says more, the ``torch.compile`` backends included)."""
        self.grad_checkpointing = check_bool(enable, "enable")

    def _layer(self, layer: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return layer(x)
        for block in layer:
            x = checkpoint_once(block, x)
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_feature(x, 3, name="images", who=type(self).__name__)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self._layer(self.layer2, self._layer(self.layer1, x))
        c3 = self._layer(self.layer3, x)
        c4 = self._layer(self.layer4, c3)
        return c3, c4
