"""The GALD block: global aggregation at half resolution, then local distribution.

Reference: X. Li et al., "Global Aggregation then Local Distribution in Fully Convolutional
Networks", BMVC 2019 (arXiv 1909.07229); the authors' ``GALDBlock``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._layers import (
    LayerFactory,
    depthwise_stage,
    first_tensor,
    make_layer,
    make_norm2d,
    probe_setting,
    refuses_single_value,
    strided_min_size,
)
from ._modes import dry_run
from ._validate import (
    PADDING_REMEDY,
    check_bool,
    check_choice,
    check_factory,
    check_feature,
    check_float,
    check_positive_int,
)
from .ld import IMPLS, LocalDistribution
from .registry import _declared_width, _ga_class, _is_class_spec, create_ga

__all__ = ["GALD"]

INITS = ("default", "identity")

# sides tried by the dry run that infers a module's output width (small, but large enough for
# the pyramid bins and dilations of common context modules to run)
_PROBE_SIDES = (16, 33, 65)


def _accepts(cls: type, name: str) -> bool:
    """Whether ``cls(...)`` names a keyword argument ``name`` in its signature. A ``**kwargs``
    does not count: what it accepts is unknown (it is often forwarded to ``nn.Conv2d``)."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False
    param = params.get(name)
    return param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)


def _default(cls: type, name: str) -> Any:
    """The default of ``cls``'s argument ``name`` (``inspect.Parameter.empty`` when it has
    none); call only after :func:`_accepts` said the argument exists."""
    return inspect.signature(cls).parameters[name].default


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    """``norm_layer=BatchNorm2d, out_channels=32``: classes and functions by their name."""
    return ", ".join(f"{k}={getattr(v, '__name__', repr(v))}" for k, v in kwargs.items())


def _label(module: nn.Module) -> str:
    return type(module).__name__


_IN_CHANNELS_REFUSED = "_gald_in_channels_refused"
"""Set on a ``ValueError`` when the wrapped module does not take ``in_channels`` (it declares
another width, or refuses every probe of that width): :func:`gald.wrap` then adds where its
inferred width came from. A marker, not a subclass: the user's traceback shows a ValueError."""


def _in_channels_refused(message: str) -> ValueError:
    error = ValueError(message)
    setattr(error, _IN_CHANNELS_REFUSED, True)
    return error


class _ProbesRefused(ValueError):
    """No input of :func:`_infer_out_channels`'s dry run gave a usable width: the module raised
    on every probe (``raised_on_all``), or changed the height and width of those it ran on."""

    def __init__(self, message: str, *, raised_on_all: bool) -> None:
        super().__init__(message)
        self.raised_on_all = raised_on_all


