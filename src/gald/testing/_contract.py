"""The GA layer contract as a reusable check: :func:`check_ga` and :func:`check_gald`."""

from __future__ import annotations

import copy
import functools
import io
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from torch import nn
from torch.autograd.gradcheck import GradcheckError
from torch.overrides import TorchFunctionMode

from .._modes import eval_mode
from .._validate import (
    check_bool,
    check_float,
    check_int,
    check_ordered_items,
    check_positive_int,
    check_size_pair,
    first_line,
)

Factory = str | type[nn.Module] | Callable[[int], nn.Module]

PROPERTIES = (
    "shapes",
    "empty_batch",
    "device",
    "gradients",
    "batch_independence",
    "gradcheck",
    "autocast",
    "half_precision",
    "memory_format",
    "compile",
    "state_dict",
)
"""The names of the properties :func:`check_ga` and :func:`check_gald` assert, in the order they
run; each is also a keyword of those functions that switches it off, and ``only=`` takes a
subset of them."""


def randomize_(module: nn.Module, *, seed: int = 0, scale: float = 0.2) -> nn.Module:
    """Move every floating parameter of ``module`` away from its initial value and give every
    layer that tracks running statistics (``running_mean`` / ``running_var`` buffers, as
    BatchNorm does) random ones, in place; returns ``module``.

    Zero-initialised gates (``gamma = 0``) and fresh norms (the identity in eval mode) would make
    most comparisons vacuous: a gated branch that is switched off cannot mix samples, receive
    gradients or differ between memory formats. The noise is additive, ``scale * N(0, 1)``, drawn
    from a generator seeded with ``seed``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    seed = _check_seed(seed)
    scale = check_float(scale, "scale")
    if scale < 0:
        raise ValueError(f"scale must be >= 0, got {scale}")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point():
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                p.add_((noise * scale).to(device=p.device, dtype=p.dtype))
        for mod in module.modules():
            mean = getattr(mod, "running_mean", None)
            var = getattr(mod, "running_var", None)
            if isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor):
                m = torch.randn(mean.shape, generator=gen, dtype=torch.float64) * scale
                v = torch.rand(var.shape, generator=gen, dtype=torch.float64) + 0.5
                mean.copy_(m.to(mean.dtype))
                var.copy_(v.to(var.dtype))
    return module


_SEED_LIMIT = 2**32


def _check_seed(seed: object) -> int:
    """A seed in ``[0, 2**32)``: the checks derive further seeds from it."""
    value = check_int(seed, "seed")
    if not 0 <= value < _SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**32), got {value}")
    return value


def declared_min_size(module: nn.Module) -> tuple[int, int]:
    """The smallest (height, width) ``module`` accepts: its ``min_size`` attribute (an int for
    both sides or an ``(h, w)`` pair), ``(1, 1)`` when it has none."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    return check_size_pair(getattr(module, "min_size", 1), f"{type(module).__name__}.min_size")


_LABELLED = "_gald_testing_failure"


_CHECKER: ContextVar[str] = ContextVar("gald_testing_checker", default="check_ga")
"""The public function a failure's skip hint names: check_gald runs check_ga under its own."""


def _fail(
    prop: str,
    shape: object,
    measured: str,
    detail: str = "",
    cause: BaseException | None = None,
    advice: str = "",
) -> NoReturn:
    where = "construction" if shape is None else f"input shape {tuple(shape)}"  # type: ignore[arg-type]
    lines = [f"{prop}: {where}: {measured}"]
    if detail and detail.strip() != first_line(detail):
        lines.append(detail.strip())
    if advice:
        lines.append(advice)
    if prop in PROPERTIES:
        lines.append(f"(pass {prop}=False to {_CHECKER.get()} to skip this property)")
    failure = AssertionError("\n".join(lines))
    # a plain AssertionError for the user; the mark tells it from the module's own assertions
    setattr(failure, _LABELLED, True)
    raise failure from cause


