"""gald.testing: check_ga / check_gald pass on a sound layer, name the right property on broken
ones, and the hypothesis strategies draw what they promise."""

from __future__ import annotations

import re
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import hypothesis
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import gald
import gald.testing
from gald.testing import (
    PROPERTIES,
    check_ga,
    check_gald,
    declared_min_size,
    feature_maps,
    ga_inputs,
    randomize_,
)

C = 8


class SqueezeExcitation(nn.Module):
    """A plain squeeze-excitation layer, as a downstream project would write it."""

    def __init__(self, channels: int, reduction: int = 4, out_channels: int | None = None) -> None:
        super().__init__()
        self.channels = channels
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)
        self.proj = None if out_channels is None else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        y = x * gate
        return y if self.proj is None else self.proj(y)


# ---- deliberately broken layers: each breaks exactly one property ---------------------------


class MixesBatch(SqueezeExcitation):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x.mean(0, keepdim=True)  # statistics across the batch


class WrongShape(SqueezeExcitation):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[:, 1:]


class UnusedParameter(SqueezeExcitation):
    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.temperature = nn.Parameter(torch.ones(1))  # never used in forward


class CrashesOnEmpty(SqueezeExcitation):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        pooled = x.reshape(b, c, -1).mean(-1)  # reshape with -1 fails on an empty batch
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(pooled[..., None, None]))))


