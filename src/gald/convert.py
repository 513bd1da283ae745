"""Convert the authors' released GALD-Net checkpoints to :class:`gald.GALDHead` / :class:`gald.AuxHead`.

The released state dicts (github.com/lxtGH/GALD-DGCNet) hold the backbone (``conv1``, ``bn1``,
``layer1``-``layer4``), the head (``head.*``) and the deep-supervision head (``dsn.*``), possibly
behind a ``module.`` prefix from ``DataParallel``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

__all__ = ["load_official", "official_to_gald"]

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

    ``head_state`` loads into :meth:`gald.GALDHead.official` and ``aux_state`` into
    :class:`gald.AuxHead` (empty when the checkpoint has no ``dsn.*`` keys), both with
    ``strict=True``. Keys may carry a ``module.`` prefix; backbone keys are ignored; any other key
    raises a ``ValueError`` that lists them.

    Example:
        >>> head_sd, aux_sd = official_to_gald(load_official("GALD_res101.pth"))  # doctest: +SKIP
        >>> head = GALDHead.official(num_classes=19)  # doctest: +SKIP
        >>> head.load_state_dict(head_sd)  # doctest: +SKIP
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    head: dict[str, torch.Tensor] = {}
    aux: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for raw_key, value in state_dict.items():
        if not isinstance(raw_key, str):
            raise TypeError(f"state_dict keys must be str, got {type(raw_key).__name__}")
        key = raw_key[len("module.") :] if raw_key.startswith("module.") else raw_key
        if _BACKBONE.match(key):
            continue
        if (new := _map_head(key)) is not None:
            head[new] = value
        elif (new := _map_aux(key)) is not None:
            aux[new] = value
        else:
            unknown.append(raw_key)
    if unknown:
        raise ValueError(f"unknown keys in the official state dict: {sorted(unknown)}")
    return head, aux


def load_official(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read an official checkpoint safely (``torch.load(..., weights_only=True)``).

    Accepts a bare state dict or one wrapped under ``"state_dict"`` / ``"model"``.
    """
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{os.fspath(path)!r} does not hold a state dict")
    return dict(obj)
