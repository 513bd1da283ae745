"""GALD-Net: a backbone, the GALD head on its deepest feature and the auxiliary head on the one before.

Reference: X. Li et al., "Global Aggregation then Local Distribution in Fully Convolutional
Networks", BMVC 2019 (arXiv 1909.07229); the authors' ``GALDNet`` (github.com/lxtGH/GALD-DGCNet).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._layers import LayerFactory, last_module, probe_setting
from .._modes import dry_run
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


def _pick(
    features: object,
    in_features: tuple[_Key, _Key] | None,
    who: str,
    verb: str = "returned",
) -> tuple[Any, Any]:
    """The two features of a backbone output: ``in_features`` keys or indices, else the last two.

    ``verb`` says where ``features`` comes from in the messages: ``"returned"`` for a backbone
    output, ``"declares widths for"`` for a declaration read without running the backbone."""
    if isinstance(features, Mapping):
        keys = list(features)
        chosen = in_features if in_features is not None else tuple(keys[-2:])
        if len(keys) < 2 or any(k not in features for k in chosen):
            if in_features is None:
                expected = "expected at least two features"
            else:
                expected = f"in_features={in_features!r} must be two of its keys" + (
                    " (a dict is picked by key, not by position)"
                    if any(isinstance(k, int) for k in in_features)
                    else ""
                )
            raise ValueError(f"{who}: the backbone {verb} a dict with keys {keys}; {expected}")
        return features[chosen[0]], features[chosen[1]]
    if isinstance(features, (list, tuple)):
        indices = in_features if in_features is not None else (-2, -1)
        first, second = indices
        kind, n = type(features).__name__, len(features)
        if any(isinstance(k, str) for k in indices):
            raise ValueError(
                f"{who}: the backbone {verb} a {kind} of {n} features, which in_features picks "
                f"by integer index; got the names in_features={indices!r}: pass two indices "
                f"from {-n} to {n - 1} (in_features=(-2, -1) for the last two)"
            )
        if (
            n < 2
            or not isinstance(first, int)
            or not isinstance(second, int)
            or not all(-n <= i < n for i in (first, second))
        ):
            raise ValueError(
                f"{who}: the backbone {verb} a {kind} of {n} features; cannot pick "
                f"in_features={indices!r} (indices into it)"
            )
        return features[first], features[second]
    raise TypeError(
        f"{who}: the backbone must return a (c3, c4) pair, a list/tuple or a dict of features, "
        f"got {type(features).__name__}"
    )


def _names_features(in_features: tuple[_Key, _Key] | None) -> bool:
    return in_features is not None and any(isinstance(k, str) for k in in_features)


def _module_names(backbone: nn.Module) -> list[str] | None:
    """timm's ``feature_info.module_name()``: the modules the features come from, in order."""
    names_fn = getattr(getattr(backbone, "feature_info", None), "module_name", None)
    if not callable(names_fn):
        return None
    names = names_fn()
    return [str(n) for n in names] if isinstance(names, (list, tuple)) else None


def _returns_list(backbone: nn.Module) -> bool:
    """Whether a timm feature net returns a list, known without running it: a
    ``FeatureListNet`` (a ``FeatureDictNet`` whose forward returns the dict's values) or a
    feature net with ``return_dict=False`` (``FeatureHookNet``, ``FeatureGetterNet``)."""
    if any(cls.__name__ == "FeatureListNet" for cls in type(backbone).__mro__):
        return True
    return getattr(backbone, "return_dict", None) is False


