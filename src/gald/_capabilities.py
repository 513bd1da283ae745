"""Capability declarations for the public layers.

Each public layer carries class attributes that say which deployment paths it supports. The
test-suite walks every layer over this matrix, and ``docs/deploy.md`` is generated from it,
so the declaration and the behaviour cannot drift apart.
"""

from __future__ import annotations

from typing import ClassVar

CAPABILITY_FIELDS: tuple[str, ...] = (
    "supports_compile",
    "supports_export",
    "supports_onnx",
    "onnx_dynamic_batch",
    "onnx_dynamic_hw",
    "min_train_batch",
)


class Capabilities:
    """Mixin with the default capability flags (everything supported).

    Attributes:
        supports_compile: ``torch.compile(fullgraph=True)`` traces the layer without graph breaks.
        supports_export: ``torch.export.export`` succeeds and the exported program runs.
        supports_onnx: ``torch.onnx.export`` produces standard ONNX ops only (opset >= 17).
        onnx_dynamic_batch: the ONNX graph may take a dynamic batch dimension.
        onnx_dynamic_hw: the ONNX graph may take dynamic height and width.
        min_train_batch: smallest batch accepted in train mode (BatchNorm needs more than one
            value per channel; a layer whose BatchNorm sees a 1x1 map needs batch >= 2).
    """

    supports_compile: ClassVar[bool] = True
    supports_export: ClassVar[bool] = True
    supports_onnx: ClassVar[bool] = True
    onnx_dynamic_batch: ClassVar[bool] = True
    onnx_dynamic_hw: ClassVar[bool] = True
    min_train_batch: ClassVar[int] = 1


def capabilities_of(obj: object) -> dict[str, object]:
    """Return the capability flags of a layer instance or class as a dict."""
    return {name: getattr(obj, name) for name in CAPABILITY_FIELDS}
