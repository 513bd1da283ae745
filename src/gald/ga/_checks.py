"""Constructor checks shared by the GA layers."""

from __future__ import annotations

from .._layers import LayerFactory


def check_factory(value: object, name: str) -> LayerFactory:
    """``value`` must be a layer factory: a class or any callable that returns a module."""
    if not callable(value):
        raise TypeError(
            f"{name} must be a callable that builds a layer (a class such as nn.BatchNorm2d, "
            f"or a function), got {type(value).__name__} {value!r}"
        )
    return value