@dataclass
class _Context:
    factory: Callable[[int], nn.Module]
    channels: int
    out_channels: int
    min_hw: tuple[int, int]
    train_batch: int
    seed: int
    randomize: bool
    atol: float
    rtol: float
    autocast_dtypes: tuple[torch.dtype, ...]
    autocast_tol: float

    def build(self, stream: int = 0) -> nn.Module:
        # seeded, on a forked CPU generator: the same module on every run (a failure
        # reproduces), and the caller's random stream is left as it was; ``stream`` draws
        # another initialisation from the same seed
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.seed * 7919 + 104729 * stream)
            module = self.factory(self.channels)
            if not isinstance(module, nn.Module):
                raise TypeError(
                    f"factory must return an nn.Module, got {type(module).__name__} from "
                    f"{self.factory!r}"
                )
            if any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters()):
                # lazy layers (nn.LazyConv2d, ...) take their shapes from a first forward
                x = self.input(self.train_batch, self.typical(), seed=97)
                with (
                    eval_mode(module),
                    torch.no_grad(),
                    _forward_errors("construction", x, "forward"),
                ):
                    module(x)
        return module

    def prepared(self) -> nn.Module:
        module = self.build()
        if self.randomize:
            randomize_(module, seed=self.seed)
        return module

    def sizes(self) -> list[tuple[int, int]]:
        """The smallest map, a wide one, a tall one and a generic one: between them every
        combination of odd and even height and width."""
        h, w = self.min_hw
        return [(h, w), (h, w + 5), (h + 5, w), (h + 5, w + 7)]

    def typical(self) -> tuple[int, int]:
        h, w = self.min_hw
        return h + 4, w + 3

    def input(
        self, b: int, hw: tuple[int, int], *, dtype: torch.dtype = torch.float32, seed: int = 0
    ) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 7919 + seed)
        return torch.randn(b, self.channels, *hw, generator=gen, dtype=dtype)

    def expected(self, x: torch.Tensor) -> tuple[int, ...]:
        return (x.shape[0], self.out_channels, x.shape[2], x.shape[3])

    def tolerance(self, ref: torch.Tensor) -> float:
        scale = ref.abs().max().item() if ref.numel() else 0.0
        return self.atol + self.rtol * scale

    def half_tolerance(self, ref: torch.Tensor) -> float:
        """``autocast_tol * max(max|ref|, 1)``: the bound of the autocast and half_precision
        comparisons with the float32 output ``ref``."""
        scale = ref.abs().max().item() if ref.numel() else 0.0
        return self.autocast_tol * max(scale, 1.0)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.detach().double() - b.detach().double()).abs().max().item()


def _assert_near(
    prop: str,
    x: torch.Tensor,
    out: torch.Tensor,
    ref: torch.Tensor,
    tol: float,
    what: str,
    detail: str = "",
) -> None:
    """Fail ``prop`` with "``what`` by <max abs difference> (max abs; tolerance ...)" unless
    ``out`` is within ``tol`` of ``ref``."""
    diff = _max_diff(out, ref)
    if not diff <= tol:
        _fail(prop, x.shape, f"{what} by {diff:.3g} (max abs; tolerance {tol:.3g})", detail)


def _describe(err: BaseException) -> str:
    first = first_line(str(err))
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


@contextmanager
def _forward_errors(
    prop: str, x: torch.Tensor, what: str = "forward", advice: str = ""
) -> Iterator[None]:
    """Label any exception of the block, the module's own ``AssertionError`` included, as a
    failure of ``prop`` (chained to the original); failures already labelled pass through."""
    try:
        yield
    except Exception as err:
        if getattr(err, _LABELLED, False):
            raise
        _fail(prop, x.shape, f"{what} raised {_describe(err)}", str(err), err, advice)


def _size_advice(ctx: _Context, hw: tuple[int, int]) -> str:
    """What to say when a forward fails on the smallest map: the layer may need a larger one."""
    if hw != ctx.min_hw:
        return ""
    return (
        f"This is the smallest map checked ({hw[0]}x{hw[1]}): if the layer needs a larger one, "
        f"give it a min_size attribute (int or (h, w)) or pass min_size= to {_CHECKER.get()}, "
        "which keeps the other shape checks."
    )


def _check_output(prop: str, x: torch.Tensor, y: object, ctx: _Context) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        _fail(prop, x.shape, f"output is a {type(y).__name__}, expected a torch.Tensor")
    if tuple(y.shape) != ctx.expected(x):
        _fail(prop, x.shape, f"output shape {tuple(y.shape)}, expected {ctx.expected(x)}")
    if y.dtype != x.dtype:
        _fail(prop, x.shape, f"output dtype {y.dtype}, expected the input dtype {x.dtype}")
    if y.device != x.device:
        _fail(prop, x.shape, f"output device {y.device}, expected the input device {x.device}")
    finite = torch.isfinite(y.detach())
    if not finite.all():
        _fail(
            prop,
            x.shape,
            f"{int((~finite).sum())} of {y.numel()} output values are not finite (NaN or inf) "
            "on a finite random input",
        )
    return y


def _check_unchanged(x: torch.Tensor, original: torch.Tensor, mode: str) -> None:
    if not torch.equal(x, original):
        diff = _max_diff(x, original) if x.shape == original.shape else float("nan")
        _fail(
            "shapes",
            x.shape,
            f"the {mode} forward modified its input in place (max abs change {diff:.3g})",
            "A layer must leave its input as it found it (the caller may still use it): "
            "apply in-place operations to tensors the layer created.",
        )


def _check_shapes(ctx: _Context) -> None:
    module = ctx.build().eval()
    for b in (2, 1):  # a failure at every batch size is reported at the usual one
        for hw in ctx.sizes():
            x = ctx.input(b, hw)
            advice = _size_advice(ctx, hw)
            with torch.no_grad(), _forward_errors("shapes", x, "eval-mode forward", advice):
                y = module(x)
            _check_output("shapes", x, y, ctx)
            _check_unchanged(x, ctx.input(b, hw), "eval-mode")
    module.train()
    for hw in ctx.sizes():
        x = ctx.input(ctx.train_batch, hw)
        with _forward_errors("shapes", x, "train-mode forward"):
            y = module(x)
        _check_output("shapes", x, y, ctx)
        _check_unchanged(x, ctx.input(ctx.train_batch, hw), "train-mode")