def _check_names_for_a_list(backbone: nn.Module, in_features: tuple[_Key, _Key] | None) -> None:
    """Feature names given for a backbone known to return a list: say so at construction, with
    the indices of the named modules or output keys when they are found."""
    if not (_names_features(in_features) and _returns_list(backbone)):
        return
    assert in_features is not None
    names = _module_names(backbone)
    layers = getattr(backbone, "return_layers", None)
    keys = [str(v) for v in layers.values()] if isinstance(layers, Mapping) else None
    indices = []
    for k in in_features:
        found = [seq.index(k) for seq in (names, keys) if seq is not None and k in seq]
        indices.append(found[0] if found else None)
    suggestion = tuple(indices) if None not in indices else "(i, j)"
    modules = f" (its features come from the modules {names}, in that order)" if names else ""
    raise ValueError(
        f"GALDNet: in_features={in_features!r} names features, but the backbone "
        f"({type(backbone).__name__}) returns a list of them, which in_features picks by "
        f"integer index: pass in_features={suggestion}{modules}"
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
            if _names_features(in_features):
                assert in_features is not None
                return _timm_dict_channels(backbone, in_features, declared)
    if isinstance(declared, (Mapping, list, tuple)):
        return declared
    return None


def _timm_dict_channels(
    backbone: nn.Module, in_features: tuple[_Key, _Key], widths: Any
) -> dict[str, Any] | None:
    """A timm FeatureDictNet's widths by output key: its ``return_layers``' values (module name
    -> key, ``str(out_index)`` unless an ``out_map`` renamed them); ``None`` when the keys are
    unknown (the dry run finds them). Names that are not output keys are refused here."""
    names = _module_names(backbone)
    layers = getattr(backbone, "return_layers", None)
    if names is None or not isinstance(layers, Mapping) or not all(n in layers for n in names):
        return None
    keys = [str(layers[n]) for n in names]
    if any(k not in keys for k in in_features):
        hint = ""
        if all(k in names for k in in_features):
            given = tuple(keys[names.index(str(k))] for k in in_features)
            hint = (
                f"; {in_features!r} name its modules, whose output keys are {given!r}: pass "
                f"in_features={given!r}"
            )
        raise ValueError(
            f"GALDNet: in_features={in_features!r} are not output keys of the backbone "
            f"({type(backbone).__name__}), which returns a dict with keys {keys} (from its "
            f"modules {names}){hint}"
        )
    return dict(zip(keys, widths))


def _probe_channels(
    backbone: nn.Module, in_features: tuple[_Key, _Key] | None, nhwc: bool
) -> tuple[int, int]:
    """Run the backbone on a small zero image (eval mode, no grad) and read the widths.

    A second, taller image checks that what was read is a width: dimension 1 of a
    ``(B, H, W, C)`` feature is its height, which follows the input's (a backbone that refuses
    the taller image is taken at the first reading)."""
    device, dtype = probe_setting(backbone)

    def run(height: int) -> Any:
        with dry_run(backbone):
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


_OFFICIAL_KEY = re.compile(
    r"^(?:module\.)?(?:conv1\.|bn1\.|layer[1-4]\.|dsn\.|head\.(?:a2block|bottleneck\.3)\.)"
)


def _official_key(state_dict: Mapping[str, Any], net: nn.Module) -> str | None:
    """A key showing that ``state_dict`` is an unconverted checkpoint of the GALD-Net authors
    (their backbone keys at the top level, their head and ``dsn`` names), else ``None``."""
    keys = [k for k in state_dict if isinstance(k, str)]
    if any(k.removeprefix("module.").startswith("backbone.") for k in keys):
        return None
    own = set(net.state_dict(keep_vars=True))
    return next((k for k in keys if k not in own and _OFFICIAL_KEY.match(k)), None)


def _head_width(head: nn.Module) -> int | None:
    width = getattr(head, "in_channels", None)
    return width if isinstance(width, int) else None


def _declared_classes(head: nn.Module) -> int | None:
    """The number of classes ``head`` predicts when its structure says: a ``num_classes``
    attribute (gald's heads), or the ``out_channels`` of a conv that is the head or ends a plain
    ``nn.Sequential`` head; ``None`` otherwise (checked at the first forward instead)."""
    declared = getattr(head, "num_classes", None)
    if isinstance(declared, int):
        return declared
    last = last_module(head)
    if isinstance(last, nn.Conv2d):
        return int(last.out_channels)
    return None


def _check_head_classes(head: nn.Module, num_classes: int, what: str) -> None:
    """A head whose class count can be read (:func:`_declared_classes`) must predict the
    network's."""
    declared = _declared_classes(head)
    if declared is not None and declared != num_classes:
        raise ValueError(
            f"{what} predicts num_classes={declared}, but the network has num_classes={num_classes}"
        )


class GALDNet(nn.Module):
    r"""A segmentation network: backbone, :class:`~gald.GALDHead` on ``c4``, :class:`~gald.AuxHead` on ``c3``.

    Reference: X. Li et al., "Global Aggregation then Local Distribution in Fully Convolutional
    Networks", BMVC 2019 (arXiv 1909.07229); the authors' ``GALDNet``
    (github.com/lxtGH/GALD-DGCNet).

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
    and ``"4"`` for a ResNet's layer3 and layer4), else from a dry run of the backbone on a
    ``(1, 3, 64, 64)`` zero image in eval mode, repeated on a ``(1, 3, 128, 64)`` one to tell a
    width from a height (the train/eval flags are restored afterwards).
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
        _check_names_for_a_list(backbone, self.in_features)

        declared = _declared_channels(backbone, self.in_features)
        if declared is not None:
            c3, c4 = _pick(declared, self.in_features, "GALDNet", "declares widths for")
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
        if isinstance(aux, nn.Module):
            aux_head = aux
        else:
            try:
                wanted = check_bool(aux, "aux")
            except TypeError:
                raise TypeError(
                    f"aux must be a bool or an nn.Module, got {type(aux).__name__} {aux!r}"
                ) from None
            aux_head = AuxHead(widths[0], num_classes, norm_layer=norm_layer) if wanted else None
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
        enable = check_bool(enable, "enable")
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
        aux: bool = True,
    ) -> GALDNet:
        """The authors' GALD-Net: deep-stem :class:`DilatedResNet` at output stride 8,
        :meth:`gald.GALDHead.official` on ``layer4`` and :class:`~gald.AuxHead` on ``layer3``
        (none with ``aux=False``, for a checkpoint saved without it).

        71,394,790 parameters at depth 101 and 52,402,662 at depth 50 (19 classes, with the
        auxiliary head), as the authors' models. Load their checkpoints with
        :func:`gald.convert.load_official_galdnet`. ``norm_layer`` reaches the backbone and both
        heads (``nn.SyncBatchNorm`` for training on several GPUs, as the authors); it changes no
        parameter or state-dict key.
        """
        return cls(
            num_classes,
            depth=depth,
            head=GALDHead.official(
                in_channels=2048, num_classes=num_classes, channels=512, norm_layer=norm_layer
            ),
            aux=check_bool(aux, "aux"),
            norm_layer=norm_layer,
        )

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """:meth:`torch.nn.Module.load_state_dict`, first raising a short ``ValueError`` that
        says what the checkpoint is, instead of torch's list of keys:

        - an unconverted checkpoint of the GALD-Net authors (top-level ``conv1``,
          ``layer1``-``layer4``, ``head.*``, ``dsn.*``, optionally behind ``module.``), also
          with ``strict=False``: convert it with :func:`gald.convert.official_to_galdnet`;
        - a backbone of another depth or stem layout than a :class:`DilatedResNet` backbone,
          or of the ResNet-D layout, which it does not implement;
        - with ``strict``, a checkpoint without an auxiliary head (no ``aux_head.*`` keys) for a
          network with one, or the other way round.
        """
        if (key := _official_key(state_dict, self)) is not None:
            if not any(
                k.removeprefix("module.").startswith(("head.", "dsn."))
                for k in state_dict
                if isinstance(k, str)
            ):  # a backbone alone
                raise ValueError(
                    f"GALDNet: the state dict holds a backbone alone ({key!r}, without the "
                    "'backbone.' prefix of GALDNet's keys); load it into model.backbone "
                    "(converted with gald.convert.imagenet_to_backbone for ImageNet weights)"
                )
            raise ValueError(
                f"GALDNet: the state dict has the GALD-Net authors' layout ({key!r}: the "
                "backbone at the top level, without the 'backbone.' prefix, and the heads as "
                "head.* / dsn.*), not GALDNet's; convert it with "
                "gald.convert.official_to_galdnet(state_dict), or build and load the network "
                "from the file with gald.convert.load_official_galdnet(path)"
            )
        if isinstance(self.backbone, DilatedResNet):
            _check_checkpoint(self.backbone, state_dict, "backbone.", strict)
        if strict:
            self._check_aux_keys(state_dict)
        return super().load_state_dict(state_dict, strict, assign)

    def _check_aux_keys(self, state_dict: Mapping[str, Any]) -> None:
        keys = [k for k in state_dict if isinstance(k, str)]
        if not any(k.startswith(("backbone.", "head.")) for k in keys):
            return  # not a GALDNet state dict: torch's message
        has_aux = any(k.startswith("aux_head.") for k in keys)
        wants_aux = self.aux_head is not None and bool(self.aux_head.state_dict())
        if wants_aux and not has_aux:
            raise ValueError(
                "GALDNet: the state dict has no auxiliary head (no aux_head.* keys), but this "
                "GALDNet has one; build it with aux=False (GALDNet.official(..., aux=False) for "
                "the authors' network), or load with strict=False to keep the new auxiliary head"
            )
        if self.aux_head is None and has_aux:
            raise ValueError(
                "GALDNet: the state dict has an auxiliary head (aux_head.* keys), but this "
                "GALDNet was built with aux=False; build it with aux=True, or leave the "
                "aux_head.* keys out (gald.convert.official_to_galdnet(state_dict, aux=False) "
                "does for the authors' checkpoints)"
            )

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
        result = {"out": self._upsample(self._classes(self.head(c4), self.head, "head"), size)}
        if self.aux_head is not None:
            aux = self._classes(self.aux_head(c3), self.aux_head, "aux head")
            result["aux"] = self._upsample(aux, size)
        return result

    def _classes(self, logits: Any, head: nn.Module, what: str) -> torch.Tensor:
        """``logits`` when they are (B, num_classes, h, w); a ``ValueError`` naming the head
        otherwise (a head of another class count would be noticed only in the loss)."""
        if not isinstance(logits, torch.Tensor) or logits.ndim != 4:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(
                f"GALDNet: the {what} ({type(head).__name__}) must return (B, num_classes, h, w) "
                f"logits, got {got}"
            )
        if logits.shape[1] != self.num_classes:
            raise ValueError(
                f"GALDNet: the {what} ({type(head).__name__}) returns {logits.shape[1]} channels, "
                f"but the network has num_classes={self.num_classes}"
            )
        return logits

    def _check_layout(self, feature: Any, i: int) -> None:
        """A feature without the expected width in dimension 1: when its last dimension has it,
        it is most likely ``(B, H, W, C)``, so say so (the head would only report a wrong
        width); otherwise name ``in_channels`` (for the auxiliary head's feature only when
        there is one)."""
        width = self.in_channels[i]
        if not (
            isinstance(feature, torch.Tensor) and feature.ndim == 4 and feature.shape[1] != width
        ):
            return
        if feature.shape[-1] == width:
            raise ValueError(
                f"GALDNet: the backbone's feature {self._feature_name(i)} has shape "
                f"{tuple(feature.shape)}, (B, H, W, C) with C={width} it seems; the heads take "
                "(B, C, H, W). A backbone that returns channels-last features should say so "
                "with an output_fmt = 'NHWC' attribute (as timm's features_only models do), "
                "and GALDNet then permutes them"
            )
        if i == 1 or self.aux_head is not None:
            raise ValueError(
                f"GALDNet: the backbone's feature {self._feature_name(i)} has shape "
                f"{tuple(feature.shape)}, but in_channels[{i}]={width}: the "
                f"{'auxiliary head' if i == 0 else 'head'} was built for {width} channels, "
                f"the backbone gives {feature.shape[1]}; pass in_channels with the backbone's "
                "widths (or leave it out to have them read from the backbone)"
            )

    @staticmethod
    def _upsample(logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
        if logits.shape[-2:] == size:
            return logits
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
