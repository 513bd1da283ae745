"""Model surgery: ``gald.wrap(model, "classifier.0")`` puts a GALD block around a submodule."""

from __future__ import annotations

import sys
from typing import Any, TypeVar

from torch import nn

from ._layers import first_tensor
from ._validate import check_positive_int
from .block import _IN_CHANNELS_REFUSED, GALD, _not_one_tensor

__all__ = ["wrap"]

M = TypeVar("M", bound=nn.Module)


def _resolve(model: nn.Module, name: str) -> tuple[nn.Module, str, nn.Module, str | None]:
    """(parent, attribute, target, block) of the dotted path ``name`` inside ``model``;
    ``block`` is the path of the outermost GALD the path passes through (``""`` for the model
    itself), ``None`` when it passes through none."""
    parts = name.split(".")
    if not name:
        raise ValueError(
            "name must be a dotted path like 'decoder.aspp', got '' (the model itself: to put a "
            "GALD block around a whole module, build gald.GALD(in_channels, module))"
        )
    if any(not p for p in parts):
        raise ValueError(f"name must be a dotted path like 'decoder.aspp', got {name!r}")
    parent: nn.Module = model
    block: str | None = None
    for depth, part in enumerate(parts):
        if block is None and isinstance(parent, GALD):
            block = ".".join(parts[:depth])
        where = ".".join(parts[:depth]) or "the model"
        # every registered child, a shared one too (named_children() lists each module once)
        children = {k: v for k, v in parent._modules.items() if v is not None}
        if part not in children:
            found = getattr(parent, part, None)
            if isinstance(found, nn.Module):
                # a property, or an attribute a wrapper (torch.compile's) forwards: the module
                # lives elsewhere; replacing it here would not change the model
                paths = [n for n, m in model.named_modules(remove_duplicate=False) if m is found]
                hint = (
                    f"; it is registered at {', '.join(repr(p) for p in paths)}: wrap that path"
                    if paths
                    else ""
                )
                raise KeyError(
                    f"{name!r}: {where} ({type(parent).__name__}) reaches a "
                    f"{type(found).__name__} through the attribute {part!r}, which is not a "
                    f"registered submodule{hint}"
                )
            if hasattr(parent, part):
                raise ValueError(
                    f"{'.'.join(parts[: depth + 1])!r} leads to a {type(found).__name__}, not "
                    "an nn.Module"
                )
            raise KeyError(
                f"{name!r}: {where} ({type(parent).__name__}) has no submodule {part!r}; its "
                f"submodules are {sorted(children)}"
            )
        if depth == len(parts) - 1:
            return parent, part, children[part], block
        parent = children[part]
    raise AssertionError("unreachable")  # pragma: no cover


def _infer_in_channels(module: nn.Module) -> tuple[int, str]:
    """The module's input width and where it was read (for error messages)."""
    declared = getattr(module, "in_channels", None)
    if isinstance(declared, int) and not isinstance(declared, bool) and declared > 0:
        return declared, "its in_channels attribute"
    for sub_name, sub in module.named_modules():
        # a scripted module keeps its submodules' attributes, under their original class names
        if isinstance(sub, nn.Conv2d) or getattr(sub, "original_name", None) == "Conv2d":
            width = getattr(sub, "in_channels", None)
            if any(isinstance(p, nn.parameter.UninitializedParameter) for p in sub.parameters()):
                which = (
                    "it is" if sub_name == "" else f"its first registered Conv2d {sub_name!r} is"
                )
                raise ValueError(
                    f"cannot infer the input channels of {type(module).__name__}: {which} a "
                    "lazy module not run yet; run the model once before wrapping, or pass "
                    "in_channels"
                )
            if isinstance(width, int):
                return width, f"its first registered Conv2d {sub_name!r}"
    raise ValueError(
        f"cannot infer the input channels of {type(module).__name__} (it has no in_channels "
        "attribute and no Conv2d); pass in_channels"
    )


