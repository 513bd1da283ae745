"""GALD-Net: a backbone, the GALD head on its deepest feature and the auxiliary head on the one before.

Reference: X. Li et al., "Global Aggregation then Local Distribution in Fully Convolutional
Networks", BMVC 2019 (arXiv 1909.07229); the authors' ``GALDNet`` (github.com/lxtGH/GALD-DGCNet).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._layers import LayerFactory
from .._modes import eval_mode
from .._validate import (
    check_bool,
    check_factory,
    check_feature,
    check_int,
    check_positive_int,
)
from ..head import AuxHead, GALDHead
from .resnet import DilatedResNet, _check_checkpoint

__all__ = ["GALDNet"]

_Key = str | int
_PROBE_SIZE = 64


def _check_in_features(value: object) -> tuple[_Key, _Key] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(
            "in_features must be None or a pair of feature names (str) or indices (int), "
            f"got {type(value).__name__} {value!r}"
        )
    if len(value) != 2:
        raise ValueError(
            f"in_features must be a pair (the c3 feature, then the c4 one), got {len(value)} "
            f"items: {value!r}"
        )
    keys = [
        k if isinstance(k, str) else check_int(k, f"in_features[{i}]") for i, k in enumerate(value)
    ]
    return (keys[0], keys[1])


def _check_in_channels(value: object) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(
            f"in_channels must be None or a pair of ints (c3, c4), got {type(value).__name__} "
            f"{value!r}"
        )
    if len(value) != 2:
        raise ValueError(
            f"in_channels must be a pair of ints (c3, c4), got {len(value)} items: {value!r}"
        )
    return (
        check_positive_int(value[0], "in_channels[0]"),
        check_positive_int(value[1], "in_channels[1]"),
    )


def _pick(features: object, in_features: tuple[_Key, _Key] | None, who: str) -> tuple[Any, Any]:
    """The two features of a backbone output: ``in_features`` keys or indices, else the last two."""
    if isinstance(features, Mapping):
        keys = list(features)
        chosen = in_features if in_features is not None else tuple(keys[-2:])
        if len(keys) < 2 or any(k not in features for k in chosen):
            raise ValueError(
                f"{who}: the backbone returned a dict with keys {keys}; expected the keys "
                f"{list(chosen) if in_features is not None else 'of at least two features'}"
            )
        return features[chosen[0]], features[chosen[1]]
    if isinstance(features, (list, tuple)):
        indices = in_features if in_features is not None else (-2, -1)
        first, second = indices
        if (
            len(features) < 2
            or not isinstance(first, int)
            or not isinstance(second, int)
            or not all(-len(features) <= i < len(features) for i in (first, second))
        ):
            raise ValueError(
                f"{who}: the backbone returned a {type(features).__name__} of {len(features)} "
                f"features; cannot pick in_features={indices!r} (indices into it)"
            )
        return features[first], features[second]
    raise TypeError(
        f"{who}: the backbone must return a (c3, c4) pair, a list/tuple or a dict of features, "
        f"got {type(features).__name__}"
    )


def _channels_last_features(backbone: nn.Module) -> bool:
    """Whether the backbone says it returns ``(B, H, W, C)`` features: timm's ``output_fmt``
    attribute (``"NCHW"`` or ``"NHWC"``, a string enum) on its ``features_only`` models. A
    backbone without the attribute returns ``(B, C, H, W)``."""
    fmt = getattr(backbone, "output_fmt", None)
    if fmt is None:
        return False
    text = str(getattr(fmt, "value", fmt))
    if text not in ("NCHW", "NHWC"):
        raise ValueError(
            f"GALDNet: the backbone ({type(backbone).__name__}) declares output_fmt={text!r}; "
            "its features must be 2-D maps, 'NCHW' or 'NHWC' (tokens of a vision transformer "
            "need reshaping to a map first)"
        )
    return text == "NHWC"


def _to_nchw(feature: Any, nhwc: bool) -> Any:
    return feature.permute(0, 3, 1, 2) if nhwc and isinstance(feature, torch.Tensor) else feature


def _declared_channels(backbone: nn.Module, in_features: tuple[_Key, _Key] | None) -> Any:
    """Widths the backbone declares: a ``channels`` attribute, or timm's ``feature_info``."""
    declared = getattr(backbone, "channels", None)
    if declared is None:
        info = getattr(backbone, "feature_info", None)
        channels_fn = getattr(info, "channels", None)
        if callable(channels_fn):
            declared = channels_fn()
            if isinstance(in_features, tuple) and isinstance(in_features[0], str):
                # a timm FeatureDictNet: its output keys are its return_layers' values (module
                # name -> key, str(out_index) unless an out_map renamed them)
                names_fn = getattr(info, "module_name", None)
                keys = getattr(backbone, "return_layers", None)
                if callable(names_fn) and isinstance(keys, Mapping):
                    names = names_fn()
                    if all(n in keys for n in names):
                        return {str(keys[n]): c for n, c in zip(names, declared)}
                return None  # the keys are unknown: the dry run finds them
    if isinstance(declared, (Mapping, list, tuple)):
        return declared
    return None