def _check_empty_batch(ctx: _Context) -> None:
    module = ctx.build().eval()
    for hw in ctx.sizes():
        x = ctx.input(0, hw)
        with torch.no_grad(), _forward_errors("empty_batch", x, "eval-mode forward"):
            y = module(x)
        _check_output("empty_batch", x, y, ctx)
    # in training too: a rank of a distributed sampler or a filtered crop batch can be empty,
    # and code paths guarded by self.training are not covered by the eval runs
    module.train()
    x = ctx.input(0, ctx.typical())
    with _forward_errors("empty_batch", x, "train-mode forward"):
        y = module(x)
    _check_output("empty_batch", x, y, ctx)


def _check_gradients(ctx: _Context) -> None:
    module = ctx.prepared().train()
    x = ctx.input(ctx.train_batch, ctx.typical()).requires_grad_()
    with _forward_errors("gradients", x, "train-mode forward and backward"):
        y = _check_output("gradients", x, module(x), ctx)
        weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(ctx.seed + 1))
        (y * weight).sum().backward()
    if x.grad is None:
        _fail("gradients", x.shape, "the input received no gradient (grad is None)")
    if not torch.isfinite(x.grad).all():
        _fail(
            "gradients",
            x.shape,
            f"{int((~torch.isfinite(x.grad)).sum())} non-finite input gradient values",
        )
    if not x.grad.abs().sum() > 0:
        _fail("gradients", x.shape, "the input gradient is exactly zero everywhere")
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            _fail(
                "gradients",
                x.shape,
                f"parameter {name!r} {tuple(p.shape)} received no gradient (grad is None)",
                "Every parameter with requires_grad=True must take part in the train-mode forward; "
                "freeze it (requires_grad_(False)) or register it as a buffer if it is not learned.",
            )
        if not torch.isfinite(p.grad).all():
            _fail(
                "gradients",
                x.shape,
                f"parameter {name!r} has {int((~torch.isfinite(p.grad)).sum())} non-finite gradient values",
            )


def _gradcheck_error_summary(message: str) -> str:
    idx = re.search(r"with respect to input (\d+)", message)
    which = ""
    if idx is not None:
        which = (
            " with respect to the input"
            if idx.group(1) == "0"
            else " with respect to the parameters"
        )
    diff = re.search(r"max per-element difference \(slow mode\) is:?\s*([0-9.eE+-]+)", message)
    measured = (
        f"max per-element difference {diff.group(1).rstrip('.')}" if diff else first_line(message)
    )
    return f"numerical and analytical float64 Jacobians disagree{which}: {measured}"


def _check_gradcheck(ctx: _Context) -> None:
    module = copy.deepcopy(ctx.prepared()).double().eval()
    h, w = ctx.min_hw
    x = ctx.input(2, (h + 1, w + 2), dtype=torch.float64).requires_grad_()
    # a TorchScript module's parameters cannot be swapped by torch.func.functional_call: its
    # gradients are checked with respect to the input only
    scripted = isinstance(module, torch.jit.ScriptModule)
    params = (
        {} if scripted else {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    )
    # one flat vector for all parameters: fast-mode gradcheck costs the same for any count
    flat = (
        torch.cat([p.reshape(-1) for p in params.values()])
        if params
        else torch.zeros(0, dtype=torch.float64)
    )
    flat.requires_grad_()
    sizes = [p.numel() for p in params.values()]

    def fn(inp: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(vec, sizes) if sizes else ()
        new = {n: c.view_as(p) for (n, p), c in zip(params.items(), chunks)}
        return torch.func.functional_call(module, new, (inp,))

    inputs = (x, flat) if params else (x,)
    call = fn if params else (lambda inp: module(inp))
    try:
        try:
            torch.autograd.gradcheck(
                call, inputs, eps=1e-6, atol=ctx.atol, rtol=1e-3, fast_mode=True
            )
        except GradcheckError as err:
            lower = _below_float64(call, inputs)
            if lower is None:
                raise
            # the layer computes part of its float64 forward in a lower precision (an upcast
            # written as .float()): finite differences at eps=1e-6 then measure rounding, not
            # the derivative; compare again at a step and tolerance float32 can resolve
            try:
                torch.autograd.gradcheck(
                    call, inputs, eps=1e-3, atol=max(ctx.atol, 1e-3), rtol=1e-2, fast_mode=False
                )
            except GradcheckError as err32:
                which = re.search(r"with respect to input (\d+)", str(err32))
                wrt = "the input" if which is None or which.group(1) == "0" else "the parameters"
                _fail(
                    "gradcheck",
                    x.shape,
                    f"numerical and analytical Jacobians disagree with respect to {wrt}: "
                    f"max difference along a random direction "
                    f"{_directional_error(call, inputs, 1e-3):.3g} (compared at float32 "
                    f"precision, eps=1e-3, rtol=1e-2: the float64 forward computes {lower})",
                    str(err32),
                    err32,
                )
            del err
    except GradcheckError as err:
        _fail("gradcheck", x.shape, _gradcheck_error_summary(str(err)), str(err), err)
    except Exception as err:
        if getattr(err, _LABELLED, False):
            raise
        _fail(
            "gradcheck", x.shape, f"float64 forward/backward raised {_describe(err)}", str(err), err
        )


class _LowerPrecisionProbe(TorchFunctionMode):
    """Remembers the first torch function that returns a floating tensor below float64."""

    def __init__(self) -> None:
        super().__init__()
        self.found: str | None = None

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.found is None:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if (
                    isinstance(t, torch.Tensor)
                    and t.is_floating_point()
                    and t.dtype != torch.float64
                ):
                    name = getattr(func, "__name__", None) or repr(func)
                    self.found = f"{name}(...) in {t.dtype}"
                    break
        return out


def _directional_error(
    call: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], eps: float
) -> float:
    """Max abs difference between the autograd and the central-difference derivative of
    ``call`` along one random direction of all its inputs."""
    gen = torch.Generator().manual_seed(0)
    dirs = tuple(torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in inputs)
    _, analytic = torch.autograd.functional.jvp(call, inputs, dirs)
    with torch.no_grad():
        plus = call(*(t + eps * d for t, d in zip(inputs, dirs)))
        minus = call(*(t - eps * d for t, d in zip(inputs, dirs)))
    return _max_diff(analytic, (plus - minus) / (2 * eps))


def _below_float64(
    call: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]
) -> str | None:
    """Which function of the float64 forward returned a lower-precision tensor, if any."""
    probe = _LowerPrecisionProbe()
    with torch.no_grad(), probe:
        call(*inputs)
    return probe.found