def _distributed_wrappers() -> tuple[type, ...]:
    """The wrapper classes that register their parameters when they are built (DDP, FSDP).
    FSDP is looked for only where it was imported: without that, no FSDP model exists."""
    found: list[type] = [nn.parallel.DistributedDataParallel]
    fsdp = sys.modules.get("torch.distributed.fsdp")
    for attr in ("FullyShardedDataParallel", "FSDPModule"):
        cls = getattr(fsdp, attr, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def _refuse_distributed(model: nn.Module, name: str) -> None:
    wrappers = _distributed_wrappers()
    for path, module in model.named_modules():
        if isinstance(module, wrappers) and (not path or f"{name}.".startswith(f"{path}.")):
            where = "the model" if not path else f"{path!r}"
            raise ValueError(
                f"wrap({name!r}): {where} is a {type(module).__name__}, which registered its "
                "parameters when it was built: the GALD block's new parameters would train "
                "without being synchronised across processes. Wrap the plain model first, then "
                "build the distributed wrapper (and convert to SyncBatchNorm before that)"
            )


def wrap(model: M, name: str, *, in_channels: int | None = None, **gald_kwargs: Any) -> M:
    """Replace the submodule at the dotted path ``name`` by a :class:`~gald.GALD` around it.

    The channels are inferred: ``in_channels`` from the module's ``in_channels`` attribute or
    else its first registered ``Conv2d``, ``out_channels`` as :class:`~gald.GALD` does for a
    module instance (a dry run, which also checks ``in_channels``). The new block takes the
    device, dtype and training mode of the module it wraps (the model's device and dtype when
    the module has no parameters or buffers). Paths use attribute names and ``nn.Sequential`` /
    ``nn.ModuleList`` indices alike (``"classifier.0"``, ``"decoder.aspp"``).

    To fine-tune a pretrained model, pass ``init="identity"``: the wrapped model then computes
    exactly what it computed before (see :class:`~gald.GALD`).

    Args:
        model: the model, modified in place.
        name: dotted path of the context module to wrap.
        in_channels: channels of the module's input, when they cannot be inferred.
        **gald_kwargs: further :class:`~gald.GALD` arguments (``out_channels``, ``init``,
            ``offset``, ``norm_layer``, ...).

    Returns:
        ``model`` itself. If anything fails, ``model`` is left unchanged: arguments are checked
        before the dry run runs the module; a failure the dry run itself finds (a width that
        does not match) comes after it, so what the module's forward does in eval mode
        (hooks, lazy submodules taking their shapes) has happened once more.

    Raises:
        KeyError: no submodule registered at ``name`` (a module reached through a property
            or a wrapper's attribute names the path where it is registered).
        ValueError: ``name`` is malformed or leads to something that is not an ``nn.Module``,
            to a module registered at another path too (shared), or the channels cannot be
            inferred or do not match the module; or the path runs through a
            ``DistributedDataParallel`` / FSDP wrapper (wrap before building it: it registers
            the parameters it synchronises when it is built).

    Example:
        >>> import torch, gald
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 16, 1))
        >>> gald.wrap(model, "1")[1].out_channels
        16
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if "ga_module" in gald_kwargs:
        raise TypeError("wrap takes the GA from the model; do not pass ga_module")
    _refuse_distributed(model, name)
    parent, attr, target, inside = _resolve(model, name)
    if isinstance(target, GALD):
        raise ValueError(f"{name!r} is already a GALD block")
    if inside is not None:
        owner = repr(inside) if inside else "(the model itself)"
        raise ValueError(
            f"{name!r} is inside the GALD block {owner}; a context module is wrapped once "
            "(the block already runs its GA and the LD)"
        )
    others = [
        path
        for path, module in model.named_modules(remove_duplicate=False)
        if module is target and path != name
    ]
    if others:
        raise ValueError(
            f"{name!r} is a module shared with {others}; wrapping one path would leave the "
            "others calling it unwrapped. Build one gald.GALD around it and assign it to every "
            "path"
        )
    if in_channels is None:
        in_channels, source = _infer_in_channels(target)
        try:
            block = GALD(in_channels, target, **gald_kwargs)
        except ValueError as exc:
            if not getattr(exc, _IN_CHANNELS_REFUSED, False) or _not_one_tensor(target):
                raise  # a module that takes several inputs: the message says so already
            raise ValueError(
                f"wrap({name!r}): in_channels={in_channels} was inferred from {source}; if the "
                f"module takes another width, pass it as wrap(..., in_channels=...). {exc}"
            ) from exc
    else:
        in_channels = check_positive_int(in_channels, "in_channels")
        block = GALD(in_channels, target, **gald_kwargs)
    if first_tensor(target) is None:
        # GALD joins the device and dtype of the module it wraps; one without parameters or
        # buffers says nothing, so the block joins the model's
        block._join(model)
    # the new parts take the wrapped module's mode; the module's own submodules keep theirs
    block.training = target.training
    for child_name, child in block.named_children():
        if child_name != "ga":
            child.train(target.training)
    setattr(parent, attr, block)
    return model