def _infer_out_channels(module: nn.Module, in_channels: int) -> tuple[int, int]:
    """The number of channels ``module`` returns for a ``(1, in_channels, s, s)`` input, and
    the side ``s`` of the probe that gave it.

    Found by a dry run: the module runs once in eval mode, without gradients, on a small zero
    input on the device and dtype of its parameters (sides 16, then 33 and 65 if a smaller input
    is refused or does not keep its height and width). The training flag of the module and of
    each of its submodules is restored and, in eval mode, BatchNorm statistics do not change;
    hooks and any state the module's own forward updates in eval mode see each probe tried. A
    module built on the meta device is probed with a meta tensor (shapes only, no compute). The
    dry run also checks ``in_channels``: a module that refuses every probe (a convolution built
    for another width, say) is reported here rather than at the first forward.

    Raises:
        ValueError: the module refuses every probe input; the message
            names the module's class, ``in_channels`` and each probe's error.
        TypeError: the module returns something else than a tensor.
        ValueError: the module returns a tensor that is not 4-D, or changes the height and
            width of every probe it accepts.
    """
    device, dtype = probe_setting(module)
    errors: list[str] = []
    changed: list[str] = []
    strided = True  # every size change so far at least halved both sides
    grows = True  # every size change so far at least doubled both sides
    with dry_run(module):
        for side in _PROBE_SIDES:
            probe = torch.zeros(1, in_channels, side, side, device=device, dtype=dtype)
            try:
                out = module(probe)
            except Exception as exc:  # the module refuses this probe: try the next size
                errors.append(f"{side}x{side}: {type(exc).__name__}: {exc}")
                continue
            if not isinstance(out, torch.Tensor):
                raise TypeError(
                    f"{_label(module)} must return a (B, C, H, W) tensor to be wrapped by "
                    f"GALD, got {type(out).__name__} for an input of shape "
                    f"{tuple(probe.shape)}"
                )
            if out.ndim != 4:
                got = tuple(out.shape)
                note = _not_one_tensor(module)
                raise ValueError(
                    f"{_label(module)} must return a (B, C, H, W) tensor to be wrapped by "
                    f"GALD, got {got} for an input of shape {tuple(probe.shape)}"
                    + (f"; {note}" if note else "")
                )
            if out.shape[-2:] != probe.shape[-2:]:  # try another size before refusing
                changed.append(f"{side}x{side} -> {out.shape[-2]}x{out.shape[-1]}")
                strided = strided and 2 * max(out.shape[-2:]) <= side + 1
                grows = grows and min(out.shape[-2:]) >= 2 * side - 1
                continue
            return int(out.shape[1]), side
    if changed:
        if not errors and (strided or grows):  # it ran at every probe, shrank or grew each
            kind = (
                "downsamples every input it was given (a strided stage)"
                if strided
                else "upsamples every input it was given (a segmentation head or decoder)"
            )
            advice = (
                f". It {kind}, so it is not a context module GALD can wrap: wrap a module that "
                "keeps its input's size, such as the context module of the head"
            )
        else:
            failed = f"; the other probes failed: {'; '.join(errors)}" if errors else ""
            advice = (
                f"{failed}. For a module that keeps it only at some sizes, pass out_channels "
                "(no dry run then decides)"
            )
        raise _ProbesRefused(
            f"the wrapped {_label(module)} does not keep the height and width of its input "
            f"({', '.join(changed)}); GALD upsamples the GA's output from the size the GA "
            f"receives, so the GA must keep it{advice}",
            raised_on_all=False,
        )
    note = _not_one_tensor(module)
    advice = (
        f"{note}; wrap the context module inside it, which does"
        if note
        else f"check in_channels={in_channels} (the width the module takes), or pass "
        "out_channels to wrap a module that cannot run on a small input here"
    )
    raise _ProbesRefused(
        f"the wrapped {_label(module)} refuses a (1, {in_channels}, s, s) input for every probe "
        f"side s ({'; '.join(errors)}); {advice}",
        raised_on_all=True,
    )


def _annotation(annotation: object) -> str:
    text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
    return text.replace("typing.", "")


