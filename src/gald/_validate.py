"""Input checks shared by every public layer.

Every check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape) with a
message naming the argument, what was expected and what was received. The checks only read
Python-level shape metadata, so they trace cleanly under ``torch.compile`` and ``torch.export``.
"""

from __future__ import annotations

import inspect
import numbers
import operator
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import torch
import torch.fx
from torch import nn

PADDING_REMEDY = "use padding=1 to accept any size"
"""The advice for a too-small input to a layer whose ``padding=0`` sets its minimum size."""


def first_line(message: str | BaseException) -> str:
    """The first non-blank line of a message, what a one-line error quotes of a longer one: of
    a text (empty for a blank one) or of an exception (its class name when its message is
    blank)."""
    text = str(message).strip()
    if text:
        return text.splitlines()[0]
    return type(message).__name__ if isinstance(message, BaseException) else ""


def check_feature(
    x: object,
    channels: int | None,
    *,
    name: str = "x",
    min_hw: int = 1,
    who: str = "",
    remedy: str | None = PADDING_REMEDY,
) -> torch.Tensor:
    """Check that ``x`` is a floating (B, C, H, W) tensor with ``channels`` channels.

    ``min_hw`` is the smallest height and width the caller can process; smaller inputs raise a
    ``ValueError`` that names it and, in parentheses, ``remedy`` (the default suits the layers
    with a ``padding`` argument; ``None`` for no remedy).
    """
    prefix = f"{who}: " if who else ""
    if not isinstance(x, torch.Tensor):
        if isinstance(x, torch.fx.Proxy):
            raise TypeError(
                f"{prefix}{name} is a torch.fx Proxy: gald layers check shapes and dtypes in "
                "their forward, so torch.fx.symbolic_trace cannot trace into them; trace them "
                "as leaf modules (torchvision's create_feature_extractor(..., "
                "tracer_kwargs={'leaf_modules': [gald.GALD]}), or a torch.fx.Tracer whose "
                "is_leaf_module returns True for them), or use torch.export"
            )
        raise TypeError(f"{prefix}{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(
            f"{prefix}{name} must be 4-D (B, C, H, W), got {x.ndim}-D with shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{prefix}{name} must have a floating dtype, got {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(
            f"{prefix}{name} must have {channels} channels (B, {channels}, H, W), "
            f"got shape {tuple(x.shape)}"
        )
    if x.shape[-2] < 1 or x.shape[-1] < 1:
        raise ValueError(
            f"{prefix}{name} has an empty side: height and width must be >= 1, "
            f"got shape {tuple(x.shape)}"
        )
    if x.shape[-2] < min_hw or x.shape[-1] < min_hw:
        hint = f" ({remedy})" if remedy else ""
        raise ValueError(
            f"{prefix}{name} is too small: height and width must be >= {min_hw} for this "
            f"configuration{hint}, got shape {tuple(x.shape)}"
        )
    return x


def check_int(value: object, name: str) -> int:
    """``value`` as a Python int: anything with ``__index__`` (numpy and torch integers too),
    but not a bool and not a float."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be an int, got bool {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None


INT64_MAX = 2**63 - 1


def check_positive_int(
    value: object, name: str, *, minimum: int = 1, maximum: int = INT64_MAX, why: str = ""
) -> int:
    """An int (see :func:`check_int`) between ``minimum`` and ``maximum`` (by default the
    largest size torch takes); ``why`` explains a smaller maximum."""
    result = check_int(value, name)
    if result < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {result}")
    if result > maximum:
        reason = f" ({why})" if why else ""
        raise ValueError(f"{name} must be <= {maximum}{reason}, got {result}")
    return result


def check_float(value: object, name: str) -> float:
    """``value`` as a Python float: any finite real number (Python and numpy ints and floats),
    but not a bool, NaN or an infinity."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    try:
        result = float(value)
    except OverflowError:  # an int beyond float's range
        raise ValueError(
            f"{name} must be a finite number, got an int too large for a float "
            f"({len(str(value))} digits)"
        ) from None
    if not abs(result) <= sys.float_info.max:  # nan and the infinities; traceable by dynamo
        raise ValueError(f"{name} must be a finite number, got {result}")
    return result


def check_probability(value: object, name: str) -> float:
    """A float in [0, 1) (a dropout probability)."""
    result = check_float(value, name)
    if not 0.0 <= result < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {result}")
    return result