class BufferOnDefaultDevice(SqueezeExcitation):
    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.register_buffer("scale", torch.ones(channels, 1, 1, device="cpu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


class TensorOnDefaultDeviceInForward(SqueezeExcitation):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(0.5, 1.5, x.shape[-1], dtype=x.dtype)  # no device=x.device
        return super().forward(x) * ramp


class _WrongBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * x  # should be 2 * x


class WrongGradient(SqueezeExcitation):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _WrongBackward.apply(super().forward(x))


class Fp16Overflow(SqueezeExcitation):
    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.big = nn.Conv2d(channels, channels, 1, bias=False)
        with torch.no_grad():
            self.big.weight.copy_(torch.eye(channels)[..., None, None] * 1e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.big(super().forward(x)) / 1e5  # overflows fp16 in between


class LayoutDependent(SqueezeExcitation):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # reads the storage as if it were contiguous
        raw = torch.as_strided(x, (b, c, h, w), (c * h * w, h * w, w, 1))
        return super().forward(raw)


class DataDependentBranch(SqueezeExcitation):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.fc2.bias.sum().item() > -1e9:  # .item() breaks the graph: fullgraph refuses it
            return y
        return -y


class StateOutsideStateDict(SqueezeExcitation):
    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.scale = torch.rand(channels, 1, 1) + 0.5  # a plain attribute, not a buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale.to(x.dtype)


class NeedsThree(SqueezeExcitation):
    min_size = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] < 3 or x.shape[-2] < 3:
            raise ValueError("too small")
        return F.avg_pool2d(super().forward(x), 3, stride=1, padding=1, count_include_pad=False)


# ---- check_ga -------------------------------------------------------------------------------


def test_sound_layer_passes_every_property() -> None:
    assert check_ga(SqueezeExcitation, channels=C) == list(PROPERTIES)
    assert check_ga(
        partial(SqueezeExcitation, reduction=2), channels=C, out_channels=C, compile=False
    )


FIRST_LINE = re.compile(
    r"^(?P<prop>\w+): (?P<where>input shape \([\d, ]+\)|construction): (?P<measured>.+)$"
)


@pytest.mark.parametrize(
    ("cls", "prop", "measured"),
    [
        (
            MixesBatch,
            "batch_independence",
            r"changing sample 0 changed sample 1's eval-mode output by [\d.e+-]+ ",
        ),
        (WrongShape, "shapes", r"output shape \(2, 7, 1, 1\), expected \(2, 8, 1, 1\)"),
        (UnusedParameter, "gradients", r"parameter 'temperature' \(1,\) received no gradient"),
        (CrashesOnEmpty, "empty_batch", r"eval-mode forward raised RuntimeError: .*0 elements"),
        (
            BufferOnDefaultDevice,
            "device",
            r"buffer 'scale' is on cpu after building under torch.device\('meta'\)",
        ),
        (TensorOnDefaultDeviceInForward, "device", r"forward under torch.device\('meta'\) raised"),
        (
            WrongGradient,
            "gradcheck",
            r"Jacobians disagree with respect to the (input|parameters): max per-element difference [\d.e+-]+",
        ),
        (Fp16Overflow, "autocast", r"\d+ non-finite output values under torch.float16 autocast"),
        (LayoutDependent, "memory_format", r"channels_last input gives an output [\d.e+-]+ away"),
        (
            DataDependentBranch,
            "compile",
            r"torch.compile\(fullgraph=True, backend=\"eager\"\) raised",
        ),
        (
            StateOutsideStateDict,
            "state_dict",
            r"a fresh module loaded with the state_dict differs by [\d.e+-]+",
        ),
    ],
)
def test_broken_layer_fails_on_its_property(cls: type[nn.Module], prop: str, measured: str) -> None:
    # all properties on: the broken one is the one reported, and only it
    with pytest.raises(AssertionError) as info:
        check_ga(cls, channels=C)
    first = str(info.value).splitlines()[0]
    match = FIRST_LINE.match(first)
    assert match is not None, first
    assert match["prop"] == prop, first
    assert re.search(measured, match["measured"]), first
    assert f"{prop}=False" in str(info.value)
    if cls is WrongShape:
        return  # every property reads the output shape
    # switching that property off lets the rest pass (compile is slow: off unless it is the one)
    switches = {prop: False} if prop == "compile" else {prop: False, "compile": False}
    if prop == "autocast":
        switches["half_precision"] = False  # the model converted to float16 overflows as well
    assert prop not in check_ga(cls, channels=C, **switches)


def test_only_and_switches() -> None:
    assert check_ga(MixesBatch, channels=C, only=("shapes", "gradients")) == ["shapes", "gradients"]
    with pytest.raises(
        ValueError, match=r"asks for \['compile'\], which compile=False switches off"
    ):
        check_ga(SqueezeExcitation, channels=C, only=["shapes", "compile"], compile=False)
    # a generator is read once, and an empty one is refused like an empty list
    assert check_ga(SqueezeExcitation, channels=C, only=(p for p in ["shapes"])) == ["shapes"]
    with pytest.raises(ValueError, match="only is empty"):
        check_ga(SqueezeExcitation, only=(p for p in []))
    with pytest.raises(ValueError, match=r"only names unknown properties \['shape'\]"):
        check_ga(SqueezeExcitation, only=("shape",))
    with pytest.raises(TypeError, match="only must be a collection of property names"):
        check_ga(SqueezeExcitation, only="shapes")
    with pytest.raises(TypeError, match="gradcheck must be a bool, got str"):
        check_ga(SqueezeExcitation, gradcheck="no")  # type: ignore[arg-type]


def test_bad_factory_and_arguments() -> None:
    with pytest.raises(
        TypeError, match="factory must be a registry name, an nn.Module class or a callable"
    ):
        check_ga(SqueezeExcitation(C))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="factory must return an nn.Module, got Tensor"):
        check_ga(lambda c: torch.zeros(c))  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="channels must be >= 1, got 0"):
        check_ga(SqueezeExcitation, channels=0)
    with pytest.raises(ValueError, match=r"min_size must be an int or a pair .* got 3 items"):
        check_ga(SqueezeExcitation, min_size=(1, 2, 3))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="autocast_dtypes must hold floating torch dtypes"):
        check_ga(SqueezeExcitation, autocast_dtypes=(torch.int8,))
    with pytest.raises(TypeError, match="autocast_dtypes must be a sequence of torch dtypes"):
        check_ga(SqueezeExcitation, autocast_dtypes=torch.float16)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"seed": "x"}, TypeError, "seed must be an int, got str"),
        ({"atol": "x"}, TypeError, "atol must be a float, got str"),
        ({"rtol": -1e-4}, ValueError, r"rtol must be >= 0, got -0.0001"),
        ({"autocast_tol": None}, TypeError, "autocast_tol must be a float, got NoneType"),
        ({"autocast_tol": float("nan")}, ValueError, "autocast_tol must be a finite number"),
        ({"randomize": "no"}, TypeError, "randomize must be a bool, got str"),
        ({"only": ()}, ValueError, "only is empty: nothing would be checked"),
    ],
)
def test_bad_numbers_and_switches(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        check_ga(SqueezeExcitation, **kwargs)


def test_numpy_numbers_are_accepted() -> None:
    import numpy as np

    done = check_ga(
        SqueezeExcitation,
        channels=np.int64(C),
        seed=np.int32(1),
        atol=np.float32(1e-5),
        min_size=(np.int64(2), np.int64(3)),
        only=("shapes",),
    )
    assert done == ["shapes"]


def test_check_gald_refuses_gald_kwargs_that_are_not_a_mapping() -> None:
    with pytest.raises(
        TypeError, match="gald_kwargs must be a mapping of GALD arguments, got list"
    ):
        check_gald("gc", gald_kwargs=[("ld", False)])  # type: ignore[arg-type]


def test_declared_min_size_is_respected() -> None:
    assert declared_min_size(NeedsThree(C)) == (3, 3)
    assert declared_min_size(SqueezeExcitation(C)) == (1, 1)
    check_ga(NeedsThree, channels=C, only=("shapes", "batch_independence"))
    with pytest.raises(
        AssertionError,
        match=r"^shapes: input shape \(2, 8, 1, 1\): eval-mode forward raised ValueError: too small",
    ):
        check_ga(NeedsThree, channels=C, min_size=1, only=("shapes",))
    # an (h, w) pair: the smallest map checked is exactly 3 x 3
    check_ga(NeedsThree, channels=C, min_size=(3, 3), only=("shapes",))


def test_randomize_moves_parameters_and_running_stats() -> None:
    a = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    b = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    b.load_state_dict(a.state_dict())
    before = {k: v.clone() for k, v in a.state_dict().items()}
    randomize_(a, seed=3)
    randomize_(b, seed=3)
    for key in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        assert not torch.equal(a.state_dict()[key], before[key]), key
        assert torch.equal(a.state_dict()[key], b.state_dict()[key]), key  # same seed, same values
    assert (a[1].running_var >= 0.5).all() and (a[1].running_var <= 1.5).all()


class ZeroGated(SqueezeExcitation):
    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.gamma = nn.Parameter(torch.zeros(1))  # zero-initialised residual gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * super().forward(x)


def test_randomize_keeps_zero_gates_from_making_checks_vacuous() -> None:
    check_ga(ZeroGated, channels=C, only=("batch_independence", "gradients"))
    with pytest.raises(
        AssertionError, match=r"^batch_independence: .*changed its own output by only 0 "
    ):
        check_ga(ZeroGated, channels=C, randomize=False, only=("batch_independence",))


class AssertsNonEmpty(SqueezeExcitation):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[0] > 0, "empty batch"  # the module's own assertion
        return super().forward(x)


class CrashAlways(SqueezeExcitation):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def test_the_modules_own_assertion_is_labelled_and_chained() -> None:
    with pytest.raises(AssertionError) as info:
        check_ga(AssertsNonEmpty, channels=C)
    first = str(info.value).splitlines()[0]
    assert (
        first == "empty_batch: input shape (0, 8, 1, 1): eval-mode forward raised AssertionError: "
        "empty batch"
    )
    assert type(info.value) is AssertionError  # not a subclass: reads as usual in a traceback
    cause = info.value.__cause__
    assert type(cause) is AssertionError and str(cause).startswith("empty batch")


@pytest.mark.parametrize("prop", PROPERTIES)
def test_every_forward_error_is_labelled_with_its_property(prop: str) -> None:
    # the reference forwards (float32 under autocast, eager under compile, ...) included
    with pytest.raises(AssertionError) as info:
        check_ga(CrashAlways, channels=C, only=(prop,))
    first = str(info.value).splitlines()[0]
    match = FIRST_LINE.match(first)
    assert match is not None and match["prop"] == prop, first
    assert match["where"].startswith("input shape"), first
    assert "raised RuntimeError: boom" in match["measured"], first
    assert isinstance(info.value.__cause__, RuntimeError)


def test_builtin_ema_needs_em_grad_as_the_docs_say() -> None:
    # docs/testing.md and the gald.testing docstring name EMA as the one built-in that fails
    # with its defaults: the EM loop runs under no_grad, so conv1 gets no gradient
    from gald.ga import EMA

    with pytest.raises(
        AssertionError, match=r"^gradients: .*parameter 'conv1\.weight' .*received no gradient"
    ):
        check_ga(EMA, channels=C, compile=False)
    assert check_ga(partial(EMA, em_grad=True), channels=C, only=("gradients", "gradcheck"))
    docs = (Path(__file__).resolve().parents[1] / "docs" / "testing.md").read_text()
    assert "`em_grad=True`" in docs and "`conv1`" in docs


class ZeroInitLast(SqueezeExcitation):
    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        nn.init.zeros_(self.fc2.weight)  # zero-initialised last layer: fc1's gradient is 0
        nn.init.zeros_(self.fc2.bias)  # type: ignore[arg-type]


def test_an_exactly_zero_parameter_gradient_is_accepted() -> None:
    layer = ZeroInitLast(C).train()
    layer(torch.randn(2, C, 3, 3)).sum().backward()
    assert layer.fc1.weight.grad is not None and not layer.fc1.weight.grad.any()
    assert check_ga(ZeroInitLast, channels=C, randomize=False, only=("gradients",)) == ["gradients"]


# ---- check_gald -----------------------------------------------------------------------------


def test_check_gald_with_a_home_made_layer() -> None:
    checked = check_gald(SqueezeExcitation, in_channels=C, compile=False)
    assert checked == [p for p in PROPERTIES if p != "compile"]
    check_gald(
        lambda c: SqueezeExcitation(c, reduction=2), in_channels=C, only=("shapes", "gradients")
    )


def test_check_gald_with_a_width_changing_layer() -> None:
    widen = partial(SqueezeExcitation, out_channels=12)
    checked = check_gald(widen, in_channels=C, out_channels=12, compile=False, gradcheck=False)
    assert "shapes" in checked
    check_gald(
        partial(SqueezeExcitation, out_channels=12),
        in_channels=C,
        out_channels=12,
        only=("shapes",),
    )
    # without out_channels, the width GALD infers (a dry run) is the one checked
    assert check_gald(widen, in_channels=C, only=("shapes",)) == ["shapes"]
    # a wrong explicit width: GALD refuses to build the block
    with pytest.raises(ValueError, match=r"out_channels=10 does not match .* returns 12"):
        check_gald(widen, in_channels=C, out_channels=10, only=("shapes",))
    # the width set among the GA's own arguments, as GALD accepts it
    assert check_gald(
        "aspp",
        in_channels=C,
        gald_kwargs={"ga_kwargs": {"out_channels": 12, "inner_channels": 4}},
        only=("shapes",),
    ) == ["shapes"]
    with pytest.raises(ValueError, match=r"out_channels is given twice: out_channels=12 and"):
        check_gald(
            "aspp",
            in_channels=C,
            out_channels=12,
            gald_kwargs={"ga_kwargs": {"out_channels": 12, "inner_channels": 4}},
            only=("shapes",),
        )


def test_check_gald_failure_names_check_gald() -> None:
    with pytest.raises(AssertionError, match=r"^state_dict: ") as info:
        check_gald(StateOutsideStateDict, in_channels=C, only=("state_dict",))
    assert str(info.value).endswith("(pass state_dict=False to check_gald to skip this property)")
    with pytest.raises(AssertionError) as info:  # and check_ga, called afterwards, its own name
        check_ga(StateOutsideStateDict, channels=C, only=("state_dict",))
    assert str(info.value).endswith("(pass state_dict=False to check_ga to skip this property)")


def test_check_ga_takes_a_registry_name() -> None:
    assert "shapes" in check_ga("gc", only=("shapes", "state_dict"))
    with pytest.raises(ValueError, match="unknown GA module 'gcc'"):
        check_ga("gcc")


def test_check_gald_arguments() -> None:
    with pytest.raises(ValueError, match="pass out_channels to check_gald directly"):
        check_gald(SqueezeExcitation, gald_kwargs={"out_channels": 4})
    with pytest.raises(
        TypeError, match="factory must be a registry name, an nn.Module class or a callable"
    ):
        check_gald(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"check_gald takes in_channels= .* not channels=16"):
        check_gald(SqueezeExcitation, channels=16)


# ---- strategies -----------------------------------------------------------------------------


@given(
    x=feature_maps(3, batch=(0, 2), height=(1, 5), width=4, memory_format=torch.channels_last),
)
def test_feature_maps_draws_in_range(x: torch.Tensor) -> None:
    b, c, h, w = x.shape
    assert 0 <= b <= 2 and c == 3 and 1 <= h <= 5 and w == 4
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    assert x.is_contiguous(memory_format=torch.channels_last)


@given(data=st.data())
def test_ga_inputs_respect_the_declared_minimum(data: st.DataObject) -> None:
    layer = NeedsThree(C).double()
    layer.min_size = (3, 2)  # type: ignore[assignment]
    x = data.draw(ga_inputs(layer, batch=(1, 2), max_side=6))
    assert x.shape[1] == C and x.dtype == torch.float64
    assert 3 <= x.shape[2] <= 6 and 2 <= x.shape[3] <= 6


@given(x=ga_inputs(SqueezeExcitation(C), max_side=9))
def test_a_downstream_property_test(x: torch.Tensor) -> None:
    layer = SqueezeExcitation(C).eval()
    with torch.no_grad():
        assert layer(x).shape == x.shape


def test_strategy_arguments() -> None:
    with pytest.raises(ValueError, match=r"height must satisfy 1 <= low <= high, got \(0, 4\)"):
        feature_maps(3, height=(0, 4))
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        feature_maps(3, dtype=torch.int64)
    with pytest.raises(TypeError, match="memory_format must be a torch.memory_format"):
        feature_maps(3, memory_format=())
    with pytest.raises(TypeError, match="scale must be a float, got str"):
        feature_maps(3, scale="x")  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match="no int 'in_channels' or 'channels' attribute; pass channels="
    ):
        ga_inputs(nn.Identity())
    # the override is what is drawn: the largest map the strategy can give has 2 channels
    drawn = hypothesis.find(
        ga_inputs(nn.Identity(), channels=2, max_side=5), lambda t: min(t.shape[-2:]) == 5
    )
    assert drawn.shape[1] == 2 and tuple(drawn.shape[-2:]) == (5, 5)


