"""Registry of global-aggregation (GA) layers, in the manner of timm's ``create_attn``.

Every GA layer takes ``channels`` as its first argument and maps (B, C, H, W) to (B, C, H, W);
the layers whose peers change the width (``aspp``, ``psp``) also take ``out_channels``.
:func:`create_ga` builds one from a registry name, a class (or a keyword ``functools.partial``
of one), a callable ``channels -> nn.Module`` or a ready instance;
:func:`registered` adds a layer for the duration of a ``with`` block (a test, say) and then puts
the registry back exactly as it was.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, overload

from torch import nn

from ._validate import check_bool, check_positive_int

_GA_REGISTRY: dict[str, type[nn.Module]] = {}

T = TypeVar("T", bound=type[nn.Module])

_MISSING = object()


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__} {name!r}")
    if not name or name != name.strip():
        raise ValueError(
            f"name must be a non-empty str without leading or trailing whitespace, got {name!r}"
        )
    return name


def _check_class(cls: object, what: str = "cls") -> type[nn.Module]:
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"{what} must be an nn.Module subclass, got {cls!r}")
    return cls


def _names_of(cls: type[nn.Module]) -> list[str]:
    return [n for n, c in _GA_REGISTRY.items() if c is cls]


# the ga_name a class defined itself (or _MISSING) before its first registration: what it gets
# back when its last registered name goes
_OWN_LABEL: dict[type[nn.Module], object] = {}


def _label(cls: type[nn.Module], name: str) -> None:
    """Set ``cls.ga_name`` to ``name`` unless ``cls`` is registered under it already: the first
    name a class is registered under stays its ``ga_name``."""
    if not _names_of(cls):
        _OWN_LABEL[cls] = cls.__dict__.get("ga_name", _MISSING)
    if cls.__dict__.get("ga_name") not in _names_of(cls):
        cls.ga_name = name  # type: ignore[attr-defined]


def _restore_own_label(cls: type[nn.Module]) -> None:
    """Give a class that is no longer registered the ``ga_name`` it had before (none, or the
    one it defined itself)."""
    own = _OWN_LABEL.pop(cls, _MISSING)
    if own is _MISSING:
        if "ga_name" in cls.__dict__:
            del cls.ga_name  # type: ignore[attr-defined]
    else:
        cls.ga_name = own  # type: ignore[attr-defined]


@overload
def register_ga(name: str) -> Callable[[T], T]: ...


@overload
def register_ga(name: str, cls: T) -> T: ...


def register_ga(name: str, cls: Any = _MISSING) -> Any:
    """Register a GA layer class under ``name``: as a class decorator (``@register_ga("se")``)
    or by a call (``register_ga("se", SqueezeExcitation)``, which returns the class).

    Registering a second class under a taken name raises ``ValueError``; use
    :func:`unregister_ga` first, or :func:`registered` for a temporary registration. The class's
    ``ga_name`` attribute is set to ``name``, unless the class is already registered under
    another name: a class registered under several names keeps the first as its ``ga_name``.
    """
    _check_name(name)

    def wrap(cls: T) -> T:
        _check_class(cls)
        if name in _GA_REGISTRY and _GA_REGISTRY[name] is not cls:
            raise ValueError(f"GA name {name!r} is already registered to {_GA_REGISTRY[name]}")
        _label(cls, name)
        _GA_REGISTRY[name] = cls
        return cls

    return wrap if cls is _MISSING else wrap(cls)


def unregister_ga(name: str) -> type[nn.Module]:
    """Remove ``name`` from the registry and return the class it pointed to.

    When ``name`` was the class's ``ga_name``, that attribute moves to another name the class is
    still registered under; with the last one the class gets back the ``ga_name`` it had before
    its first registration (none, or the one it defined itself).
    Raises ``ValueError`` for a name that is not registered.
    """
    _ensure_loaded()
    _check_name(name)
    if name not in _GA_REGISTRY:
        raise ValueError(f"unknown GA module {name!r}; expected one of {sorted(_GA_REGISTRY)}")
    cls = _GA_REGISTRY.pop(name)
    others = _names_of(cls)
    if not others:
        _restore_own_label(cls)
    elif cls.__dict__.get("ga_name") == name:
        cls.ga_name = others[0]  # type: ignore[attr-defined]
    return cls


@contextmanager
def registered(
    name: str, cls: type[nn.Module], *, replace: bool = False
) -> Iterator[type[nn.Module]]:
    """Register ``cls`` under ``name`` for the duration of a ``with`` block.

    On exit, normal or by exception, the registry is restored exactly: names registered inside
    the block (also with :func:`register_ga`) are removed again and a replaced entry comes back,
    and so are the ``ga_name`` attributes the registrations set on the classes. A class that is
    already registered under another name keeps that one as its ``ga_name`` inside the block.

    A name that is already registered to another class raises ``ValueError`` unless
    ``replace=True``, which shadows the existing entry inside the block only. Registering a class
    under the name it already has is allowed and leaves it registered afterwards.

    Each block restores the registry as it found it, so nested blocks must exit in the reverse
    order of entry, as ``with`` statements, pytest fixtures and ``contextlib.ExitStack`` do;
    blocks entered and exited by hand out of that order restore an outer block's registration.

    Example:
        >>> import gald
        >>> from torch import nn
        >>> class MyGA(nn.Identity):
        ...     def __init__(self, channels: int) -> None:
        ...         super().__init__()
        >>> with gald.registered("my_ga", MyGA):
        ...     layer = gald.create_ga("my_ga", 16)
        >>> "my_ga" in gald.list_ga()
        False
    """
    _check_name(name)
    _check_class(cls)
    replace = check_bool(replace, "replace")
    _ensure_loaded()  # built-ins must not appear for the first time inside the block
    existing = _GA_REGISTRY.get(name)
    if existing is not None and existing is not cls and not replace:
        raise ValueError(
            f"GA name {name!r} is already registered to {existing}; pass replace=True to shadow "
            "it inside the block"
        )
    snapshot = dict(_GA_REGISTRY)
    own = dict(_OWN_LABEL)
    # the ga_name attribute of every class involved, as it is now
    labels = {c: c.__dict__.get("ga_name", _MISSING) for c in {cls, *snapshot.values()}}
    _label(cls, name)
    _GA_REGISTRY[name] = cls
    try:
        yield cls
    finally:
        # classes first registered inside the block get back the ga_name they had before
        added = {c for c in _GA_REGISTRY.values() if c not in labels}
        _GA_REGISTRY.clear()
        _GA_REGISTRY.update(snapshot)
        for c in added:
            _restore_own_label(c)
        _OWN_LABEL.clear()
        _OWN_LABEL.update(own)
        for c, label in labels.items():
            if label is _MISSING:
                if "ga_name" in c.__dict__:
                    del c.ga_name  # type: ignore[attr-defined]
            else:
                c.ga_name = label  # type: ignore[attr-defined]


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
        raise TypeError(f"name must be a str, got {type(name).__name__} {name!r}")
    try:
        return _GA_REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown GA module {name!r}; expected one of {sorted(_GA_REGISTRY)}"
        ) from None


def _declared_width(module: nn.Module) -> tuple[str, int] | None:
    """The input width a module declares, as ``(attribute, value)``: its int ``in_channels``
    attribute, else its int ``channels`` attribute, else ``None``."""
    for attr in ("in_channels", "channels"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return attr, value
    return None


def create_ga(
    ga: str | type[nn.Module] | nn.Module | Callable[..., nn.Module],
    channels: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a GA layer with ``channels`` input channels.

    Args:
        ga: a registry name (see :func:`list_ga`), an ``nn.Module`` class built as
            ``ga(channels, **kwargs)`` (or a ``functools.partial`` of one with keywords, which
            ``kwargs`` override), any other callable called as ``ga(channels, **kwargs)`` that
            returns a module, or a ready ``nn.Module`` instance, returned as it is
            (``kwargs`` must then be empty; when ``channels`` is given, an instance with an int
            ``in_channels``, or else ``channels``, attribute must agree with it).
        channels: input channels ``C``; required for a name or a class, optional for an
            instance.
        **kwargs: constructor arguments; any mapping unpacks here (``**cfg``).

    Example:
        >>> import gald
        >>> layer = gald.create_ga("cgnl", 64, groups=4)
        >>> gald.create_ga(layer) is layer
        True
    """
    if isinstance(ga, nn.Module):
        if kwargs:
            raise ValueError(
                "kwargs must be empty when ga is an nn.Module instance (it is already built), "
                f"got {sorted(kwargs)}"
            )
        if channels is None:
            return ga
        channels = check_positive_int(channels, "channels")
        declared = _declared_width(ga)
        if declared is not None and declared[1] != channels:
            attr, width = declared
            raise ValueError(
                f"ga is a {type(ga).__name__} instance with {attr}={width}, "
                f"expected {attr}={channels} (the channels argument)"
            )
        return ga
    if callable(ga) and not _is_class_spec(ga):  # a factory channels -> nn.Module
        if channels is None:
            raise TypeError(f"create_ga: channels is required to call the factory {ga!r}")
        built = ga(check_positive_int(channels, "channels"), **kwargs)
        if not isinstance(built, nn.Module):
            raise TypeError(
                f"create_ga: the factory {ga!r} must return an nn.Module, got "
                f"{type(built).__name__}"
            )
        return built
    cls, bound = _ga_class(ga, "ga")
    if channels is None:
        raise TypeError(
            f"create_ga: channels is required to build {cls.__name__} from "
            f"{'the name ' + repr(ga) if isinstance(ga, str) else 'its class'}, got none"
        )
    return cls(check_positive_int(channels, "channels"), **{**bound, **kwargs})


