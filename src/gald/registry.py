"""Registry of global-aggregation (GA) layers, in the manner of timm's ``create_attn``.

Every GA layer takes ``channels`` as its first argument and maps (B, C, H, W) to (B, C, H, W).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

_GA_REGISTRY: dict[str, type[nn.Module]] = {}

T = TypeVar("T", bound=type[nn.Module])


def register_ga(name: str) -> Callable[[T], T]:
    """Class decorator that registers a GA layer under ``name``."""

    def wrap(cls: T) -> T:
        if name in _GA_REGISTRY and _GA_REGISTRY[name] is not cls:
            raise ValueError(f"GA name {name!r} is already registered to {_GA_REGISTRY[name]}")
        _GA_REGISTRY[name] = cls
        cls.ga_name = name  # type: ignore[attr-defined]
        return cls

    return wrap


def _ensure_loaded() -> None:
    # Importing the package registers every built-in layer.
    from . import ga  # noqa: F401


def list_ga() -> list[str]:
    """Names of every registered GA layer, sorted."""
    _ensure_loaded()
    return sorted(_GA_REGISTRY)


def get_ga_class(name: str) -> type[nn.Module]:
    """The class registered under ``name``."""
    _ensure_loaded()
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    try:
        return _GA_REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown GA module {name!r}; expected one of {sorted(_GA_REGISTRY)}"
        ) from None


def create_ga(name: str, channels: int, **kwargs: Any) -> nn.Module:
    """Build the GA layer registered under ``name`` with ``channels`` input/output channels.

    Example:
        >>> import gald
        >>> layer = gald.create_ga("cgnl", 64, groups=4)
    """
    return get_ga_class(name)(channels, **kwargs)