def test_strategies_name_the_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    with pytest.raises(
        ImportError,
        match=r"need hypothesis: pip install hypothesis \(or pip install 'gald\[testing\]'\)",
    ):
        feature_maps(3)


def test_import_without_hypothesis_and_not_eagerly() -> None:
    code = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "import gald\n"
        "assert 'gald.testing' not in sys.modules, 'imported eagerly'\n"
        "import gald.testing\n"
        "from gald.testing import check_ga\n"
        "print(check_ga(gald.ga.GlobalContext, channels=8, only=('shapes',)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['shapes']"


def test_docs_examples_run() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "testing.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    assert len(blocks) == 3
    namespace: dict = {}
    exec(compile("\n".join(blocks), "docs/testing.md", "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_")]
    assert len(tests) == 5
    for test in tests:
        test()


# ---- more layers of a downstream project -----------------------------------------------------


class LazySE(nn.Module):
    """Built with lazy layers: their shapes come from the first forward."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.LazyConv2d(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))


class MixesThroughSampleZero(SqueezeExcitation):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) / (x[:1].std() + 1)


class RunningMeanInAnAttribute(SqueezeExcitation):
    """Train-mode state kept outside the state_dict."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.mu = torch.zeros(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.mu = 0.9 * self.mu + 0.1 * x.mean((0, 2, 3))[:, None, None]
        return super().forward(x - self.mu)


