"""Capability declarations for the public layers.

Each public layer carries class attributes that say which deployment paths it supports. The
test-suite walks every layer over this matrix, ``docs/deploy.md`` is generated from it, and the
helpers of :mod:`gald.deploy` refuse a path a layer does not declare, so the declaration and the
behaviour cannot drift apart.

A composite layer (:class:`~gald.GALD`, :class:`~gald.GALDHead`) supports a path only when every
part does: it calls :func:`derive_capabilities` at the end of ``__init__`` and so carries, as
instance attributes, the flags of the GA module it was built with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

CAPABILITY_FIELDS: tuple[str, ...] = (
    "supports_compile",
    "supports_export",
    "supports_onnx",
    "onnx_dynamic_batch",
    "onnx_dynamic_hw",
    "supports_autocast",
    "supports_channels_last",
    "deterministic",
    "min_train_batch",
)

BOOL_FIELDS: tuple[str, ...] = tuple(f for f in CAPABILITY_FIELDS if f != "min_train_batch")


class Capabilities:
    """Mixin with the default capability flags (everything supported).

    Attributes:
        supports_compile: ``torch.compile(fullgraph=True)`` traces the layer without graph breaks.
        supports_export: ``torch.export.export`` succeeds and the exported program runs.
        supports_onnx: ``torch.onnx.export`` produces standard ONNX ops only (opset >= 17) that
            onnxruntime runs within 1e-4 (relative) of eager.
        onnx_dynamic_batch: the ONNX graph may take a dynamic batch dimension.
        onnx_dynamic_hw: the ONNX graph may take dynamic height and width (``False``: export at
            the deployment size with ``dynamic_hw=False``).
        supports_autocast: ``torch.autocast`` (bf16 on CPU) gives finite outputs close to fp32.
        supports_channels_last: a ``channels_last`` input gives the same values.
        deterministic: under ``torch.use_deterministic_algorithms(True)`` two runs give identical
            outputs and gradients.
        min_train_batch: smallest batch accepted in train mode (BatchNorm needs more than one
            value per channel; a layer whose BatchNorm sees a 1x1 map needs batch >= 2).
        capability_notes: why a flag is ``False``, keyed by the flag's name; the reason is
            repeated in the error raised by :func:`gald.deploy.check_supported`.
    """

    supports_compile: ClassVar[bool] = True
    supports_export: ClassVar[bool] = True
    supports_onnx: ClassVar[bool] = True
    onnx_dynamic_batch: ClassVar[bool] = True
    onnx_dynamic_hw: ClassVar[bool] = True
    supports_autocast: ClassVar[bool] = True
    supports_channels_last: ClassVar[bool] = True
    deterministic: ClassVar[bool] = True
    min_train_batch: ClassVar[int] = 1
    capability_notes: ClassVar[Mapping[str, str]] = {}


def _label(obj: object) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    name = getattr(cls, "ga_name", None)
    return f"{cls.__name__}({name!r})" if name else cls.__name__


def combine_capabilities(*parts: object) -> tuple[dict[str, object], dict[str, str]]:
    """Flags of a composite made of ``parts`` (instances or classes): every boolean flag is the
    AND of the parts' flags, ``min_train_batch`` the maximum, and the notes of a part whose flag is
    ``False`` are kept, prefixed with the part's name.

    A part without a declaration (a user's own ``nn.Module``) counts as supporting everything.
    """
    flags: dict[str, object] = {}
    notes: dict[str, str] = {}
    for field in BOOL_FIELDS:
        flags[field] = True
        for part in parts:
            if not getattr(part, field, True):
                flags[field] = False
                part_notes: Mapping[str, str] = getattr(part, "capability_notes", {})
                reason = part_notes.get(field, "declared unsupported")
                notes.setdefault(field, f"{_label(part)}: {reason}")
    flags["min_train_batch"] = max(int(getattr(p, "min_train_batch", 1)) for p in parts)
    return flags, notes


def derive_capabilities(owner: object, *parts: object) -> None:
    """Set on ``owner`` (an instance) the flags combined from itself (its class) and ``parts``."""
    flags, notes = combine_capabilities(type(owner), *parts)
    for field, value in flags.items():
        setattr(owner, field, value)
    setattr(owner, "capability_notes", notes)  # noqa: B010 (the class declares it ClassVar)


def capabilities_of(obj: object) -> dict[str, object]:
    """Return the capability flags of a layer instance or class as a dict."""
    return {name: getattr(obj, name) for name in CAPABILITY_FIELDS}
