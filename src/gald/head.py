"""Segmentation heads: the GALD head and the authors' deep-supervision (auxiliary) head.

Reference: the ``GALDHead`` and ``dsn`` of github.com/lxtGH/GALD-DGCNet (``GALDNet``),
restated with the hard-coded 512 removed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ._layers import LayerFactory, conv_norm_act, make_act, make_norm
from ._validate import check_factory, check_feature, check_positive_int, check_probability
from .block import GALD

_GALD_ONLY = frozenset(inspect.signature(GALD).parameters) - {
    "in_channels", "ga_module", "ga_kwargs", "padding", "norm_layer", "act_layer", "out_channels"
}  # fmt: skip
"""GALD arguments a head passes on as they are (the others it sets itself)."""


class GALDHead(nn.Module):
    r"""GALD segmentation head on a backbone feature.

    Reference: the ``GALDHead`` and ``dsn`` of github.com/lxtGH/GALD-DGCNet (``GALDNet``), restated
    with the hard-coded 512 removed.

    ``conva`` (3x3 conv -> norm -> act) -> :class:`~gald.GALD` -> ``convb`` (3x3 conv -> norm ->
    act) -> concat with the input -> ``bottleneck`` (3x3 conv -> norm -> act) -> Dropout2d ->
    ``cls`` (1x1 conv with bias). Unlike the authors' head (whose classifier hard-codes 512),
    ``channels`` may be any width the GA takes (the default CGNL, with 8 groups, takes multiples
    of 16; the error names the widths it accepts).

    ``norm_layer`` and ``act_layer`` reach every layer of the head: its convs, the GALD ``down``
    stage, the LD and a GA given by name, or as a class whose constructor names them
    (``norm_layer=nn.SyncBatchNorm`` then leaves no ``BatchNorm2d`` anywhere inside, unless
    ``ga_kwargs`` sets another norm); so does a keyword ``functools.partial`` of such a class.
    A GA given as a ready module, or built by any other callable, keeps the layers it builds;
    convert those with ``nn.SyncBatchNorm.convert_sync_batchnorm``. ``ld=False`` (through ``gald_kwargs``) gives
    the GA-only ablation.

    Args:
        in_channels: channels of the backbone feature (2048 for a ResNet-50/101 layer4).
        num_classes: number of output classes.
        channels: inner width of the head.
        ga_module: the GA inside the GALD block (see :class:`~gald.GALD`).
        ga_kwargs: keyword arguments of the GA.
        padding: padding of the GALD ``down`` conv and LD convs (``0`` = the authors' code).
        dropout: Dropout2d probability before the classifier (the authors use none).
        norm_layer: normalisation factory for every norm of the head, its GALD block and its GA
            (e.g. ``nn.SyncBatchNorm``).
        act_layer: activation factory, likewise (``nn.ReLU`` builds ``ReLU()``; pass
            ``functools.partial(nn.ReLU, inplace=True)`` to save memory).
        **gald_kwargs: further :class:`~gald.GALD` arguments (``ld``, ``offset``,
            ``final_act``, ``downsample``, ``impl``, ...).

    Shape:
        - Input: :math:`(B, C_{in}, H, W)`
        - Output: :math:`(B, \text{num\_classes}, H, W)`
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        channels: int = 512,
        ga_module: str | type[nn.Module] | nn.Module | Callable[..., nn.Module] = "cgnl",
        ga_kwargs: Mapping[str, Any] | None = None,
        padding: int = 1,
        dropout: float = 0.0,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
        **gald_kwargs: Any,
    ) -> None:
        super().__init__()
        in_channels = self.in_channels = check_positive_int(in_channels, "in_channels")
        num_classes = self.num_classes = check_positive_int(num_classes, "num_classes")
        channels = self.channels = check_positive_int(channels, "channels")
        check_factory(norm_layer, "norm_layer")
        check_factory(act_layer, "act_layer")
        dropout = check_probability(dropout, "dropout")
        if "out_channels" in gald_kwargs:
            raise ValueError(
                "GALDHead keeps the GALD block at `channels`; out_channels is not a head argument"
            )
        unknown = sorted(set(gald_kwargs) - _GALD_ONLY)
        if unknown:
            raise TypeError(
                f"GALDHead got unexpected keyword arguments {unknown}: neither GALDHead nor GALD "
                f"takes them (the GALD arguments a head passes on: {sorted(_GALD_ONLY)})"
            )
        self.conva = conv_norm_act(
            in_channels, channels, norm_layer=norm_layer, act_layer=act_layer
        )
        try:
            self.gald = GALD(
                channels,
                ga_module,
                ga_kwargs=ga_kwargs,
                padding=padding,
                norm_layer=norm_layer,
                act_layer=act_layer,
                **gald_kwargs,
            )
        except (ValueError, TypeError) as exc:  # the block's in_channels is the head's channels
            raise type(exc)(f"GALDHead(channels={channels}): {exc}") from exc
        if self.gald.out_channels != channels:
            raise ValueError(
                f"the GA of a GALDHead must keep the width channels={channels}, got a GA "
                f"returning {self.gald.out_channels} channels"
            )
        self.convb = conv_norm_act(channels, channels, norm_layer=norm_layer, act_layer=act_layer)
        self.bottleneck = conv_norm_act(
            in_channels + channels, channels, norm_layer=norm_layer, act_layer=act_layer
        )
        self.dropout = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(channels, num_classes, 1, bias=True)
        self.min_size = self.gald.min_size
        self._small_input_remedy = self.gald._small_input_remedy

    @classmethod
    def official(
        cls,
        in_channels: int = 2048,
        num_classes: int = 19,
        *,
        channels: int = 512,
        norm_layer: LayerFactory = nn.BatchNorm2d,
    ) -> GALDHead:
        """The authors' configuration: padding 0 in ``down`` and the LD, CGNL with 8 groups and
        ``C/2`` inner channels, ``final_act=True``, offset 2, no dropout.

        ``norm_layer`` (e.g. ``nn.SyncBatchNorm`` for training on several GPUs, as the authors)
        changes no parameter or state-dict key. Load the released weights with
        :func:`gald.convert.official_to_gald`.
        """
        return cls(
            in_channels,
            num_classes,
            channels=channels,
            norm_layer=norm_layer,
            ga_module="cgnl",
            ga_kwargs={"groups": 8, "use_scale": False},
            padding=0,
            dropout=0.0,
            offset=2.0,
            final_act=True,
        )

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, num_classes={self.num_classes}, "
            f"channels={self.channels}, min_size={self.min_size}"
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the LD branch in backward (see :meth:`gald.GALD.set_grad_checkpointing`)."""
        self.gald.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature(
            x,
            self.in_channels,
            min_hw=self.min_size,
            who=type(self).__name__,
            remedy=self._small_input_remedy,
        )
        y = self.convb(self.gald(self.conva(x)))
        y = self.bottleneck(torch.cat([x, y], dim=1))
        return self.cls(self.dropout(y))


class AuxHead(nn.Module):
    r"""The authors' deep-supervision head (``dsn``), usually on ResNet layer3.

    Reference: the ``GALDHead`` and ``dsn`` of github.com/lxtGH/GALD-DGCNet (``GALDNet``), restated
    with the hard-coded 512 removed.

    3x3 conv (with bias) -> norm -> act -> Dropout2d -> 1x1 conv (with bias). Train it with
    plain cross-entropy weighted 0.4 next to the main loss: the deep supervision of PSPNet
    (H. Zhao, J. Shi, X. Qi, X. Wang, J. Jia, "Pyramid Scene Parsing Network", CVPR 2017), as
    the GALD authors use it.

    Args:
        in_channels: channels of the feature (1024 for ResNet layer3).
        num_classes: number of output classes.
        channels: inner width.
        dropout: Dropout2d probability.
        norm_layer: normalisation factory.
        act_layer: activation factory.

    Shape:
        - Input: :math:`(B, C_{in}, H, W)`
        - Output: :math:`(B, \text{num\_classes}, H, W)`
    """

    # norm(conv(x)) in forward: gald.fuse folds the pair
    _fuse_pairs = (("conv", "norm"),)

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        channels: int = 512,
        dropout: float = 0.1,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        in_channels = self.in_channels = check_positive_int(in_channels, "in_channels")
        num_classes = self.num_classes = check_positive_int(num_classes, "num_classes")
        channels = self.channels = check_positive_int(channels, "channels")
        check_factory(norm_layer, "norm_layer")
        check_factory(act_layer, "act_layer")
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1, bias=True)
        self.norm = make_norm(norm_layer, channels, self)
        self.act = make_act(act_layer, self)
        self.dropout = nn.Dropout2d(check_probability(dropout, "dropout"))
        self.cls = nn.Conv2d(channels, num_classes, 1, bias=True)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, num_classes={self.num_classes}, "
            f"channels={self.channels}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature(x, self.in_channels, who=type(self).__name__)
        return self.cls(self.dropout(self.act(self.norm(self.conv(x)))))