class ScalesItsInput(SqueezeExcitation):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            x.mul_(0.5)  # in place, on the caller's tensor
        return super().forward(x)


class ScalesItsInputInTraining(SqueezeExcitation):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                x.mul_(2.0)  # hidden from autograd, not from the caller
        return super().forward(x)


class Float64UnderAutocast(SqueezeExcitation):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y.double() if torch.is_autocast_enabled("cpu") else y


class ViewsAsContiguous(SqueezeExcitation):
    """The usual non-local flattening with .view: fails on a cropped input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return super().forward(x.view(b, c, h * w).softmax(-1).view(b, c, h, w))


class CachesOnFirstCall(SqueezeExcitation):
    """Builds a positional ramp on the default device the first time it runs."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.ramp: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ramp is None:
            self.ramp = torch.linspace(0.5, 1.5, x.shape[-1])  # no device=x.device
        return super().forward(x) * self.ramp[: x.shape[-1]]


class HalvesEvenMaps(SqueezeExcitation):
    """A fast path taken only when both sides are even, with the wrong output size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return F.avg_pool2d(y, 2) if x.shape[-1] % 2 == 0 and x.shape[-2] % 2 == 0 else y


class NoisyInEval(SqueezeExcitation):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1e-2 * torch.randn_like(x)


class InfiniteInEval(SqueezeExcitation):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y if self.training else y / torch.zeros_like(y[:, :1])


@pytest.mark.parametrize(
    ("cls", "prop", "measured"),
    [
        # the first property whose forward meets the fault names it for what it is: a random
        # forward is not blamed on the device, a non-finite output not reported as a difference
        (NoisyInEval, "device", r"two eval-mode forwards of the same batch differ by"),
        (InfiniteInEval, "shapes", r"\d+ of \d+ output values are not finite \(NaN or inf\)"),
    ],
)
def test_a_fault_is_named_by_the_first_property_that_meets_it(
    cls: type[nn.Module], prop: str, measured: str
) -> None:
    with pytest.raises(AssertionError) as info:
        check_ga(cls, channels=C, compile=False)
    assert re.match(rf"{prop}: input shape \(\d+, {C}, \d+, \d+\): {measured}", str(info.value))


def test_a_lazy_layer_is_initialised_before_the_checks() -> None:
    assert check_ga(LazySE, channels=C, compile=False) == [p for p in PROPERTIES if p != "compile"]


@pytest.mark.parametrize(
    ("cls", "prop", "measured"),
    [
        (
            MixesThroughSampleZero,
            "batch_independence",
            r"changing sample 0 changed sample 1's eval-mode output",
        ),
        (
            RunningMeanInAnAttribute,
            "state_dict",
            r"a fresh module loaded with the state_dict differs",
        ),
        (ScalesItsInput, "shapes", r"the eval-mode forward modified its input in place"),
        (
            ScalesItsInputInTraining,
            "shapes",
            r"the train-mode forward modified its input in place \(max abs change [\d.e+-]+\)",
        ),
        (
            Float64UnderAutocast,
            "autocast",
            r"torch.bfloat16 autocast output is torch.float64 on cpu, expected",
        ),
        (ViewsAsContiguous, "memory_format", r"non-contiguous forward raised RuntimeError: view"),
        (CachesOnFirstCall, "device", r"forward under torch.device\('meta'\) raised"),
        (HalvesEvenMaps, "shapes", r"output shape \(2, 8, 3, 4\), expected \(2, 8, 6, 8\)"),
        (NoisyInEval, "batch_independence", r"two eval-mode forwards of the same batch differ by"),
    ],
)
def test_more_broken_layers_fail_on_their_property(cls, prop: str, measured: str) -> None:
    with pytest.raises(AssertionError) as info:
        check_ga(cls, channels=C, only=[prop])
    assert re.match(rf"{prop}: input shape \(\d+, {C}, \d+, \d+\): {measured}", str(info.value))


def test_arguments_that_would_check_nothing_or_overflow() -> None:
    shared = SqueezeExcitation(C)
    with pytest.raises(ValueError, match="returned the same module instance twice"):
        check_ga(lambda c: shared, channels=C)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*32\), got 4294967296"):
        check_ga(SqueezeExcitation, seed=2**32)
    with pytest.raises(ValueError, match="autocast_dtypes is empty"):
        check_ga(SqueezeExcitation, autocast_dtypes=())
    assert check_ga(SqueezeExcitation, autocast_dtypes=(), autocast=False, only=["shapes"])
    with pytest.raises(ValueError, match=r"bfloat16 and/or torch.float16 .* got torch.float64"):
        check_ga(SqueezeExcitation, autocast_dtypes=(torch.float64,))
    np = pytest.importorskip("numpy")
    assert check_ga(SqueezeExcitation, channels=C, shapes=np.bool_(True), only=["shapes"])


def test_randomize_and_declared_min_size_validate_their_arguments() -> None:
    with pytest.raises(TypeError, match="module must be an nn.Module, got int"):
        randomize_(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed must be an int"):
        randomize_(nn.Conv2d(2, 2, 1), seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale must be"):
        randomize_(nn.Conv2d(2, 2, 1), scale=float("nan"))
    with pytest.raises(TypeError, match="module must be an nn.Module, got int"):
        declared_min_size(3)  # type: ignore[arg-type]


def test_compile_resets_dynamo_also_when_the_compiled_call_fails(monkeypatch) -> None:
    class GraphBreak(SqueezeExcitation):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            print("", end="")  # a graph break: fullgraph=True refuses it
            return super().forward(x)

    resets: list[int] = []
    real = torch.compiler.reset
    monkeypatch.setattr(torch.compiler, "reset", lambda: (resets.append(1), real())[1])
    with pytest.raises(AssertionError, match="compile: "):
        check_ga(GraphBreak, channels=C, only=["compile"])
    assert len(resets) == 2  # before and after


@given(st.data())
@hypothesis.settings(max_examples=5, deadline=None)
def test_feature_maps_refuses_formats_of_other_ranks(data) -> None:
    with pytest.raises(ValueError, match="channels_last_3d"):
        feature_maps(4, memory_format=torch.channels_last_3d)
    with pytest.raises(TypeError, match="memory_format must be a torch.memory_format"):
        feature_maps(4, memory_format=5)  # type: ignore[arg-type]
    x = data.draw(feature_maps(4, memory_format=[torch.channels_last], height=3, width=2))
    assert x.is_contiguous(memory_format=torch.channels_last) and x.shape[1:] == (4, 3, 2)


class ReturnsFloat32InAHalfModel(SqueezeExcitation):
    """Computes in float32 and forgets to cast back: breaks the next layer of a half model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).float()


