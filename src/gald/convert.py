"""Convert the authors' released GALD-Net checkpoints and deep-stem ImageNet weights.

The released state dicts (github.com/lxtGH/GALD-DGCNet) hold the backbone (``conv1``, ``bn1``,
``layer1``-``layer4``), the head (``head.*``) and the deep-supervision head (``dsn.*``), possibly
behind a ``module.`` prefix from ``DataParallel``.

- :func:`official_to_gald`: the head and auxiliary head alone (:class:`gald.GALDHead`,
  :class:`gald.AuxHead`).
- :func:`official_to_galdnet` / :func:`load_official_galdnet`: the whole network
  (:class:`gald.models.GALDNet`).
- :func:`imagenet_to_backbone`: ImageNet weights for :class:`gald.models.DilatedResNet`.

Every file is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from ._validate import check_bool, check_int, check_positive_int, first_line
from .models._resnet_keys import DEPTHS, RESNET_LAYERS, layer_blocks, resnet_d_problem

if TYPE_CHECKING:
    from .models import GALDNet

__all__ = [
    "imagenet_to_backbone",
    "load_official",
    "load_official_galdnet",
    "official_to_gald",
    "official_to_galdnet",
]

_BACKBONE = re.compile(r"^(conv1|bn1|layer[1-4])\.")

# (pattern on the authors' key, replacement giving the GALDHead key); the first match wins.
_HEAD_RULES: tuple[tuple[re.Pattern[str], str | None], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"^head\.conva\.([01])\.(.+)$", r"conva.\1.\2"),
        (r"^head\.convb\.([01])\.(.+)$", r"convb.\1.\2"),
        (r"^head\.bottleneck\.([01])\.(.+)$", r"bottleneck.\1.\2"),
        (r"^head\.bottleneck\.3\.(.+)$", r"cls.\1"),
        (r"^head\.a2block\.down\.([01])\.(.+)$", r"gald.down.\1.\2"),
        (r"^head\.a2block\.long_relation\.(t|p|g|z|gn)\.(.+)$", r"gald.ga.\1.\2"),
        (r"^head\.a2block\.local_attention\.dconv([123])\.([01])\.(.+)$", None),
    )
)

_AUX_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"^dsn\.0\.(.+)$", r"conv.\1"),
        (r"^dsn\.1\.(.+)$", r"norm.\1"),
        (r"^dsn\.4\.(.+)$", r"cls.\1"),
    )
)


def _map_head(key: str) -> str | None:
    for pattern, repl in _HEAD_RULES:
        m = pattern.match(key)
        if m is None:
            continue
        if repl is None:  # LD stages: dconv1..3 -> ld.branch.0..2
            stage, layer, rest = m.groups()
            return f"gald.ld.branch.{int(stage) - 1}.{layer}.{rest}"
        return m.expand(repl)
    return None


def _map_aux(key: str) -> str | None:
    for pattern, repl in _AUX_RULES:
        m = pattern.match(key)
        if m is not None:
            return m.expand(repl)
    return None


def official_to_gald(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Map the authors' keys to ``(head_state, aux_state)``.

    ``head_state`` loads into :meth:`gald.GALDHead.official` with ``strict=True``, and
    ``aux_state`` into :class:`gald.AuxHead` with ``strict=True`` too; ``aux_state`` is empty when
    the checkpoint has no ``dsn.*`` keys (an inference-only checkpoint): skip the auxiliary head
    then. Keys may carry a ``module.`` prefix; backbone keys are ignored; any other key
    raises a ``ValueError`` that lists them.

    Example:
        >>> import gald
        >>> path = "GALD_res101.pth"  # the authors' checkpoint, where you saved it
        >>> state = gald.convert.load_official(path)  # doctest: +SKIP
        >>> head_sd, aux_sd = gald.convert.official_to_gald(state)  # doctest: +SKIP
        >>> head = gald.GALDHead.official(num_classes=19)
        >>> head.load_state_dict(head_sd)  # doctest: +SKIP
    """
    head: dict[str, torch.Tensor] = {}
    aux: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for raw_key, key, value in _items(state_dict):
        if _BACKBONE.match(key):
            continue
        if (new := _map_head(key)) is not None:
            head[new] = value
        elif (new := _map_aux(key)) is not None:
            aux[new] = value
        else:
            unknown.append(raw_key)
    if unknown:
        raise ValueError(
            f"unknown keys in the official state dict: {_listing(unknown)}{_gald_hint(unknown)}"
        )
    if not head:
        raise ValueError(
            "the official state dict has no head.* keys (the head of the authors' GALDNet)"
            + (": it holds a backbone only" if state_dict else ": it is empty")
        )
    return head, aux