def _probe_channels(
    backbone: nn.Module, in_features: tuple[_Key, _Key] | None, nhwc: bool
) -> tuple[int, int]:
    """Run the backbone on a small zero image (eval mode, no grad) and read the widths.

    A second, taller image checks that what was read is a width: dimension 1 of a
    ``(B, H, W, C)`` feature is its height, which follows the input's (a backbone that refuses
    the taller image is taken at the first reading)."""
    param = next(iter(backbone.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32

    def run(height: int) -> Any:
        with eval_mode(backbone), torch.no_grad():
            return backbone(torch.zeros(1, 3, height, _PROBE_SIZE, device=device, dtype=dtype))

    def widths_of(features: Any) -> tuple[int, int]:
        c3, c4 = (_to_nchw(f, nhwc) for f in _pick(features, in_features, "GALDNet"))
        if not all(isinstance(f, torch.Tensor) and f.ndim == 4 for f in (c3, c4)):
            raise TypeError(
                "GALDNet: the two picked backbone features must be (B, C, H, W) tensors, got "
                f"{type(c3).__name__} and {type(c4).__name__}"
            )
        return int(c3.shape[1]), int(c4.shape[1])

    try:
        features = run(_PROBE_SIZE)
    except Exception as err:
        raise ValueError(
            "GALDNet: could not infer the backbone's feature widths from a dry run on a "
            f"(1, 3, {_PROBE_SIZE}, {_PROBE_SIZE}) input ({type(err).__name__}: {err}); pass "
            "in_channels=(c3, c4)"
        ) from err
    widths = widths_of(features)
    taller = 2 * _PROBE_SIZE
    try:
        features = run(taller)
    except Exception:  # it takes only some sizes: the first reading stands
        return widths
    again = widths_of(features)
    if again != widths:
        raise ValueError(
            "GALDNet: dimension 1 of the backbone's features follows the input height "
            f"({widths} at {_PROBE_SIZE}x{_PROBE_SIZE}, {again} at {taller}x{_PROBE_SIZE}), "
            "so the features look like (B, H, W, C); a backbone that returns channels-last "
            "features should say so with an output_fmt = 'NHWC' attribute (as timm's "
            "features_only models do), or pass in_channels=(c3, c4)"
        )
    return widths


def _head_width(head: nn.Module) -> int | None:
    width = getattr(head, "in_channels", None)
    return width if isinstance(width, int) else None


def _check_head_classes(head: nn.Module, num_classes: int, what: str) -> None:
    """A head that declares ``num_classes`` (gald's heads do) must predict the network's."""
    declared = getattr(head, "num_classes", None)
    if isinstance(declared, int) and declared != num_classes:
        raise ValueError(
            f"{what} predicts num_classes={declared}, but the network has num_classes={num_classes}"
        )


class GALDNet(nn.Module):
    r"""A segmentation network: backbone, :class:`~gald.GALDHead` on ``c4``, :class:`~gald.AuxHead` on ``c3``.

    The forward follows torchvision's segmentation models: it returns a dict with ``"out"``, the
    head's logits bilinearly upsampled to the input size (``align_corners=True``), and, when the
    network has an auxiliary head, ``"aux"``, the auxiliary logits upsampled the same way (in
    train and eval mode alike).

    **The backbone** may be any module whose output is

    - a pair or list/tuple of features: ``in_features`` holds two indices into it (default the last
      two, so a ``(c3, c4)`` pair or timm's ``features_only=True`` list work as they are);
    - a dict of features (torchvision's ``IntermediateLayerGetter``, timm's ``FeatureDictNet``):
      ``in_features`` holds two keys (default the last two keys in order).

    The first picked feature feeds the auxiliary head, the second the GALD head. Features are
    ``(B, C, H, W)``, or ``(B, H, W, C)`` from a backbone whose ``output_fmt`` attribute is
    ``"NHWC"`` (timm's ``features_only`` Swin and other channels-last models): those are
    permuted (a view, channels-last in memory, no copy) before the heads. The two widths
    come from ``in_channels`` when given, else from the backbone's own declaration (a
    ``channels`` attribute holding a list/tuple/dict of widths, as :class:`DilatedResNet`, or
    timm's ``feature_info.channels()``, keyed by a ``FeatureDictNet``'s output keys, ``"3"``
    and ``"4"`` for a ResNet's layer3 and layer4), else from one dry run of the backbone on a
    ``(1, 3, 64, 64)`` zero image in eval mode (the train/eval flags are restored afterwards).
    Heads passed in, and ``in_channels`` when the backbone declares its widths, must match them:
    a mismatch raises a ``ValueError`` at construction.

    Args:
        num_classes: number of classes.
        backbone: the backbone; ``None`` builds a :class:`DilatedResNet` of ``depth`` at
            ``output_stride`` with ``norm_layer``.
        depth: depth of the default backbone (50 or 101); only with ``backbone=None``.
        output_stride: output stride of the default backbone (8 or 16); only with
            ``backbone=None``.
        head: ``None`` (a :class:`~gald.GALDHead` with its defaults), a dict of
            :class:`~gald.GALDHead` keyword arguments, or a ready module mapping ``c4`` to logits.
        aux: ``True`` (an :class:`~gald.AuxHead` on ``c3``), ``False`` (none) or a ready module
            mapping ``c3`` to logits.
        in_features: the two features to pick from the backbone's output (see above).
        in_channels: the widths ``(c3, c4)`` of those features.
        norm_layer: normalisation factory of the default backbone and heads.

    Attributes:
        backbone: the backbone module.
        head: the main head, mapping ``c4`` to logits.
        aux_head: the auxiliary head on ``c3``; ``None`` without one.
        in_channels: the widths ``(c3, c4)`` the heads take.
        nhwc_features: whether the backbone's features are permuted from ``(B, H, W, C)``.
        min_input_size: the smallest input side the network accepts (known for a
            :class:`DilatedResNet` backbone, else 1; the head still checks its own input).

    Shape:
        - Input: :math:`(B, 3, H, W)`
        - Output: ``{"out": (B, num_classes, H, W), "aux": (B, num_classes, H, W)}``
    """

    def __init__(
        self,
        num_classes: int,
        *,
        backbone: nn.Module | None = None,
        depth: int | None = None,
        output_stride: int | None = None,
        head: nn.Module | Mapping[str, Any] | None = None,
        aux: bool | nn.Module = True,
        in_features: Sequence[_Key] | None = None,
        in_channels: Sequence[int] | None = None,
        norm_layer: LayerFactory = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        num_classes = self.num_classes = check_positive_int(num_classes, "num_classes")
        check_factory(norm_layer, "norm_layer")
        self.in_features = _check_in_features(in_features)
        explicit = _check_in_channels(in_channels)
        if backbone is None:
            backbone = DilatedResNet(
                101 if depth is None else depth,
                output_stride=8 if output_stride is None else output_stride,
                norm_layer=norm_layer,
            )
        elif not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module or None, got {type(backbone).__name__}")
        elif depth is not None or output_stride is not None:
            raise ValueError(
                "depth and output_stride configure the default backbone; got them together with "
                f"backbone={type(backbone).__name__}"
            )
        self.backbone = backbone
        self.nhwc_features = _channels_last_features(backbone)

        declared = _declared_channels(backbone, self.in_features)
        if declared is not None:
            c3, c4 = _pick(declared, self.in_features, "GALDNet (declared channels)")
            said = (int(c3), int(c4))
            if explicit is not None and explicit != said:
                raise ValueError(
                    f"in_channels={explicit}, but the backbone ({type(backbone).__name__}) "
                    f"declares {said} for its features {self._feature_name(0)} and "
                    f"{self._feature_name(1)}; leave in_channels out to use the declared widths"
                )
        if explicit is not None:
            widths = explicit
        elif declared is not None:
            widths = said
        else:
            widths = _probe_channels(backbone, self.in_features, self.nhwc_features)
        self.in_channels: tuple[int, int] = widths

        if head is None or isinstance(head, Mapping):
            taken = sorted({"in_channels", "num_classes"} & set(head or {}))
            if taken:
                raise ValueError(
                    f"head sets {taken}, which GALDNet sets itself (the backbone's second "
                    "feature width and num_classes); leave them out of the head dict"
                )
            kwargs = {"norm_layer": norm_layer, **dict(head or {})}
            head = GALDHead(widths[1], num_classes, **kwargs)
        elif not isinstance(head, nn.Module):
            raise TypeError(
                f"head must be None, a dict of GALDHead arguments or an nn.Module, "
                f"got {type(head).__name__}"
            )
        if (w := _head_width(head)) is not None and w != widths[1]:
            raise ValueError(
                f"head expects {w} input channels but the backbone's second feature "
                f"({self._feature_name(1)}) has {widths[1]}"
            )
        _check_head_classes(head, self.num_classes, "head")
        self.head = head

        aux_head: nn.Module | None
        if aux is True:
            aux_head = AuxHead(widths[0], num_classes, norm_layer=norm_layer)
        elif aux is False:
            aux_head = None
        elif isinstance(aux, nn.Module):
            aux_head = aux
        else:
            raise TypeError(f"aux must be a bool or an nn.Module, got {type(aux).__name__}")
        if aux_head is not None and (w := _head_width(aux_head)) is not None and w != widths[0]:
            raise ValueError(
                f"aux head expects {w} input channels but the backbone's first feature "
                f"({self._feature_name(0)}) has {widths[0]}"
            )
        if aux_head is not None:
            _check_head_classes(aux_head, self.num_classes, "aux head")
        self.aux_head = aux_head

        head_min = getattr(head, "min_size", 1)
        self.min_input_size = 1
        if isinstance(backbone, DilatedResNet) and isinstance(head_min, int):
            size = 1
            while backbone.feature_size(size) < head_min:
                size += 1
            self.min_input_size = size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch for the whole network: recompute in backward the backbone's blocks
        (when the backbone has a ``set_grad_checkpointing``, as :class:`DilatedResNet` and timm
        models do; another backbone is left as it is) and the head's LD branch (a head
        without the method is left as it is too)."""
        check_bool(enable, "enable")
        for part in (self.backbone, self.head):
            setter = getattr(part, "set_grad_checkpointing", None)
            if callable(setter):
                setter(enable)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, in_features={self.in_features}, "
            f"in_channels={self.in_channels}, aux={self.aux_head is not None}, "
            f"min_input_size={self.min_input_size}"
            + (", nhwc_features=True" if self.nhwc_features else "")
        )

    def _feature_name(self, i: int) -> str:
        return repr(self.in_features[i]) if self.in_features is not None else ("c3", "c4")[i]

    @classmethod
    def official(
        cls,
        *,
        depth: int = 101,
        num_classes: int = 19,
        norm_layer: LayerFactory = nn.BatchNorm2d,
    ) -> GALDNet:
        """The authors' GALD-Net: deep-stem :class:`DilatedResNet` at output stride 8,
        :meth:`gald.GALDHead.official` on ``layer4`` and :class:`~gald.AuxHead` on ``layer3``.

        71,394,790 parameters at depth 101 and 52,402,662 at depth 50 (19 classes), as the
        authors' models. Load their checkpoints with :func:`gald.convert.load_official_galdnet`.
        ``norm_layer`` reaches the backbone and both heads (``nn.SyncBatchNorm`` for training on
        several GPUs, as the authors); it changes no parameter or state-dict key.
        """
        return cls(
            num_classes,
            depth=depth,
            head=GALDHead.official(
                in_channels=2048, num_classes=num_classes, channels=512, norm_layer=norm_layer
            ),
            aux=True,
            norm_layer=norm_layer,
        )

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """:meth:`torch.nn.Module.load_state_dict`, first raising a ``ValueError`` that names the
        depth or the stem layout when the checkpoint's backbone has another one than a
        :class:`DilatedResNet` backbone."""
        if isinstance(self.backbone, DilatedResNet):
            _check_checkpoint(self.backbone, state_dict, "backbone.", strict)
        return super().load_state_dict(state_dict, strict, assign)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        least = self.min_input_size
        check_feature(
            images,
            None,
            name="images",
            min_hw=least,
            who="GALDNet",
            remedy=f"zero-pad them to at least {least}x{least} and crop the logits back, as "
            f"gald.models.slide_inference with crop_size >= {least} does",
        )
        c3, c4 = _pick(self.backbone(images), self.in_features, "GALDNet")
        c3, c4 = _to_nchw(c3, self.nhwc_features), _to_nchw(c4, self.nhwc_features)
        self._check_layout(c3, 0)
        self._check_layout(c4, 1)
        head_min = getattr(self.head, "min_size", 1)
        if isinstance(head_min, int) and (c4.shape[-2] < head_min or c4.shape[-1] < head_min):
            raise ValueError(
                f"GALDNet: images of size {tuple(images.shape[-2:])} give a backbone feature of "
                f"size {tuple(c4.shape[-2:])}, but the head needs at least {head_min}x{head_min}; "
                "use larger images"
            )
        size = images.shape[-2:]
        result = {"out": self._upsample(self.head(c4), size)}
        if self.aux_head is not None:
            result["aux"] = self._upsample(self.aux_head(c3), size)
        return result

    def _check_layout(self, feature: Any, i: int) -> None:
        """A feature whose last dimension, not its second, has the expected width is most
        likely ``(B, H, W, C)``: say so (the head would only report a wrong width)."""
        width = self.in_channels[i]
        if (
            isinstance(feature, torch.Tensor)
            and feature.ndim == 4
            and feature.shape[1] != width
            and feature.shape[-1] == width
        ):
            raise ValueError(
                f"GALDNet: the backbone's feature {self._feature_name(i)} has shape "
                f"{tuple(feature.shape)}, (B, H, W, C) with C={width} it seems; the heads take "
                "(B, C, H, W). A backbone that returns channels-last features should say so "
                "with an output_fmt = 'NHWC' attribute (as timm's features_only models do), "
                "and GALDNet then permutes them"
            )

    @staticmethod
    def _upsample(logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
        if logits.shape[-2:] == size:
            return logits
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