def test_a_layer_that_breaks_half_precision_models_fails_half_precision() -> None:
    # under autocast it is fine: only the model converted to half precision shows the slip
    assert check_ga(ReturnsFloat32InAHalfModel, channels=C, only=["autocast"]) == ["autocast"]
    with pytest.raises(AssertionError) as info:
        check_ga(ReturnsFloat32InAHalfModel, channels=C, only=["half_precision"])
    assert re.match(
        r"half_precision: input shape \(2, 8, \d+, \d+\): the module converted to torch.bfloat16 "
        r"returned torch.float32 on cpu, expected torch.bfloat16",
        str(info.value),
    )


class PairwiseDistanceAttention(nn.Module):
    """Attention over negative squared distances: ``torch.cdist`` has no half kernel on CPU,
    while autocast runs it in float32."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.query = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        f = self.query(x).flatten(2).transpose(1, 2)
        attn = torch.softmax(-(torch.cdist(f, f) ** 2) / c, -1)
        out = attn @ x.flatten(2).transpose(1, 2).to(attn.dtype)
        return x + out.transpose(1, 2).reshape(b, c, h, w).to(x.dtype)


def test_a_missing_half_kernel_fails_half_precision_only() -> None:
    assert check_ga(PairwiseDistanceAttention, channels=4, only=["autocast"]) == ["autocast"]
    with pytest.raises(AssertionError) as info:
        check_ga(PairwiseDistanceAttention, channels=4, only=["half_precision"])
    first, *rest = str(info.value).splitlines()
    assert first.startswith("half_precision: input shape (2, 4, 5, 4): forward of the module ")
    assert "NotImplementedError" in first and "cdist" in first
    assert any("pass half_precision=False" in line for line in rest)


class AssertsNonEmptyInTraining(SqueezeExcitation):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 0:
            raise RuntimeError("cannot normalise an empty batch")
        return super().forward(x)


def test_an_empty_batch_in_training_is_checked() -> None:
    with pytest.raises(
        AssertionError, match=r"^empty_batch: input shape \(0, 8, 5, 4\): train-mode "
    ):
        check_ga(AssertsNonEmptyInTraining, channels=C, only=["empty_batch"])


def test_an_empty_batch_is_its_own_property() -> None:
    """A layer that cannot take B = 0 (timm's ECA reshapes with view(B, 1, -1)) switches that
    off alone and keeps every other shape check."""
    checked = check_ga(AssertsNonEmpty, channels=C, empty_batch=False)
    assert "shapes" in checked and "empty_batch" not in checked
    assert check_ga(AssertsNonEmptyInTraining, channels=C, only=["shapes"]) == ["shapes"]


class UpcastSoftmax(nn.Module):
    """The usual stable-softmax idiom: ``.float()`` upcasts half inputs, and downcasts float64."""

    def __init__(self, channels: int, wrong: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        self.wrong = wrong

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        attn = self.conv(x).flatten(2).float().softmax(-1).to(x.dtype).view(b, c, h, w)
        if self.wrong:
            attn = attn + 0.5 * (attn - attn.detach())  # gradient 1.5x too large
        return x + attn * x


def test_gradcheck_of_a_layer_computing_in_float32_compares_at_float32_precision() -> None:
    # at eps=1e-6 the float32 rounding swamps the derivative; compared where float32 can resolve
    # it, a sound layer passes and a wrong gradient still fails, with the reason named
    assert check_ga(UpcastSoftmax, channels=2, only=["gradcheck"]) == ["gradcheck"]
    with pytest.raises(AssertionError) as info:
        check_ga(partial(UpcastSoftmax, wrong=True), channels=2, only=["gradcheck"])
    first = str(info.value).splitlines()[0]
    assert first.startswith("gradcheck: input shape (2, 2, 2, 3): numerical and analytical ")
    assert re.search(r"random direction [\d.e+-]+ \(compared at float32 precision", first), first
    assert "float(...) in torch.float32" in first


class OnesOnDefaultDevice(SqueezeExcitation):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * torch.ones(x.shape[1], 1, 1)  # default device and dtype


def test_a_tensor_made_on_the_default_device_is_reported_as_device() -> None:
    # it breaks the half model too; the device property runs first and names the cause
    with pytest.raises(AssertionError, match=r"^device: input shape .*torch.device\('meta'\)"):
        check_ga(OnesOnDefaultDevice, channels=C, compile=False)


def test_modules_are_built_from_the_seed_and_the_callers_rng_is_untouched() -> None:
    built: list[torch.Tensor] = []

    def factory(c: int) -> nn.Module:
        module = SqueezeExcitation(c)
        built.append(module.fc1.weight.detach().clone())
        return module

    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    check_ga(factory, channels=C, only=["shapes"], seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    check_ga(factory, channels=C, only=["shapes"], seed=3)
    check_ga(factory, channels=C, only=["shapes"], seed=4)
    # two probes of the factory, then the check's own build, per call
    assert torch.equal(built[2], built[5]) and not torch.equal(built[2], built[8])


def test_check_gald_leaves_the_callers_rng_alone() -> None:
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    check_gald("gc", in_channels=C, only=["shapes"])
    assert torch.equal(torch.random.get_rng_state(), before)


class _DropoutGA(nn.Module):
    """A GA that draws random numbers in training mode, as layers with dropout do."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        self.drop = nn.Dropout2d(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.conv(x))


def test_a_layer_that_draws_in_training_leaves_the_callers_rng_alone() -> None:
    """Train-mode forwards (shapes, gradients, state_dict) run on a stream of the property's
    own: the caller's stream is untouched, also when a property fails, and a property's
    outcome does not depend on what the caller drew before."""
    for ga in (_DropoutGA, "aspp"):  # aspp: Dropout2d in its bottleneck
        torch.manual_seed(7)
        before = torch.random.get_rng_state()
        check_ga(ga, channels=C, only=["shapes", "gradients", "state_dict"])
        assert torch.equal(torch.random.get_rng_state(), before), ga
        check_gald(ga, in_channels=C, only=["shapes", "gradients"])
        assert torch.equal(torch.random.get_rng_state(), before), ga

    seen: list[torch.Tensor] = []

    class Recording(_DropoutGA):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                seen.append(torch.rand(3))
            return super().forward(x)

    torch.manual_seed(1)
    check_ga(Recording, channels=C, only=["gradients"])
    first = list(seen)
    seen.clear()
    torch.manual_seed(2)  # another caller stream: the property draws the same numbers
    check_ga(Recording, channels=C, only=["gradients"])
    assert first and all(torch.equal(a, b) for a, b in zip(first, seen, strict=True))

    class Failing(_DropoutGA):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = super().forward(x)
            return out[..., :-1] if self.training else out  # wrong shape in training mode

    torch.manual_seed(3)
    before = torch.random.get_rng_state()
    with pytest.raises(AssertionError):
        check_ga(Failing, channels=C, only=["gradients"])
    assert torch.equal(torch.random.get_rng_state(), before)


class _DrawingGA(nn.Module):
    """Records a few random numbers at every training-mode forward."""

    seen: ClassVar[list[torch.Tensor]] = []

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            _DrawingGA.seen.append(torch.rand(3))
        return self.conv(x)


def _draws(**kwargs: Any) -> list[torch.Tensor]:
    _DrawingGA.seen.clear()
    check_ga(_DrawingGA, channels=C, **kwargs)
    return list(_DrawingGA.seen)


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_each_property_draws_from_its_own_stream_of_the_seed() -> None:
    """A property draws the same numbers alone (only=) and after others, and another seed
    gives other numbers."""
    alone = _draws(only=["gradients"])
    first = _draws(only=["shapes"])
    both = _draws(only=["shapes", "gradients"])
    assert alone and first
    assert _same(both, first + alone)
    assert not _same(_draws(only=["gradients"], seed=1), alone)


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_a_torchscript_layer_is_checked_not_blamed_for_the_checker() -> None:
    """``torch.func`` cannot swap a scripted module's parameters: gradcheck then runs with
    respect to the input; ``torch.compile`` refuses scripted modules, which fails ``compile``
    with its label (an AssertionError), not with a raw RuntimeError."""
    scripted = lambda c: torch.jit.script(SqueezeExcitation(c))  # noqa: E731
    assert "gradcheck" in check_ga(scripted, channels=C, compile=False)
    with pytest.raises(AssertionError, match=r"^compile: input shape .* raised RuntimeError"):
        check_ga(scripted, channels=C, only=["compile"])


class NeedsEightPixels(SqueezeExcitation):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < 8:
            raise ValueError(f"input side {min(x.shape[-2:])} is below 8")
        return super().forward(x)


def test_a_failure_on_the_smallest_map_suggests_min_size() -> None:
    with pytest.raises(AssertionError) as info:
        check_ga(NeedsEightPixels, channels=C, only=["shapes"])
    message = str(info.value)
    assert message.startswith("shapes: input shape (2, 8, 1, 1): eval-mode forward raised")
    assert "smallest map checked (1x1)" in message and "pass min_size= to check_ga" in message
    assert check_ga(NeedsEightPixels, channels=C, min_size=8, only=["shapes"]) == ["shapes"]


class LeaksFromTheLastSample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.cat([y[:1] + 0.5 * x[-1:], y[1:]]) if x.shape[0] > 1 else y


class RoundsItsInput(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.round(x))


def test_batch_independence_changes_every_sample_in_turn() -> None:
    with pytest.raises(AssertionError, match="changing sample 2 changed sample 0"):
        check_ga(LeaksFromTheLastSample, channels=4, only=["batch_independence"])


def test_an_input_gradient_that_is_zero_everywhere_fails() -> None:
    with pytest.raises(AssertionError, match="input gradient is exactly zero everywhere"):
        check_ga(RoundsItsInput, channels=4, only=["gradients"])


class FailsOnWideMaps(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        if x.shape[-1] > x.shape[-2] + 2:
            raise ValueError("wide maps are not supported")
        return self.conv(x)


def test_min_size_advice_only_for_the_smallest_map():
    """A failure on a wide map is not a size problem: no min_size advice."""
    with pytest.raises(AssertionError) as info:
        gald.testing.check_ga(FailsOnWideMaps, channels=C, only=["shapes"])
    message = str(info.value)
    assert message.startswith("shapes: input shape (2, 8, 1, 6)")
    assert "smallest map checked" not in message


class EmptyBatchFailsOnWideMaps(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        if x.shape[0] == 0 and x.shape[-1] > x.shape[-2] + 2:
            raise RuntimeError("cannot reshape tensor of 0 elements")
        return self.conv(x)


def test_empty_batch_checks_every_map():
    """The empty-batch property covers every map in eval mode, not only the smallest."""
    with pytest.raises(AssertionError, match=r"^empty_batch: input shape \(0, 8, 1, 6\)"):
        gald.testing.check_ga(EmptyBatchFailsOnWideMaps, channels=C, only=["empty_batch"])