_NOT_REPEATABLE = "two eval-mode forwards of the same batch differ"
_NOT_REPEATABLE_WHY = (
    "The eval-mode output is not a function of the input (random numbers or state carried "
    "between calls), so it cannot be compared with another run of the same input."
)


def _check_batch_independence(ctx: _Context) -> None:
    module = ctx.prepared().eval()
    x = ctx.input(3, ctx.typical())
    with torch.no_grad(), _forward_errors("batch_independence", x, "eval-mode forward"):
        y = _check_output("batch_independence", x, module(x), ctx)
    tol = ctx.tolerance(y)
    with torch.no_grad(), _forward_errors("batch_independence", x, "eval-mode forward"):
        again = _check_output("batch_independence", x, module(x), ctx)
    _assert_near(
        "batch_independence",
        x,
        again,
        y,
        tol,
        _NOT_REPEATABLE,
        _NOT_REPEATABLE_WHY,
    )
    for changed in range(x.shape[0]):  # each sample in turn: mixing may come from any of them
        x2 = x.clone()
        x2[changed] = ctx.input(1, ctx.typical(), seed=1 + changed)[0] * 3
        with torch.no_grad(), _forward_errors("batch_independence", x, "eval-mode forward"):
            y2 = _check_output("batch_independence", x, module(x2), ctx)
        for i in range(x.shape[0]):
            if i == changed:
                continue
            _assert_near(
                "batch_independence",
                x,
                y2[i],
                y[i],
                tol,
                f"changing sample {changed} changed sample {i}'s eval-mode output",
                "In eval mode each sample's output must depend on that sample only.",
            )
        own = _max_diff(y2[changed], y[changed])
        if not own > tol:
            _fail(
                "batch_independence",
                x.shape,
                f"changing sample {changed} changed its own output by only {own:.3g} "
                f"(tolerance {tol:.3g})",
                "The output does not depend on the input, so independence cannot be told apart "
                "from a constant (check that the module is not switched off by a zero gate).",
            )