def check_ordered_items(value: object, name: str, what: str) -> list[Any]:
    """The items of an ordered iterable (a list, a tuple, a 1-D numpy array or tensor); a
    ``TypeError`` saying ``name`` must be a sequence of ``what`` for a string, a mapping or a set
    (their order is not the user's), a scalar or an array of another rank."""
    unordered = isinstance(value, (str, bytes, Mapping, AbstractSet))
    if unordered or not isinstance(value, Iterable) or getattr(value, "ndim", 1) != 1:
        got = type(value).__name__
        if getattr(value, "ndim", 1) != 1:
            got += f" with {value.ndim} dimensions"  # type: ignore[attr-defined]
        else:
            text = repr(value)
            got += f" {text if len(text) <= 60 else text[:57] + '...'}"
        raise TypeError(f"{name} must be a sequence of {what}, got {got}")
    return list(value)


def check_positive_int_sequence(value: object, name: str) -> tuple[int, ...]:
    """Ints >= 1 from an ordered iterable (see :func:`check_ordered_items`), as a tuple."""
    items = check_ordered_items(value, name, "ints")
    return tuple(check_positive_int(v, f"{name}[{i}]") for i, v in enumerate(items))


def check_size_pair(value: object, name: str) -> tuple[int, int]:
    """A size of positive ints as ``(h, w)``: one int (see :func:`check_int`) for both sides, or
    an ordered pair of them."""
    if (
        isinstance(value, (bool, str))
        or not isinstance(value, Iterable)
        or getattr(value, "ndim", 1) == 0
    ):
        side = check_positive_int(value, name)
        return side, side
    items = check_ordered_items(value, name, "two ints (h, w)")
    if len(items) != 2:
        raise ValueError(
            f"{name} must be an int or a pair of ints (h, w), got {len(items)} items: {value!r}"
        )
    return check_positive_int(items[0], f"{name}[0]"), check_positive_int(items[1], f"{name}[1]")


def check_divisible(value: int, divisor: int, name: str, divisor_name: str) -> None:
    if value % divisor != 0:
        raise ValueError(f"{name}={value} must be divisible by {divisor_name}={divisor}")


def reduced_width(channels: int, reduction: int, name: str = "reduction") -> int:
    """``channels // reduction`` for a checked positive ``reduction``; a ``ValueError`` naming
    ``name`` when it leaves no channel."""
    if channels // reduction < 1:
        raise ValueError(
            f"{name}={reduction} leaves no channels: channels // {name} must be >= 1, "
            f"got channels={channels}"
        )
    return channels // reduction


def check_bool(value: object, name: str) -> bool:
    """``value`` as a bool (a Python or NumPy bool); a ``TypeError`` naming ``name`` otherwise
    (``"no"``, ``1`` or ``None`` are not read as truth values)."""
    if isinstance(value, bool):
        return value
    kind = type(value)
    if kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_"):  # numpy's bool scalar
        return bool(value)
    shown = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
    raise TypeError(f"{name} must be a bool, got {shown} {value!r}")


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of the strings ``choices``: a ``TypeError`` for a non-string, a
    ``ValueError`` for another string, both naming ``name`` and the choices."""
    if not isinstance(value, str):
        raise TypeError(
            f"{name} must be a str, one of {tuple(choices)}, got {type(value).__name__} {value!r}"
        )
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


_FACTORY_CALLS = (
    (
        "norm_layer",
        "(num_channels)",
        (1,),
        "; bind the other arguments first, e.g. functools.partial(nn.GroupNorm, 32)",
    ),
    ("act_layer", "()", (), ""),
)
"""How a factory argument ending in each suffix is called: (suffix, call, probe args, hint)."""


def check_factory(value: object, name: str) -> Callable[..., Any]:
    """``value`` must be a layer factory: a class or any callable that returns a module, not a
    module instance. A ``*norm_layer`` is called as ``norm_layer(num_channels)`` and an
    ``*act_layer`` as ``act_layer()``: a factory whose signature cannot take that call (say
    ``nn.GroupNorm``, which also needs the number of groups) is refused here, by name."""
    if isinstance(value, nn.Module) or not callable(value):
        what = "an nn.Module instance" if isinstance(value, nn.Module) else type(value).__name__
        raise TypeError(
            f"{name} must be a callable that builds a layer (a class such as nn.BatchNorm2d, "
            f"or a function), got {what} {value!r}"
        )
    for suffix, call, args, hint in _FACTORY_CALLS:
        if not name.endswith(suffix):
            continue
        try:
            signature = inspect.signature(value)
        except (TypeError, ValueError):  # no signature to read (a builtin): the call will tell
            break
        try:
            signature.bind(*args)
        except TypeError as exc:
            raise TypeError(
                f"{name} is called as {name}{call}, which {value!r} cannot take ({exc}){hint}"
            ) from None
    return value  # type: ignore[return-value]


def check_ignored_factories(**factories: object) -> None:
    """Check the ``norm_layer`` / ``act_layer`` a layer without norms or activations accepts
    for a uniform signature: each must be ``None`` or a layer factory."""
    for name, factory in factories.items():
        if factory is not None:
            check_factory(factory, name)
