"""Deployment helpers: capability checks, guarded compile/export, ONNX export and the table.

Every public layer declares which deployment paths it supports (class attributes, see
:class:`gald._capabilities.Capabilities`). These helpers refuse a path that any layer inside the
model does not declare, with a ``NotImplementedError`` naming the layer, the path and the reason,
so nothing is compiled or exported silently wrong. ``python -m gald.deploy`` prints the
capability table of ``docs/deploy.md``.
"""

from ._checks import PATHS, check_supported, compile_module, export_program
from ._onnx import (
    DEFAULT_OPSET,
    MIN_OPSET,
    STANDARD_DOMAINS,
    export_onnx,
    onnx_custom_domains,
    verify_onnx,
)
from ._table import TABLE_END, TABLE_START, capability_rows, capability_table, update_markdown

__all__ = [
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "PATHS",
    "STANDARD_DOMAINS",
    "TABLE_END",
    "TABLE_START",
    "capability_rows",
    "capability_table",
    "check_supported",
    "compile_module",
    "export_onnx",
    "export_program",
    "onnx_custom_domains",
    "update_markdown",
    "verify_onnx",
]