def _ga_class(ga: object, name: str) -> tuple[type[nn.Module], dict[str, Any]]:
    """The class a GA argument names and the keywords bound to it: a registry name, an
    ``nn.Module`` subclass or a ``functools.partial`` of one with keywords only (a
    ``_partial_: true`` config). A module instance, or any other callable, is the caller's
    case."""
    if isinstance(ga, str):
        return get_ga_class(ga), {}
    spec = _class_and_keywords(ga)
    if spec is not None:
        return spec
    raise TypeError(
        f"{name} must be a registry name (str), an nn.Module subclass (or a functools.partial "
        f"of one), a callable channels -> nn.Module or an nn.Module instance, got "
        f"{type(ga).__name__} {ga!r}"
    )


def _class_and_keywords(ga: object) -> tuple[type[nn.Module], dict[str, Any]] | None:
    """An ``nn.Module`` subclass with no keywords, or the class and keywords of a keyword-only
    ``functools.partial`` of one; ``None`` for anything else."""
    keywords: dict[str, Any] = {}
    if isinstance(ga, functools.partial) and not ga.args:
        keywords = dict(ga.keywords)
        ga = ga.func
    if isinstance(ga, type) and issubclass(ga, nn.Module):
        return ga, keywords
    return None


def _is_class_spec(ga: object) -> bool:
    """Whether :func:`_ga_class` reads ``ga``: a name, a class or a keyword partial of one."""
    return isinstance(ga, str) or _class_and_keywords(ga) is not None