def _not_one_tensor(module: nn.Module) -> str:
    """A note when ``module.forward``'s signature shows that it does not take one tensor (it
    takes ``*features``, or several required arguments), as a decoder over a feature list does;
    empty otherwise."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return ""
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in params if p.kind in positional and p.default is p.empty]
    star = [p for p in params if p.kind is inspect.Parameter.VAR_POSITIONAL]
    passes_through = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    if star and not required and not passes_through:  # (*args, **kwargs): a wrapper, unknown
        return (
            f"its forward takes *{star[0].name} (a list of features, as a decoder does), while "
            "GALD wraps a module that takes one (B, C, H, W) tensor"
        )
    if len(required) == 1 and required[0].annotation is not required[0].empty:
        note = str(required[0].annotation)
        kind = None
        if any(word in note for word in ("Dict", "dict", "Mapping")):
            kind = "a dict of features, as a head over named backbone outputs does"
        elif any(
            word in note for word in ("List", "list", "Sequence", "Tuple", "tuple", "Iterable")
        ):
            kind = "a list of features, as a decoder does"
        if kind is not None:
            return (
                f"its forward takes {required[0].name}: {_annotation(required[0].annotation)} "
                f"({kind}), while GALD wraps a module that takes one (B, C, H, W) tensor"
            )
    if len(required) > 1:
        names = ", ".join(p.name for p in required)
        return (
            f"its forward takes {len(required)} arguments ({names}), while GALD wraps a module "
            "that takes one (B, C, H, W) tensor"
        )
    return ""


def _width_by_dry_run(
    ga: nn.Module,
    in_channels: int,
    out_channels: int | None,
    what: str,
    *,
    explain_declared: bool = False,
    hint: str = "",
) -> tuple[int, int | None]:
    """The width ``ga`` returns (a dry run), checked against a given ``out_channels``, and the
    side of the probe it ran at (``None`` when it refused every probe).

    A module that refuses every probe is taken at the given ``out_channels`` (it may only run
    on larger inputs or on another device); without one, the refusal is raised. With
    ``explain_declared``, a declared input width that disagrees with ``in_channels`` explains
    the refusal instead.
    """
    try:
        found, side = _infer_out_channels(ga, in_channels)
    except _ProbesRefused as exc:
        if exc.raised_on_all and _not_one_tensor(ga):
            # its signature says it takes no single tensor: no out_channels makes it callable
            raise ValueError(str(exc)) from None
        declared = _declared_width(ga) if explain_declared else None
        if declared is not None and declared[1] != in_channels:
            raise _in_channels_refused(
                f"in_channels={in_channels} does not match {what}, which declares "
                f"{declared[0]}={declared[1]}"
            ) from None
        if out_channels is None:
            # a module that refused every probe may have been given the wrong width
            error = _in_channels_refused(str(exc)) if exc.raised_on_all else ValueError(str(exc))
            raise error from None
        return out_channels, None
    if out_channels is not None and out_channels != found:
        raise ValueError(
            f"out_channels={out_channels} does not match {what}, which returns {found} channels "
            f"for in_channels={in_channels}{hint}"
        )
    return found, side


def _smallest_side(module: nn.Module, in_channels: int, runs_at: int) -> int:
    """The smallest side ``s`` at which ``module`` takes a ``(1, in_channels, s, s)`` input
    and keeps its height and width, knowing that it does at ``runs_at``: sides 1, 2, ... are
    tried in turn (eval mode, no gradients, as in the dry run) up to 16 or ``runs_at``. Above
    16 the answer is a lower bound (17): no side below it works, so an input refused for being
    smaller than it is one the module would refuse too. The usual case costs one 1x1 probe."""
    device, dtype = probe_setting(module)
    last = min(runs_at, 17)
    with dry_run(module):
        for side in range(1, last):
            probe = torch.zeros(1, in_channels, side, side, device=device, dtype=dtype)
            try:
                out = module(probe)
            except Exception:  # too small for the module: try the next side
                continue
            if isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[-2:] == (side, side):
                return side
    return last


def _accepted_widths(cls: type[nn.Module], kwargs: Mapping[str, Any], limit: int = 1024) -> str:
    """The first few ``channels`` that ``cls(channels, **kwargs)`` accepts, for an error hint.

    Only gald's own layers are searched (built on the meta device, so nothing is allocated); a
    user's class is never constructed more than the user asked for.
    """
    if not cls.__module__.startswith("gald."):
        return ""
    found: list[int] = []
    with torch.device("meta"):
        for c in range(1, limit + 1):
            try:
                cls(c, **kwargs)
            except Exception:  # refused at this width
                continue
            found.append(c)
            if len(found) == 4:
                break
    return ", ".join(map(str, found)) + (", ..." if len(found) == 4 else "")


def _build_ga(
    ga_module: str | type[nn.Module] | nn.Module | Callable[..., nn.Module],
    in_channels: int,
    out_channels: int | None,
    ga_kwargs: Mapping[str, Any],
    norm_layer: LayerFactory,
    act_layer: LayerFactory,
) -> tuple[nn.Module, int, int | None]:
    """The GA module, its output width (construction through :func:`gald.create_ga`) and, for
    a module whose width a dry run found, the side of the probe it ran at."""
    if isinstance(ga_module, nn.Module):
        if ga_kwargs:
            raise ValueError(
                "ga_kwargs must be empty when ga_module is an nn.Module instance (it is built "
                f"already), got keys {sorted(ga_kwargs)}"
            )
        # an in_channels or channels attribute is only read to explain a refusal: when the
        # module runs, such an attribute may well mean something else
        width, side = _width_by_dry_run(
            ga_module,
            in_channels,
            out_channels,
            f"the wrapped {_label(ga_module)}",
            explain_declared=True,
        )
        return ga_module, width, side
    if callable(ga_module) and not _is_class_spec(ga_module):
        # a factory in_channels -> nn.Module: built here, then read like an instance
        built = create_ga(ga_module, in_channels, **ga_kwargs)
        width, side = _width_by_dry_run(
            built, in_channels, out_channels, f"the {_label(built)} built by {ga_module!r}"
        )
        return built, width, side
    cls, bound = _ga_class(ga_module, "ga_module")
    kwargs = {**bound, **ga_kwargs}
    if out_channels is not None and "out_channels" in kwargs:
        raise ValueError(
            f"out_channels is given twice: out_channels={out_channels} and "
            f"the GA's out_channels={kwargs['out_channels']!r}; pass it to GALD only"
        )
    name = vars(cls).get("ga_name", cls.__name__)  # a subclass's own, not its base's name
    # the block's norm and activation reach every GA that builds norms or activations; a class
    # whose default for one is None builds none (timm's convention) and is left so
    for key, value in (("norm_layer", norm_layer), ("act_layer", act_layer)):
        if key not in kwargs and _accepts(cls, key) and _default(cls, key) is not None:
            kwargs[key] = value
    own = cls.__module__.startswith("gald.")  # gald's layers declare out_channels when it differs
    if out_channels is not None:
        if _accepts(cls, "out_channels"):
            kwargs["out_channels"] = out_channels
        elif own and out_channels != in_channels:
            raise ValueError(
                f"out_channels={out_channels} differs from in_channels={in_channels}, but the GA "
                f"{name!r} ({cls.__name__}) keeps the width: it has no out_channels argument"
            )
    try:
        ga = create_ga(cls, in_channels, **kwargs)
    except (ValueError, TypeError) as exc:
        accepted = _accepted_widths(cls, kwargs)
        hint = f"; in_channels it accepts: {accepted}" if accepted else ""
        added = {k: v for k, v in kwargs.items() if k not in ga_kwargs}
        passed = f" (GALD also passed {_kwargs_text(added)})" if added else ""
        raise type(exc)(
            f"GALD: the GA {name!r} cannot be built with in_channels={in_channels} and "
            f"ga_kwargs={dict(ga_kwargs)}{passed}{hint} ({exc})"
        ) from exc
    if own:
        declared = getattr(ga, "out_channels", in_channels)
        width = declared if isinstance(declared, int) else in_channels
        if out_channels is not None and width != out_channels:
            raise ValueError(
                f"out_channels={out_channels}, but the GA {name!r} ({cls.__name__}) built with "
                f"ga_kwargs={dict(ga_kwargs)} gives {width} channels"
            )
        return ga, width, None
    # a user's class may change the width without an out_channels argument: the dry run says
    has_arg = "" if _accepts(cls, "out_channels") else " (it has no out_channels argument)"
    width, side = _width_by_dry_run(
        ga, in_channels, out_channels, f"the GA {name!r} ({cls.__name__})", hint=has_arg
    )
    return ga, width, side


def _read_unwrapped_keys(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any
) -> None:
    """Load-state-dict pre-hook of :class:`GALD`: a state dict saved before the wrapping holds
    the wrapped module's keys at the block's prefix (``prefix + "convs.0.weight"``); they are
    moved to where the GA now lives (``prefix + "ga.convs.0.weight"``). The state dict is read
    as one saved before the wrapping when more of the GA's keys are found at the block's prefix
    than under ``prefix + "ga."`` (a ``ga.`` prefix alone proves nothing: the wrapped module may
    have a child named ``ga``); then every key the GA has is the GA's, even one named like a part
    of the block (``down.*``)."""
    keys = [k for k in state_dict if k.startswith(prefix)]
    ga_keys = set(module.get_submodule("ga").state_dict())
    unwrapped = sum(prefix + k in state_dict for k in ga_keys)
    wrapped = sum(prefix + "ga." + k in state_dict for k in ga_keys)
    if unwrapped <= wrapped:
        return
    for key in keys:
        if key[len(prefix) :] in ga_keys:
            state_dict[prefix + "ga." + key[len(prefix) :]] = state_dict.pop(key)


class GALD(nn.Module):
    r"""Global Aggregation then Local Distribution around any context module.

    Reference: X. Li et al., "Global Aggregation then Local Distribution in Fully Convolutional
    Networks", BMVC 2019 (arXiv 1909.07229); the authors' ``GALDBlock``.

    .. math::
        y = \mathrm{Up}\big(\mathrm{GA}(\mathrm{down}(x)),\, H \times W\big), \qquad
        \mathrm{out} = y \odot (\mathrm{offset} + M(y)),

    with ``down`` a depthwise 3x3 stride-2 conv -> norm -> act on ``in_channels`` and ``M`` the
    :class:`~gald.LocalDistribution` mask on ``out_channels``; ``Up`` is bilinear with
    ``align_corners=True``. ``offset=2`` is the authors' ``GALDBlock`` (``LD(y) + y = 2y + y M``).
    With ``downsample=False`` the GA runs at the input resolution; with ``ld=False`` the output is
    ``y`` (the GA-only ablation baseline).

    The GA may change the width (``in_channels -> out_channels``), as the context modules of
    real heads do (torchvision's and smp's ASPP 2048 -> 256). For a registry name or a class,
    ``out_channels`` is passed to the GA when it takes that argument; the block's width is what
    gald's own layers declare, and for a class of yours or a module instance it is found by a
    dry run, which also checks ``in_channels`` and a given ``out_channels``: once, in eval mode
    (the training flags restored), without gradients, on a zero input of side 16 (33, then 65,
    when a smaller one is refused or does not keep its height and width). A module that refuses
    every probe input is reported at construction, unless ``out_channels`` is given: that wraps
    a module which only runs on larger inputs or on another device. A module without a
    ``min_size`` attribute that ran in the dry run is then tried on sides 1, 2, ... (up to 16):
    the smallest side it takes, through the downsample, sets ``min_size``, so a too-small input
    is refused by the block with a message naming the module instead of failing deep inside it
    (usually one extra 1x1 probe). Around a module instance, the parts built here (``down``, the LD,
    ``alpha``) take the device and floating dtype of the module's first parameter.

    ``init="identity"`` is for wrapping a *trained* context module (fine-tuning a pretrained
    segmentation model): the block then computes exactly the wrapped module's function at
    initialisation and learns the LD from there,

    .. math::
        \mathrm{out} = y + \alpha \odot \big(y \odot (\mathrm{offset} + M(y)) - y\big),
        \qquad y = \mathrm{GA}(x),

    with a per-channel ``alpha`` initialised to zero, computed as
    ``y + (alpha * y) * (offset - 1 + M(y))`` so that it is exactly ``y`` while ``alpha`` is
    zero, in half precision too (see :meth:`gald.LocalDistribution.forward`). The GA then runs at the
    resolution it was trained at (``downsample`` must be ``False``; a stride-2 conv cannot start
    as the identity). The blend keeps one more full-size tensor for backward than the plain LD
    (``alpha * y``, the input of the fused op). For training from scratch, as in the paper, keep
    ``init="default"``.

    A state dict of the model *before* wrapping loads into the wrapped model: keys of the
    wrapped module found at the block's own prefix (``decoder.aspp.convs.0.weight``) are read
    as the GA's (``decoder.aspp.ga.convs.0.weight``). Load it with ``strict=False``; the keys
    reported missing are then exactly the block's new parts (``down``, the LD, ``alpha``).

    Args:
        in_channels: channels ``C_in`` of the input.
        ga_module: a registry name (see :func:`gald.list_ga`), an ``nn.Module`` class built as
            ``cls(in_channels, **ga_kwargs)`` (or a ``functools.partial`` of one with keywords,
            which ``ga_kwargs`` override), any other callable ``in_channels -> nn.Module``
            (called with ``ga_kwargs``; its width is found like an instance's), or a ready
            ``nn.Module``.
        out_channels: channels of the GA output and of the block (default: inferred, see above).
        ga_kwargs: keyword arguments for the GA constructor (any mapping).
        downsample: run the GA on a 2x-downsampled copy and upsample its output (default
            ``None``: ``True``, or ``False`` with ``init="identity"``).
        ld: apply the local distribution.
        offset: the LD offset (default 2.0, the authors' block).
        padding: padding of the ``down`` conv and of every LD conv: ``0`` (the authors' code)
            or ``1``.
        num_stages: LD branch stages (default 3).
        kernel_size: LD conv kernel (default 3).
        final_act: activation after the last LD stage (default ``True``, as the authors).
        norm_layer: normalisation factory for ``down``, the LD and every GA that builds norms
            (``nn.SyncBatchNorm`` for multi-GPU training); passed to a GA whose constructor
            names a ``norm_layer`` argument (a ``**kwargs`` does not count), unless
            ``ga_kwargs`` sets it or the argument defaults to ``None`` (timm's convention for
            "no norm": such a layer is left without one); also to a keyword
            ``functools.partial`` of such a class. A GA given as a module, or built by another
            callable, keeps the norms it builds.
        act_layer: activation factory, passed on in the same way.
        init: ``"default"`` or ``"identity"`` (see above).
        impl: LD kernel choice, ``"auto"``, ``"triton"`` or ``"torch"`` (see
            :class:`~gald.LocalDistribution`).

    ``num_stages``, ``kernel_size``, ``final_act``, ``offset`` and ``impl`` configure the LD;
    giving one with ``ld=False`` is a ``ValueError``.

    Attributes:
        ga: the GA module (built here, or the module instance given).
        down: the stride-2 downsample stage; ``None`` with ``downsample=False``.
        ld: the :class:`~gald.LocalDistribution`; ``None`` with ``ld=False``.
        alpha: the per-channel blend of ``init="identity"``; ``None`` otherwise.
        in_channels: the width of the input.
        out_channels: the width of the output.
        min_size: the smallest height and width the block takes (its downsample, its LD, and
            the GA's own minimum: declared by gald's layers, found by trying small inputs for
            a module of yours); a smaller input is a ``ValueError`` that names the GA.

    Shape:
        - Input: :math:`(B, C_{in}, H, W)`
        - Output: :math:`(B, C_{out}, H, W)`
    """

    def __init__(
        self,
        in_channels: int,
        ga_module: str | type[nn.Module] | nn.Module | Callable[..., nn.Module] = "cgnl",
        *,
        out_channels: int | None = None,
        ga_kwargs: Mapping[str, Any] | None = None,
        downsample: bool | None = None,
        ld: bool = True,
        offset: float | None = None,
        padding: int = 1,
        num_stages: int | None = None,
        kernel_size: int | None = None,
        final_act: bool | None = None,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
        init: str = "default",
        impl: str = "auto",
    ) -> None:
        super().__init__()
        in_channels = self.in_channels = check_positive_int(in_channels, "in_channels")
        if out_channels is not None:
            out_channels = check_positive_int(out_channels, "out_channels")
        padding = self.padding = check_positive_int(padding, "padding", minimum=0)
        if padding > 1:
            raise ValueError(
                "padding must be 0 (the authors') or 1: the 3x3 stride-2 downsample padded more "
                f"does not halve the map, got padding={padding}"
            )
        if ga_kwargs is not None and not isinstance(ga_kwargs, Mapping):
            raise TypeError(f"ga_kwargs must be a mapping or None, got {type(ga_kwargs).__name__}")
        init = check_choice(init, "init", INITS)
        impl = check_choice(impl, "impl", IMPLS)
        ld = check_bool(ld, "ld")
        if downsample is not None:
            downsample = check_bool(downsample, "downsample")
        check_factory(norm_layer, "norm_layer")
        check_factory(act_layer, "act_layer")
        if downsample is None:
            downsample = init == "default"
        elif downsample and init == "identity":
            raise ValueError(
                "downsample=True cannot start as the identity: init='identity' runs the GA at "
                "the input resolution; pass downsample=False (or leave it unset)"
            )
        if init == "identity" and not ld:
            raise ValueError("init='identity' blends the LD in from zero; it needs ld=True")
        ld_args = {"num_stages": num_stages, "kernel_size": kernel_size, "final_act": final_act}
        given = sorted(k for k, v in {**ld_args, "offset": offset}.items() if v is not None)
        given += ["impl"] if impl != "auto" else []
        if not ld and given:
            raise ValueError(f"LD arguments {given} given with ld=False")
        # the LD's own arguments, checked before the dry run runs a module instance (a failed
        # call must not have run the user's module); LocalDistribution checks them the same way
        if num_stages is not None:
            check_positive_int(num_stages, "num_stages")
        if kernel_size is not None:
            check_positive_int(kernel_size, "kernel_size")
        if final_act is not None:
            check_bool(final_act, "final_act")
        self.offset = 2.0 if offset is None else check_float(offset, "offset")
        self.downsample: bool = downsample
        self.init = init
        self.impl = impl
        # the factories at the widths known before the dry run (the LD's only when given: a GA
        # may change the width itself), so that a factory that cannot build them is refused
        # before the user's module runs (norm factories build ones and zeros; the RNG is forked
        # all the same, so seeded builds are unchanged)
        widths = [self.in_channels] if self.downsample else []
        if ld and out_channels is not None:
            widths.append(out_channels)
        if widths:
            with torch.random.fork_rng(devices=[]):
                for c in dict.fromkeys(widths):
                    make_norm2d(norm_layer, "norm_layer", c, purpose=f"a {c}-channel GALD norm")
                make_layer(act_layer, "act_layer", purpose="GALD's activations")
        self.ga, self.out_channels, probed_at = _build_ga(
            ga_module,
            self.in_channels,
            out_channels,
            ga_kwargs or {},
            norm_layer,
            act_layer,
        )
        self.down: nn.Sequential | None = None
        # the GA's own declared minimum side; for a module of the user's that declares none and
        # ran in the dry run, the smallest side it takes (found by trying small inputs)
        ga_min = getattr(self.ga, "min_size", None)
        found_min = False
        if not isinstance(ga_min, int) or isinstance(ga_min, bool):
            ga_min = 1
            if probed_at is not None:
                ga_min = _smallest_side(self.ga, self.in_channels, probed_at)
                found_min = ga_min > 1
        min_size = max(1, ga_min)
        if self.downsample:
            self.down = depthwise_stage(
                self.in_channels,
                kernel_size=3,
                padding=self.padding,
                norm_layer=norm_layer,
                act_layer=act_layer,
                where=f"GALD's {self.in_channels}-channel downsample stage",
            )
            # the smallest input whose stride-2 down stage still gives the GA its minimum side
            # (and more than one value to a norm that cannot normalise a 1x1 map)
            start = min_size if refuses_single_value(self.down) is None else max(min_size, 2)
            min_size = strided_min_size(1, 3, self.padding, start=start)
        ga_block_min = min_size  # what the GA (through the downsample) needs
        self.ld: LocalDistribution | None = None
        self.alpha: nn.Parameter | None = None
        if ld:
            extra: dict[str, Any] = {k: v for k, v in ld_args.items() if v is not None}
            self.ld = LocalDistribution(
                self.out_channels,
                offset=self.offset,
                padding=self.padding,
                norm_layer=norm_layer,
                act_layer=act_layer,
                impl=impl,
                **extra,
            )
            min_size = max(min_size, self.ld.min_size)
            if init == "identity":
                self.alpha = nn.Parameter(torch.zeros(self.out_channels))
        if isinstance(ga_module, nn.Module):
            self._join(ga_module)
        self.min_size = min_size
        # what to suggest for a too-small input: padding=1 only where it lifts the minimum (the
        # LD, built with this padding, knows for its branch; the GA's own minimum stays)
        remedy = PADDING_REMEDY if self.padding == 0 else None
        if self.ld is not None:
            remedy = self.ld._small_input_remedy
        ld_binds = self.ld is not None and self.ld.min_size > ga_block_min
        self._small_input_remedy: str | None = None  # a minimum the GA declares: no advice
        if ga_min == 1 or ld_binds:
            self._small_input_remedy = remedy
        elif found_min:
            through = (
                ", and runs on the output of the stride-2 downsample" if self.downsample else ""
            )
            self._small_input_remedy = (
                f"the wrapped {_label(self.ga)} refused inputs smaller than {ga_min}x{ga_min} "
                f"in a dry run at construction{through}"
            )
        self.register_load_state_dict_pre_hook(_read_unwrapped_keys)

    def reset_parameters(self) -> None:
        """Re-initialise what the block owns directly: ``alpha`` (``init="identity"``) to zero.

        The parts it composes (convs, norms, the GA) have their own ``reset_parameters``, which
        restore PyTorch's default initialisation. Initialisations a layer applies to its
        children at construction are not replayed by those: the zero-initialised output norms
        of ``nonlocal``, ``glore`` and ``gc``'s last conv, EMA's and the ResNet's Kaiming
        convs. After building on the meta device, ``to_empty`` and ``reset_parameters``
        everywhere therefore give GALD's own start (the identity of ``init="identity"``, the
        silent gammas of ``danet`` and ``criss_cross``, EMA's bases), not those; load weights
        or build such layers on a real device."""
        if self.alpha is not None:
            with torch.no_grad():
                self.alpha.zero_()

    def _join(self, module: nn.Module) -> None:
        """Move the parts built here (``down``, the LD, ``alpha``) to the device and floating
        dtype of the wrapped module's first parameter or buffer (a half-precision, CUDA or meta
        module is wrapped as it is)."""
        ref = first_tensor(module)
        if ref is None:
            return
        dtype = ref.dtype if ref.is_floating_point() else None
        for name, child in self.named_children():
            if name != "ga":
                child.to(device=ref.device, dtype=dtype)
        if self.alpha is not None:
            self.alpha = nn.Parameter(self.alpha.detach().to(device=ref.device, dtype=dtype))

    def extra_repr(self) -> str:
        parts = [
            f"in_channels={self.in_channels}",
            f"out_channels={self.out_channels}",
            f"downsample={self.downsample}",
            f"ld={self.ld is not None}",
        ]
        if self.ld is not None:
            parts.append(f"offset={self.offset}")
        parts += [f"padding={self.padding}", f"init={self.init!r}", f"min_size={self.min_size}"]
        if self.impl != "auto":
            parts.append(f"impl={self.impl!r}")
        return ", ".join(parts)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the LD branch in backward instead of keeping its activations (timm's
        convention; see :meth:`gald.LocalDistribution.set_grad_checkpointing`). A block built
        with ``ld=False`` has nothing to recompute: the call changes nothing."""
        enable = check_bool(enable, "enable")
        if self.ld is not None:
            self.ld.set_grad_checkpointing(enable)

    def _check_ga_output(self, y: torch.Tensor, expected_hw: tuple[int, ...]) -> None:
        if (
            not isinstance(y, torch.Tensor)
            or y.ndim != 4
            or y.shape[1] != self.out_channels
            or tuple(y.shape[-2:]) != expected_hw
        ):
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(
                f"GALD: the wrapped GA {_label(self.ga)} must return (B, {self.out_channels}, "
                f"{expected_hw[0]}, {expected_hw[1]}) (out_channels={self.out_channels}), got "
                f"{got}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature(
            x,
            self.in_channels,
            min_hw=self.min_size,
            who=f"GALD({_label(self.ga)})",
            remedy=self._small_input_remedy,
        )
        if self.down is not None:
            d = self.down(x)
            y = self.ga(d)
            self._check_ga_output(y, tuple(d.shape[-2:]))
            y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=True)
        else:
            y = self.ga(x)
            self._check_ga_output(y, tuple(x.shape[-2:]))
        if self.ld is None:
            return y
        if self.alpha is None:
            return self.ld(y)
        # y + alpha * (LD(y) - y), exactly y where alpha is 0 (also where LD(y) would overflow
        # in half precision: a lerp would give y + 0 * inf = nan there)
        return self.ld(y, blend=self.alpha.view(1, -1, 1, 1))