def _eval_reference(
    ctx: _Context, prop: str, what: str = "float32 reference forward"
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The prepared module in eval mode, a typical batch of two and its output (no gradients),
    the reference a property compares another way of running the module with."""
    module = ctx.prepared().eval()
    x = ctx.input(2, ctx.typical())
    with torch.no_grad(), _forward_errors(prop, x, what):
        ref = module(x)
    return module, x, ref


def _check_autocast(ctx: _Context) -> None:
    module, x, ref = _eval_reference(ctx, "autocast")
    device_type = x.device.type
    with torch.no_grad():
        for dtype in ctx.autocast_dtypes:
            with (
                _forward_errors("autocast", x, f"forward under {dtype} autocast"),
                torch.autocast(device_type, dtype=dtype),
            ):
                out = module(x)
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != ctx.expected(x):
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                _fail(
                    "autocast",
                    x.shape,
                    f"{dtype} autocast output {shape}, expected {ctx.expected(x)}",
                )
            if out.dtype not in (x.dtype, dtype) or out.device != x.device:
                _fail(
                    "autocast",
                    x.shape,
                    f"{dtype} autocast output is {out.dtype} on {out.device}, expected "
                    f"{dtype} or the input's {x.dtype} on {x.device}",
                )
            if not torch.isfinite(out).all():
                bad = int((~torch.isfinite(out)).sum())
                _fail("autocast", x.shape, f"{bad} non-finite output values under {dtype} autocast")
            _assert_near(
                "autocast",
                x,
                out.float(),
                ref,
                ctx.half_tolerance(ref),
                f"{dtype} autocast output differs from float32",
            )


def _check_half_precision(ctx: _Context) -> None:
    # the model itself in half precision (model.to(dtype), as for inference on a GPU)
    module, x, ref = _eval_reference(ctx, "half_precision")
    with torch.no_grad():
        for dtype in ctx.autocast_dtypes:
            half = copy.deepcopy(module).to(dtype)
            what = f"forward of the module converted to {dtype}"
            with _forward_errors("half_precision", x, what):
                try:
                    out = half(x.to(dtype))
                except NotImplementedError as err:
                    # a kernel without a half-precision implementation on this device (cdist,
                    # LU solves, FFTs on CPU): the layer cannot run converted here, which is not
                    # necessarily so on a GPU
                    _fail(
                        "half_precision",
                        x.shape,
                        f"{what} raised {_describe(err)}",
                        f"{err}\nAn operator has no {dtype} kernel on {x.device.type}; if the "
                        "layer is only meant to run in half precision under autocast or on "
                        "another device, pass half_precision=False.",
                        err,
                    )
            if not isinstance(out, torch.Tensor) or out.dtype != dtype or out.device != x.device:
                got = (
                    f"{out.dtype} on {out.device}" if isinstance(out, torch.Tensor) else "no tensor"
                )
                _fail(
                    "half_precision",
                    x.shape,
                    f"the module converted to {dtype} returned {got}, expected {dtype} on "
                    f"{x.device}",
                    "A layer in a half-precision model must return that precision (cast back "
                    "what it computes in float32).",
                )
            if tuple(out.shape) != ctx.expected(x):
                _fail(
                    "half_precision",
                    x.shape,
                    f"the module converted to {dtype} returned shape {tuple(out.shape)}, "
                    f"expected {ctx.expected(x)}",
                )
            if not torch.isfinite(out).all():
                bad = int((~torch.isfinite(out)).sum())
                _fail("half_precision", x.shape, f"{bad} non-finite outputs of the {dtype} module")
            _assert_near(
                "half_precision",
                x,
                out.float(),
                ref,
                ctx.half_tolerance(ref),
                f"the module converted to {dtype} differs from float32",
            )


def _non_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a crop of a larger buffer: no two of its dims can be merged by ``.view``."""
    b, c, h, w = x.shape
    big = torch.zeros(b, c, h + 2, w + 3, dtype=x.dtype, device=x.device)
    view = big[..., 1 : 1 + h, 2 : 2 + w]
    view.copy_(x)
    return view


def _check_memory_format(ctx: _Context) -> None:
    module = ctx.prepared().eval()
    x = ctx.input(2, ctx.typical())
    with torch.no_grad(), _forward_errors("memory_format", x, "contiguous forward"):
        ref = module(x)
    tol = ctx.tolerance(ref)
    for label, variant in (
        ("channels_last", x.contiguous(memory_format=torch.channels_last)),
        ("non-contiguous", _non_contiguous(x)),
    ):
        with torch.no_grad(), _forward_errors("memory_format", x, f"{label} forward"):
            out = _check_output("memory_format", x, module(variant), ctx)
        diff = _max_diff(out, ref)
        if not diff <= tol:
            _fail(
                "memory_format",
                x.shape,
                f"{label} input gives an output {diff:.3g} away from the contiguous one "
                f"(max abs; tolerance {tol:.3g})",
            )


def _check_compile(ctx: _Context) -> None:
    module, x, ref = _eval_reference(ctx, "compile", "eager reference forward")
    with torch.no_grad():
        torch.compiler.reset()
        try:
            with _forward_errors("compile", x, 'torch.compile(fullgraph=True, backend="eager")'):
                compiled = torch.compile(module, fullgraph=True, backend="eager")
                out = compiled(x)
        finally:
            torch.compiler.reset()
    _check_output("compile", x, out, ctx)
    _assert_near("compile", x, out, ref, ctx.tolerance(ref), "compiled output differs from eager")


def _check_state_dict(ctx: _Context) -> None:
    module = ctx.prepared().train()
    x = ctx.input(2, ctx.typical())
    # a train-mode forward first: state it updates (running statistics, moving averages) must
    # be in the state_dict too
    warm = ctx.input(ctx.train_batch, ctx.typical(), seed=5)
    with torch.no_grad(), _forward_errors("state_dict", warm, "train-mode forward"):
        module(warm)
    module.eval()
    buffer = io.BytesIO()
    with _forward_errors("state_dict", x, "saving and loading the state_dict"):
        torch.save(module.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        # another initialisation: state outside the state_dict must not match by seeding
        fresh = ctx.build(stream=1)
        fresh.load_state_dict(state, strict=True)
    fresh.eval()
    with torch.no_grad(), _forward_errors("state_dict", x, "eval-mode forward"):
        ref = module(x)
        out = _check_output("state_dict", x, fresh(x), ctx)
    _assert_near(
        "state_dict",
        x,
        out,
        ref,
        ctx.tolerance(ref),
        "a fresh module loaded with the state_dict differs",
        "Some state that affects the output is not in the state_dict.",
    )


_OTHER_DEVICE = "meta"


def _check_device(ctx: _Context) -> None:
    # Construction: build under another default device; everything must land there.
    try:
        with torch.device(_OTHER_DEVICE):
            module = ctx.build()
    except Exception as err:
        _fail(
            "device",
            None,
            f"building under torch.device({_OTHER_DEVICE!r}) raised {_describe(err)}",
            str(err),
            err,
        )
    for kind, named in (
        ("parameter", module.named_parameters()),
        ("buffer", module.named_buffers()),
    ):
        for name, t in named:
            if t.device.type != _OTHER_DEVICE:
                _fail(
                    "device",
                    None,
                    f"{kind} {name!r} is on {t.device} after building under "
                    f"torch.device({_OTHER_DEVICE!r})",
                    "Create tensors in __init__ with torch factory functions (or pass device=) so "
                    "that the module can be built directly on any device.",
                )
    # Forward: tensors the forward creates must follow the input, not the default device.
    # The module under the other default device runs first, on a copy that has never run:
    # a cache the forward builds on its first call must follow the input too.
    module = ctx.prepared().eval()
    fresh = copy.deepcopy(module)
    x = ctx.input(2, ctx.typical())
    with torch.no_grad():
        with (
            _forward_errors("device", x, f"forward under torch.device({_OTHER_DEVICE!r})"),
            torch.device(_OTHER_DEVICE),
        ):
            out = fresh(x)
        with _forward_errors("device", x, "reference forward"):
            ref = _check_output("device", x, module(x), ctx)
            again = _check_output("device", x, module(x), ctx)
    _check_output("device", x, out, ctx)
    # a forward that differs from itself would be blamed on the device otherwise
    _assert_near("device", x, again, ref, ctx.tolerance(ref), _NOT_REPEATABLE, _NOT_REPEATABLE_WHY)
    _assert_near(
        "device", x, out, ref, ctx.tolerance(ref), "forward under another default device differs"
    )


_CHECKS: dict[str, Callable[[_Context], None]] = {
    "shapes": _check_shapes,
    "empty_batch": _check_empty_batch,
    "gradients": _check_gradients,
    "batch_independence": _check_batch_independence,
    "gradcheck": _check_gradcheck,
    "autocast": _check_autocast,
    "half_precision": _check_half_precision,
    "memory_format": _check_memory_format,
    "compile": _check_compile,
    "state_dict": _check_state_dict,
    "device": _check_device,
}


def _as_factory(factory: object) -> Callable[[int], nn.Module]:
    if isinstance(factory, str):  # a registry name: checked now, built by create_ga
        from ..registry import create_ga, get_ga_class

        get_ga_class(factory)
        return functools.partial(create_ga, factory)
    if isinstance(factory, nn.Module) or not callable(factory):
        raise TypeError(
            "factory must be a registry name, an nn.Module class or a callable channels -> "
            "nn.Module (a fresh "
            f"module on every call), got {type(factory).__name__} {factory!r}"
        )
    return factory


def check_ga(
    factory: Factory,
    *,
    channels: int = 16,
    out_channels: int | None = None,
    min_size: int | tuple[int, int] | None = None,
    train_batch: int = 2,
    seed: int = 0,
    randomize: bool = True,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    autocast_dtypes: Sequence[torch.dtype] = (torch.bfloat16, torch.float16),
    autocast_tol: float = 0.05,
    shapes: bool = True,
    empty_batch: bool = True,
    gradients: bool = True,
    batch_independence: bool = True,
    gradcheck: bool = True,
    autocast: bool = True,
    half_precision: bool = True,
    memory_format: bool = True,
    compile: bool = True,
    state_dict: bool = True,
    device: bool = True,
    only: Collection[str] | None = None,
) -> list[str]:
    """Assert that ``factory(channels)`` builds a layer meeting the GA contract.

    ``factory`` is a registry name (``"psp"``), an ``nn.Module`` class or any callable
    ``channels -> nn.Module`` that returns a fresh module on every call (``functools.partial(MyGA, reduction=4)``, a lambda). The layer
    maps (B, channels, H, W) to (B, out_channels, H, W) (``out_channels`` defaults to
    ``channels``). Inputs are float32 on the CPU. Exceptions the factory raises propagate
    unchanged; an exception the module raises during a check (its own ``AssertionError``
    included) fails that property, chained to the original.

    Properties (each switched off by passing ``<name>=False``):

    - ``shapes``: output shape, dtype and device for B in {1, 2} in eval mode and
      B = ``train_batch`` in train mode, on the smallest map the layer declares, a wide, a tall
      and a generic one (every combination of odd and even sides); the forward must leave its
      input unchanged in both modes. Every output of every property must be finite (a
      non-finite one fails the first property that meets it).
    - ``empty_batch``: the same for B = 0, in eval mode on every map and in train mode (a rank
      of a distributed sampler or a filtered batch can be empty).
    - ``device``: built under ``torch.device("meta")`` every parameter and buffer is on "meta";
      the forward run under ``torch.device("meta")`` on a CPU input (the module's first
      forward, so caches built on a first call are covered) still gives the CPU result,
      so no tensor is created on the default device instead of the input's (a tensor created
      with a hard-coded ``device="cpu"`` cannot be told apart on CPU inputs); a forward that
      differs from itself on the same input is reported as such, not as a device problem.
    - ``gradients``: in train mode the input and every parameter with ``requires_grad`` receive
      finite gradients (the input's not all zero). A parameter's gradient must not be ``None``;
      exactly zero is accepted, as behind a zero-initialised last layer, which is in the graph
      and learns once that layer moves.
    - ``batch_independence``: in eval mode, the same batch twice gives the same output, and
      changing one sample (each of three in turn) changes that sample's output only.
    - ``gradcheck``: float64 ``torch.autograd.gradcheck`` (fast mode) with respect to the input
      and every parameter, eval mode (the input only for a TorchScript module, whose
      parameters ``torch.func.functional_call`` cannot replace).
    - ``autocast``: under autocast in each of ``autocast_dtypes`` the output has that dtype or
      the input's, stays on the input's device, is finite and is within
      ``autocast_tol * max(|float32 output|, 1)`` of the float32 output.
    - ``half_precision``: the module converted to each of ``autocast_dtypes``
      (``module.to(dtype)``, as for half-precision inference) returns that dtype, finite and
      within the same tolerance of the float32 output. An operator without a half kernel on
      the CPU (``torch.cdist``, LU solves) fails it; switch it off for such layers.
    - ``memory_format``: channels_last and non-contiguous inputs (a crop of a larger buffer)
      give the contiguous result.
    - ``compile``: ``torch.compile(fullgraph=True, backend="eager")`` agrees with eager
      (``torch.compiler.reset()`` runs before and after).
    - ``state_dict``: after one train-mode forward, a fresh module loaded (strictly) with the
      state_dict saved and reloaded through ``torch.save``/``torch.load(weights_only=True)``
      gives the same eval-mode output.

    Minimum size: the layer's ``min_size`` attribute (int or ``(h, w)``; 1 when absent), or the
    ``min_size`` argument, which wins. Train mode uses batch ``train_batch`` (2: BatchNorm on a 1x1
    map needs two samples). Unless ``randomize=False`` every parameter and running statistic is
    first moved away from its initial value (:func:`randomize_`) so that zero-initialised gates
    do not make the checks vacuous. float32 comparisons pass when the max abs difference is at
    most ``atol + rtol * max|reference|``. Modules are built, and each property runs, with the
    CPU generator seeded from ``seed`` (and the caller's state restored afterwards, also when a
    property fails), so a failure reproduces from run to run, whatever ran before, and a layer
    that draws random numbers in training mode (dropout) leaves the test's own stream alone;
    the fresh module of the ``state_dict`` check is drawn from another seed.

    ``only`` (a collection of property names) runs just those properties.

    Returns the names of the properties checked. Raises ``AssertionError`` on the first failing
    property; its first line names the property, the input shape and the measured error or
    what failed.

    Every built-in GA passes with its default arguments except :class:`gald.ga.EMA`, which needs
    ``em_grad=True`` (see :mod:`gald.testing`).
    """
    fac = _as_factory(factory)
    channels = check_positive_int(channels, "channels")
    out = channels if out_channels is None else check_positive_int(out_channels, "out_channels")
    train_batch = check_positive_int(train_batch, "train_batch")
    seed = _check_seed(seed)
    tolerances = {}
    for key, value in (("atol", atol), ("rtol", rtol), ("autocast_tol", autocast_tol)):
        tolerances[key] = check_float(value, key)
        if tolerances[key] < 0:
            raise ValueError(f"{key} must be >= 0, got {tolerances[key]}")
    dtypes = tuple(check_ordered_items(autocast_dtypes, "autocast_dtypes", "torch dtypes"))
    for dt in dtypes:
        if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
            raise TypeError(f"autocast_dtypes must hold floating torch dtypes, got {dt!r}")
        if dt not in (torch.bfloat16, torch.float16):
            raise ValueError(
                f"autocast_dtypes must hold torch.bfloat16 and/or torch.float16 (the types "
                f"autocast runs in), got {dt}"
            )
    switches = {
        "shapes": shapes,
        "empty_batch": empty_batch,
        "gradients": gradients,
        "batch_independence": batch_independence,
        "gradcheck": gradcheck,
        "autocast": autocast,
        "half_precision": half_precision,
        "memory_format": memory_format,
        "compile": compile,
        "state_dict": state_dict,
        "device": device,
    }
    switches = {key: check_bool(value, key) for key, value in switches.items()}
    randomize = check_bool(randomize, "randomize")
    if only is not None:
        if isinstance(only, str) or not isinstance(only, Iterable):
            raise TypeError(f"only must be a collection of property names, got {only!r}")
        only = tuple(only)  # a generator is read once
        if not all(isinstance(o, str) for o in only):
            raise TypeError(f"only must be a collection of property names, got {only!r}")
        unknown = sorted(set(only) - set(PROPERTIES))
        if unknown:
            raise ValueError(
                f"only names unknown properties {unknown}; expected names from {PROPERTIES}"
            )
        if not only:
            raise ValueError(
                f"only is empty: nothing would be checked; expected names from {PROPERTIES}"
            )
        off = [name for name in PROPERTIES if name in only and not switches[name]]
        if off:
            raise ValueError(
                f"only={list(only)} asks for {off}, which "
                + " and ".join(f"{name}=False" for name in off)
                + " switches off"
            )
        switches = {k: k in only for k in switches}
    for name in ("autocast", "half_precision"):
        if switches[name] and not dtypes:
            raise ValueError(
                f"autocast_dtypes is empty, so the {name} property would check nothing; pass "
                f"{name}=False to skip it"
            )
    with torch.random.fork_rng(devices=[]):
        probe = fac(channels)
        if not isinstance(probe, nn.Module):
            raise TypeError(f"factory must return an nn.Module, got {type(probe).__name__}")
        again = fac(channels)
    if again is probe:
        raise ValueError(
            "factory returned the same module instance twice; it must build a fresh module on "
            "every call (the checks compare independent copies), e.g. a class or "
            "lambda c: MyGA(c)"
        )
    min_hw = declared_min_size(probe) if min_size is None else check_size_pair(min_size, "min_size")
    ctx = _Context(
        factory=fac,
        channels=channels,
        out_channels=out,
        min_hw=min_hw,
        train_batch=train_batch,
        seed=seed,
        randomize=randomize,
        atol=tolerances["atol"],
        rtol=tolerances["rtol"],
        autocast_dtypes=dtypes,
        autocast_tol=tolerances["autocast_tol"],
    )
    done = []
    for index, name in enumerate(PROPERTIES):
        if switches[name]:
            # a train-mode forward may draw random numbers (dropout, drop-path): from a stream of
            # the property's own, so that it reproduces alone, and never from the caller's
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed * 7919 + 15485863 * (index + 1))
                _CHECKS[name](ctx)
            done.append(name)
    return done


def check_gald(
    ga_factory: str | Factory,
    *,
    in_channels: int = 16,
    out_channels: int | None = None,
    gald_kwargs: Mapping[str, Any] | None = None,
    **check_kwargs: Any,
) -> list[str]:
    """Assert that a GA layer meets the contract inside :class:`gald.GALD`.

    ``ga_factory`` is a registry name, an ``nn.Module`` class (GALD builds it, passing its norm
    and activation where the class takes them) or a callable ``in_channels -> nn.Module``. A GA
    that changes the width (``in_channels -> out_channels``) is checked at the width GALD
    infers for it (a dry run, as :class:`gald.GALD` does), or at ``out_channels=`` when given,
    which is also passed to ``GALD``. ``gald_kwargs`` go to
    ``GALD``; every other keyword goes to :func:`check_ga` (the block's ``min_size`` attribute
    sets the smallest map checked). The width is ``in_channels``, not ``check_ga``'s
    ``channels``.

    Example:
        >>> from gald.testing import check_gald
        >>> check_gald("gc", compile=False)  # doctest: +ELLIPSIS
        [...]
    """
    from ..block import GALD

    if "channels" in check_kwargs:
        raise TypeError(
            "check_gald takes in_channels= (the width GALD receives) and out_channels=, "
            f"not channels={check_kwargs['channels']!r}"
        )
    if gald_kwargs is not None and not isinstance(gald_kwargs, Mapping):
        raise TypeError(
            f"gald_kwargs must be a mapping of GALD arguments, got {type(gald_kwargs).__name__}"
        )
    extra = dict(gald_kwargs or {})
    if "out_channels" in extra:
        raise ValueError("pass out_channels to check_gald directly, not inside gald_kwargs")
    ga_own = extra.get("ga_kwargs") or {}
    if out_channels is not None and "out_channels" in ga_own:
        raise ValueError(
            f"out_channels is given twice: out_channels={out_channels!r} and "
            f"gald_kwargs['ga_kwargs']['out_channels']={ga_own['out_channels']!r}; pass one"
        )
    in_channels = check_positive_int(in_channels, "in_channels")
    if not isinstance(ga_factory, str):
        _as_factory(ga_factory)

    def build(c: int) -> nn.Module:
        ga: Any = ga_factory
        if not isinstance(ga_factory, (str, type)):
            ga = ga_factory(c)
        return GALD(c, ga, **extra)

    if out_channels is None:
        # GALD infers the width once, as it would for the user; a build that fails here fails
        # again, as a labelled construction failure, inside check_ga
        try:
            with torch.random.fork_rng(devices=[]):  # the caller's random stream stays as it was
                width = getattr(build(in_channels), "out_channels", in_channels)
        except Exception:  # reported by check_ga's own construction, labelled
            width = in_channels
    else:
        width = check_positive_int(out_channels, "out_channels")
    # then explicit: the blocks check_ga builds do not each run GALD's dry run (unless the GA's
    # own arguments set it, which GALD reads and refuses to be given twice)
    if "out_channels" not in ga_own:
        extra["out_channels"] = width
    token = _CHECKER.set("check_gald")
    try:
        return check_ga(build, channels=in_channels, out_channels=width, **check_kwargs)
    finally:
        _CHECKER.reset(token)