def load_official(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read an official checkpoint safely (``torch.load(..., weights_only=True)``).

    Accepts a bare state dict or one wrapped under ``"state_dict"`` / ``"model"``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:  # a missing file, a directory: the OS's own error says it best
        raise
    except Exception as exc:  # UnpicklingError, a truncated or foreign file (struct.error, ...)
        # torch suggests weights_only=False, which would run whatever code the file holds
        raise ValueError(
            f"{os.fspath(path)!r} cannot be read as a checkpoint of tensors only "
            f"(torch.load(weights_only=True) raised {type(exc).__name__}: "
            f"{first_line(str(exc))}); gald reads "
            "state dicts of tensors, never arbitrary pickled objects"
        ) from exc
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{os.fspath(path)!r} does not hold a state dict (a mapping of names to tensors, "
            "bare or under 'state_dict' / 'model')"
        )
    return dict(obj)


_LISTED = 20


def _items(state_dict: Mapping[str, torch.Tensor]) -> list[tuple[str, str, torch.Tensor]]:
    """``(raw_key, key without 'module.', value)`` after the type checks."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    items = []
    seen: dict[str, str] = {}
    for raw_key, value in state_dict.items():
        if not isinstance(raw_key, str):
            raise TypeError(f"state_dict keys must be str, got {type(raw_key).__name__}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"state_dict values must be tensors, got {type(value).__name__} for {raw_key!r}"
            )
        key = raw_key[len("module.") :] if raw_key.startswith("module.") else raw_key
        if key in seen:  # one would silently overwrite the other
            raise ValueError(
                f"state_dict holds {seen[key]!r} and {raw_key!r}, the same key with and without "
                "the 'module.' prefix"
            )
        seen[key] = raw_key
        items.append((raw_key, key, value))
    return items


def _gald_hint(unknown: list[str]) -> str:
    """A note for a state dict that is gald's own already (saved from a gald model)."""
    own = ("backbone.", "aux_head.", "head.gald.", "gald.")
    if any(k.removeprefix("module.").startswith(own) for k in unknown):
        return (
            "; it looks like a state dict saved from a gald model already, which loads with "
            "model.load_state_dict as it is"
        )
    return ""


def _listing(keys: list[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_LISTED])
    return f"[{shown}{f', ... and {len(keys) - _LISTED} more' if len(keys) > _LISTED else ''}]"


def _resnet_depth(keys: list[str], prefix: str, what: str) -> int:
    blocks = layer_blocks(keys, prefix)
    depth = DEPTHS.get(blocks)  # type: ignore[arg-type]
    if depth is None:
        raise ValueError(
            f"{what} has ResNet layers with {list(blocks)} blocks; expected [3, 4, 6, 3] "
            "(depth 50) or [3, 4, 23, 3] (depth 101)"
        )
    return depth


def _load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """``module.load_state_dict(state_dict, strict=True)`` with a ``ValueError`` that lists the
    missing keys, the unexpected keys and the shape mismatches first.

    ``num_batches_tracked`` buffers may be missing (checkpoints older than PyTorch 0.4.1).
    """
    expected = module.state_dict()
    missing = [
        k for k in expected if k not in state_dict and not k.endswith(".num_batches_tracked")
    ]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: expected {tuple(expected[k].shape)}, got {tuple(state_dict[k].shape)}"
        for k in state_dict
        if k in expected and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listing(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches {_listing(shapes)}")
    if problems:
        raise ValueError(
            f"the state dict does not fit {type(module).__name__}: " + "; ".join(problems)
        )
    module.load_state_dict(dict(state_dict), strict=True)


def official_to_galdnet(
    state_dict: Mapping[str, torch.Tensor], *, aux: bool = True
) -> dict[str, torch.Tensor]:
    """Map the authors' full GALD-Net keys to :meth:`gald.models.GALDNet.official` keys.

    The backbone (``conv1.{0,1,3,4,6}``, ``bn1``, ``layer1``-``layer4``) goes to ``backbone.*``
    under the same names, ``head.*`` to ``head.*`` as :func:`official_to_gald` maps it and
    ``dsn.*`` to ``aux_head.*`` (dropped with ``aux=False``). Keys may carry a ``module.``
    prefix; any other key raises a ``ValueError`` that lists them, and so does a state dict
    without backbone keys (a head-only checkpoint goes to :func:`official_to_gald`). Load the
    result with ``strict=True`` (or use :func:`load_official_galdnet`, which also infers the
    depth, the number of classes and whether there is an auxiliary head) into a
    :meth:`~gald.models.GALDNet.official` network, built with ``aux=False`` when the checkpoint
    has no ``dsn.*`` keys or ``aux=False`` is passed here: a ``GALDNet`` built otherwise (the
    default head has padding 1) has the same parameter shapes, so the weights load without an
    error, but it computes another function than the authors' network.
    """
    return _to_galdnet(state_dict, check_bool(aux, "aux"), "the state dict")


def _to_galdnet(
    state_dict: Mapping[str, torch.Tensor], aux: bool, what: str
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for raw_key, key, value in _items(state_dict):
        if _BACKBONE.match(key):
            out[f"backbone.{key}"] = value
        elif (new := _map_head(key)) is not None:
            out[f"head.{new}"] = value
        elif (new := _map_aux(key)) is not None:
            if aux:
                out[f"aux_head.{new}"] = value
        else:
            unknown.append(raw_key)
    if unknown:
        raise ValueError(
            f"unknown keys in the official state dict: {_listing(unknown)}{_gald_hint(unknown)}"
        )
    if not any(k.startswith("backbone.") for k in out):
        if len(state_dict) == 0:
            raise ValueError(f"{what} is empty; expected the authors' GALD-Net keys")
        raise ValueError(
            f"{what} has no backbone keys (conv1.*, bn1.*, layer1.*-layer4.*), only head.* "
            "and dsn.* ones: it looks like a head-only checkpoint; convert it with "
            "gald.convert.official_to_gald(state_dict), which gives the state dicts of "
            "gald.GALDHead.official and gald.AuxHead"
        )
    return out


def load_official_galdnet(
    path: str | os.PathLike[str],
    *,
    depth: int | None = None,
    num_classes: int | None = None,
    aux: bool | None = None,
) -> GALDNet:
    """Build :meth:`gald.models.GALDNet.official` and load the authors' checkpoint at ``path``.

    The depth (from the number of blocks in ``layer1``-``layer4``), the number of classes (from
    the classifier) and whether the network has the auxiliary head (whether the file has
    ``dsn.*`` keys) are read from the file; ``depth`` / ``num_classes``, when given, must
    match them, or a ``ValueError`` says what the file holds. ``aux=False`` builds the network
    without the auxiliary head and ignores the file's ``dsn.*`` weights (for inference);
    ``aux=True`` requires them. Loading is strict: missing, unknown and mis-shaped keys raise a
    ``ValueError`` that lists them. The file is read with ``torch.load(weights_only=True)``.
    The model is returned in train mode, like any new module; call ``.eval()`` before
    evaluating.
    """
    from .models import GALDNet  # late: gald.models imports the heads

    if depth is not None:
        depth = check_int(depth, "depth")
        if depth not in RESNET_LAYERS:
            raise ValueError(f"depth must be one of {sorted(RESNET_LAYERS)}, got {depth!r}")
    if num_classes is not None:
        num_classes = check_positive_int(num_classes, "num_classes")
    if aux is not None:
        aux = check_bool(aux, "aux")
    raw = load_official(path)
    where = repr(os.fspath(path))
    state = _to_galdnet(raw, aux is not False, where)
    keys = list(state)
    found = _resnet_depth(keys, "backbone.", where)
    if depth is not None and depth != found:
        raise ValueError(
            f"expected a depth-{depth} GALD-Net, but {where} holds a depth-{found} "
            f"one (ResNet layers with {list(layer_blocks(keys, 'backbone.'))} blocks)"
        )
    cls_weight = state.get("head.cls.weight")
    if cls_weight is None:
        raise ValueError(f"{where} has no classifier (head.bottleneck.3.weight)")
    classes = int(cls_weight.shape[0])
    if num_classes is not None and num_classes != classes:
        raise ValueError(
            f"expected num_classes={num_classes}, but {where} has a classifier for "
            f"{classes} classes"
        )
    has_aux = any(k.startswith("aux_head.") for k in keys)
    if aux and not has_aux:
        raise ValueError(
            f"expected a GALD-Net with the auxiliary head (aux=True), but {where} has no "
            "dsn.* keys; pass aux=False, or leave aux out, to build GALDNet.official(..., "
            "aux=False) without it"
        )
    model = GALDNet.official(depth=found, num_classes=classes, aux=has_aux)
    _load_strict(model, state)
    return model


_SPLIT_STEM = {"conv1": "conv1.0", "bn1": "conv1.1", "conv2": "conv1.3", "bn2": "conv1.4",
               "conv3": "conv1.6", "bn3": "bn1"}  # fmt: skip
_STEM_KEY = re.compile(r"^(conv[1-3]|bn[1-3])\.(?:(\d+)\.)?([A-Za-z_]+)$")


def imagenet_to_backbone(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map ResNet ImageNet weights to :class:`gald.models.DilatedResNet` keys.

    Accepts the deep stem in either common layout: one ``nn.Sequential`` ``conv1``
    (``conv1.0``, ``conv1.1``, ``conv1.3``, ``conv1.4``, ``conv1.6``, then ``bn1``, as the
    GALD-Net authors) or separate ``conv1, bn1, conv2, bn2, conv3, bn3`` (as the ImageNet
    checkpoints of dilated-ResNet segmentation code bases); a torchvision-style 7x7 stem
    (``conv1``, ``bn1``) loads into ``DilatedResNet(deep_stem=False)``. ``fc.*`` is dropped, a
    ``module.`` prefix removed, and any other key raises a ``ValueError`` that lists them.
    The ResNet-D layout (timm's ``resnet50d`` / ``resnet101d``: an average pool in each
    shortcut, a 32-wide deep stem) raises a ``ValueError`` that says so: ``DilatedResNet`` does
    not implement it. Load the result with ``strict=True``.
    """
    items = [
        (raw, key, value) for raw, key, value in _items(state_dict) if not key.startswith("fc.")
    ]
    keys = {key for _, key, _ in items}
    split = any(k.startswith(("conv2.", "conv3.", "bn2.", "bn3.")) for k in keys)
    sequential = any(k.startswith("conv1.0.") for k in keys)
    if split and sequential:
        raise ValueError(
            "the state dict mixes the two deep-stem layouts (conv1.0.* and conv2.*/bn2.*); "
            "expected one of them"
        )
    if (problem := resnet_d_problem({key: value for _, key, value in items})) is not None:
        raise ValueError(problem)
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for raw_key, key, value in items:
        if key.startswith(("layer1.", "layer2.", "layer3.", "layer4.")):
            out[key] = value
            continue
        m = _STEM_KEY.match(key)
        if m is None:
            unknown.append(raw_key)
        elif split and m.group(2) is None:
            out[f"{_SPLIT_STEM[m.group(1)]}.{m.group(3)}"] = value
        elif not split and m.group(1) in ("conv1", "bn1"):
            out[key] = value
        else:
            unknown.append(raw_key)
    if unknown:
        raise ValueError(f"unknown keys in the ImageNet state dict: {_listing(unknown)}")
    if not out:
        raise ValueError(
            "the ImageNet state dict has no backbone keys (conv1, bn1, layer1-layer4)"
            + (": it holds only fc.*" if state_dict else ": it is empty")
        )
    return out
