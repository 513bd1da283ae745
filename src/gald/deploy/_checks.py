"""Refuse a deployment path that a layer does not declare, and the guarded compile/export calls.

Every public layer declares its deployment paths as class attributes (see
:class:`gald._capabilities.Capabilities`). :func:`check_supported` walks a whole model, so a
user's network that contains a GALD layer deep inside is checked too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

__all__ = ["PATHS", "check_supported", "compile_module", "export_program"]

PATHS: Mapping[str, str] = MappingProxyType(
    {
        "compile": "supports_compile",
        "export": "supports_export",
        "onnx": "supports_onnx",
        "onnx_dynamic_batch": "onnx_dynamic_batch",
        "onnx_dynamic_hw": "onnx_dynamic_hw",
        "autocast": "supports_autocast",
        "channels_last": "supports_channels_last",
        "deterministic": "deterministic",
    }
)
"""Deployment path name -> the capability flag that declares it."""


def _layer_label(module: nn.Module) -> str:
    name = getattr(type(module), "ga_name", None)
    return f"{type(module).__name__}({name!r})" if name else type(module).__name__


def _check_module(module: object, who: str) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{who}: module must be a torch.nn.Module, got {type(module).__name__}")
    return module


def check_supported(module: nn.Module, path: str) -> None:
    """Raise ``NotImplementedError`` if ``module`` or any submodule declares ``path`` unsupported.

    Args:
        module: a gald layer or any model containing gald layers.
        path: one of :data:`PATHS` (``"compile"``, ``"export"``, ``"onnx"``,
            ``"onnx_dynamic_batch"``, ``"onnx_dynamic_hw"``, ``"autocast"``, ``"channels_last"``,
            ``"deterministic"``).

    Raises:
        NotImplementedError: naming the layer, where it sits in ``module``, the path and the
            layer's reason.

    Example:
        >>> import gald
        >>> gald.deploy.check_supported(gald.GALD(16, ga_kwargs={"groups": 4}), "onnx")
    """
    _check_module(module, "check_supported")
    if not isinstance(path, str):
        raise TypeError(f"path must be a str, got {type(path).__name__}")
    if path not in PATHS:
        raise ValueError(f"unknown deployment path {path!r}; expected one of {sorted(PATHS)}")
    flag = PATHS[path]
    for where, sub in module.named_modules():
        if getattr(sub, flag, True):
            continue
        notes: Mapping[str, str] = getattr(sub, "capability_notes", {})
        reason = notes.get(flag, "the layer declares it unsupported")
        location = f" (at {where!r})" if where else ""
        raise NotImplementedError(
            f"{_layer_label(sub)}{location} does not support the {path!r} path "
            f"({flag}=False): {reason}. See the capability table in docs/deploy.md "
            "(python -m gald.deploy)."
        )


def compile_module(module: nn.Module, *, fullgraph: bool = True, **kwargs: Any) -> Callable:
    """``torch.compile(module, fullgraph=True, **kwargs)`` after :func:`check_supported`.

    ``fullgraph=True`` turns any graph break into an error instead of a silent slow path.
    """
    check_supported(_check_module(module, "compile_module"), "compile")
    return torch.compile(module, fullgraph=fullgraph, **kwargs)


def export_program(
    module: nn.Module, args: tuple[Any, ...], **kwargs: Any
) -> torch.export.ExportedProgram:
    """``torch.export.export(module, args, **kwargs)`` after :func:`check_supported`.

    Run the result with ``program.module()(x)``.
    """
    check_supported(_check_module(module, "export_program"), "export")
    if not isinstance(args, tuple):
        raise TypeError(f"export_program: args must be a tuple, got {type(args).__name__}")
    return torch.export.export(module, args, **kwargs)
