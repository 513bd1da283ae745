"""The shared argument checks of ``gald._validate``: numpy scalars and arrays are accepted
wherever Python numbers and lists are."""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import gald
import gald.testing
from gald._validate import (
    check_feature,
    check_float,
    check_positive_int_sequence,
    check_probability,
    first_line,
)
from gald.losses import OhemCrossEntropy

REALS = st.one_of(
    st.integers(-(10**6), 10**6),
    st.integers(-(10**6), 10**6).map(np.int64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(np.float32),
    st.floats(allow_nan=False, allow_infinity=False).map(np.float64),
)


@given(REALS)
def test_check_float_takes_any_real_number(value: object) -> None:
    result = check_float(value, "x")
    assert type(result) is float and result == float(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (True, TypeError, "x must be a float, got bool True"),
        (np.bool_(True), TypeError, "x must be a float, got bool"),
        ("0.5", TypeError, "x must be a float, got str '0.5'"),
        (1j, TypeError, "x must be a float, got complex"),
        (torch.tensor(0.5), TypeError, "x must be a float, got Tensor"),
        (math.nan, ValueError, "x must be a finite number, got nan"),
        (np.float32("nan"), ValueError, "x must be a finite number, got nan"),
        (math.inf, ValueError, "x must be a finite number, got inf"),
        (-np.float64("inf"), ValueError, "x must be a finite number, got -inf"),
    ],
)
def test_check_float_refuses(value: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        check_float(value, "x")


@given(st.floats(0.0, 1.0, exclude_max=True, width=32))
def test_probability_from_numpy(p: float) -> None:
    assert check_probability(np.float32(p), "dropout") == pytest.approx(p)
    assert check_probability(0, "dropout") == 0.0


def test_probability_range() -> None:
    for bad in (1, 1.0, -0.1, np.float32(1.5)):
        with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
            check_probability(bad, "dropout")
    with pytest.raises(ValueError, match="dropout must be a finite number, got nan"):
        check_probability(math.nan, "dropout")
    with pytest.raises(ValueError, match="dropout must be a finite number, got inf"):
        check_probability(math.inf, "dropout")


def test_ohem_thresh_takes_numpy_and_ints() -> None:
    assert OhemCrossEntropy(thresh=np.float32(0.5)).thresh == 0.5  # type: ignore[arg-type]
    assert OhemCrossEntropy(thresh=1).thresh == 1.0
    assert type(OhemCrossEntropy(thresh=np.float64(0.7)).thresh) is float
    with pytest.raises(TypeError, match="thresh must be a float, got bool"):
        OhemCrossEntropy(thresh=True)
    with pytest.raises(ValueError, match="thresh must be a finite number, got nan"):
        OhemCrossEntropy(thresh=math.nan)
    with pytest.raises(ValueError, match=r"thresh must be in \[0, 1\]"):
        OhemCrossEntropy(thresh=np.float32(1.5))  # type: ignore[arg-type]


@given(st.lists(st.integers(1, 64), max_size=5))
def test_positive_int_sequence_from_any_iterable(values: list[int]) -> None:
    expected = tuple(values)
    for form in (
        values,
        tuple(values),
        np.array(values, dtype=np.int64),
        tuple(np.int32(v) for v in values),
        torch.tensor(values, dtype=torch.long),
        iter(values),
    ):
        result = check_positive_int_sequence(form, "rates")
        assert result == expected and all(type(v) is int for v in result)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ("12", TypeError, "rates must be a sequence of ints, got str '12'"),
        (b"12", TypeError, "rates must be a sequence of ints, got bytes"),
        (3, TypeError, "rates must be a sequence of ints, got int 3"),
        ([1, 2.0], TypeError, r"rates\[1\] must be an int, got float"),
        (np.array([1.0, 2.0]), TypeError, r"rates\[0\] must be an int, got float64"),
        ([1, 0], ValueError, r"rates\[1\] must be >= 1, got 0"),
    ],
)
def test_positive_int_sequence_refuses(value: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        check_positive_int_sequence(value, "rates")


def test_numpy_arguments_reach_a_layer() -> None:
    layer = gald.create_ga(
        "aspp", 8, inner_channels=4, rates=np.array([1, 2]), dropout=np.float32(0.1)
    )
    assert layer.rates == (1, 2) and layer.dropout == pytest.approx(0.1)  # type: ignore[union-attr]


class _Index:
    """An integer that only implements ``__index__`` (no arithmetic, no comparison)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


def _int_defaults(cls: type) -> dict[str, _Index]:
    """Every keyword whose default is a plain int, wrapped as an index-only object."""
    params = inspect.signature(cls.__init__).parameters  # type: ignore[misc]
    return {
        k: _Index(p.default)
        for k, p in params.items()
        if k not in ("self", "channels") and type(p.default) is int
    }


@pytest.mark.parametrize("name", gald.list_ga())
def test_index_only_ints_reach_every_ga(name: str) -> None:
    cls = type(gald.create_ga(name, 16))
    kwargs = _int_defaults(cls)
    layer = cls(_Index(16), **kwargs).eval()
    assert type(layer.channels) is int
    for key in kwargs:
        assert type(getattr(layer, key)) is int, key
    assert layer(torch.randn(1, 16, 9, 9)).shape == (1, 16, 9, 9)


def test_index_only_ints_reach_the_block_and_heads() -> None:
    x = torch.randn(1, 16, 9, 9)
    ld = gald.LocalDistribution(
        _Index(16), num_stages=_Index(2), kernel_size=_Index(3), padding=_Index(1)
    ).eval()
    assert (ld.channels, ld.num_stages, ld.kernel_size, ld.padding) == (16, 2, 3, 1)
    assert ld(x).shape == x.shape
    assert gald.GALD(_Index(16), "nonlocal", padding=_Index(1)).eval()(x).shape == x.shape
    head = gald.GALDHead(_Index(16), num_classes=_Index(3), channels=_Index(16)).eval()
    assert head(x).shape == (1, 3, 9, 9)
    assert gald.AuxHead(_Index(16), num_classes=_Index(3)).eval()(x).shape == (1, 3, 9, 9)


def test_check_feature_remedy() -> None:
    x = torch.zeros(1, 3, 2, 2)
    with pytest.raises(
        ValueError,
        match=r"too small: .* >= 3 for this configuration \(use padding=1 to accept any size\), got",
    ):
        check_feature(x, 3, min_hw=3, who="LD")
    with pytest.raises(
        ValueError, match=r"for this configuration \(resize the images\), got shape"
    ) as info:
        check_feature(x, None, name="images", min_hw=3, who="GALDNet", remedy="resize the images")
    assert "padding" not in str(info.value)
    with pytest.raises(ValueError, match=r"for this configuration, got shape \(1, 3, 2, 2\)$"):
        check_feature(x, None, min_hw=3, remedy=None)
    assert check_feature(torch.zeros(1, 3, 3, 3), 3, min_hw=3, remedy=None).shape == (1, 3, 3, 3)


def test_huge_ints_and_unordered_or_scalar_sequences_are_named() -> None:
    with pytest.raises(ValueError, match=r"offset must be a finite number, got an int too large"):
        check_float(10**400, "offset")
    for value, got in (
        (np.array(3), "ndarray with 0 dimensions"),
        (torch.tensor(3), "Tensor with 0 dimensions"),
        ({6: 0, 12: 0}, "dict"),  # a mapping's keys are not the user's sequence
        ({1, 2}, "set"),  # nor is a set's order
        (np.ones((2, 2), dtype=int), "ndarray with 2 dimensions"),
    ):
        with pytest.raises(TypeError, match=f"rates must be a sequence of ints, got {got}"):
            check_positive_int_sequence(value, "rates")
    assert check_positive_int_sequence(torch.tensor([6, 12]), "rates") == (6, 12)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: gald.GALD(16, "gc", ld="no"), "ld must be a bool, got str 'no'"),
        (lambda: gald.GALD(16, "gc", downsample=1), "downsample must be a bool, got int 1"),
        (lambda: gald.LocalDistribution(8, final_act="no"), "final_act must be a bool, got str"),
        (lambda: gald.create_ga("nonlocal", 8, zero_init=None), "zero_init must be a bool"),
        (lambda: gald.create_ga("nonlocal", 8, sub_sample=0), "sub_sample must be a bool"),
        (lambda: gald.create_ga("cgnl", 16, use_scale=1), "use_scale must be a bool, got int"),
        (lambda: gald.GALD(16, "gc", init=1), r"init must be a str, one of \('default', "),
        (lambda: gald.GALD(16, "gc", impl=1), r"impl must be a str, one of \('auto', "),
        (lambda: gald.LocalDistribution(8, impl=None), r"impl must be a str, one of"),
    ],
)
def test_truth_values_and_choices_are_not_guessed(build: Any, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        build()


def test_choices_name_the_valid_strings() -> None:
    with pytest.raises(ValueError, match=r"init must be one of \('default', 'identity'\), got 'x'"):
        gald.GALD(16, "gc", init="x")
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'triton', 'torch'\)"):
        gald.LocalDistribution(8, impl="cuda")


@pytest.mark.parametrize(
    ("ga", "argument"),
    [
        ("danet", "reduction"),
        ("nonlocal", "reduction"),
        ("criss_cross", "reduction"),
        ("dualgcn", "ratio"),
    ],
)
def test_a_reduction_that_leaves_no_channels_is_named(ga: str, argument: str) -> None:
    with pytest.raises(
        ValueError,
        match=rf"^{argument}=64 leaves no channels: channels // {argument} must be >= 1, got "
        r"channels=16$",
    ):
        gald.create_ga(ga, 16, **{argument: 64})


def test_reprs_show_the_constructor_arguments() -> None:
    aux = repr(gald.AuxHead(16, 3, channels=8))
    assert "in_channels=16, num_classes=3, channels=8" in aux
    loss = repr(gald.OhemCrossEntropy(thresh=0.6, min_kept=5, weight=torch.ones(4)))
    assert "thresh=0.6, min_kept=5, weight=<4 class weights>" in loss
    assert "weight=None" in repr(gald.OhemCrossEntropy())
    from gald.models import GALDNet

    with torch.device("meta"):
        net = GALDNet.official(depth=50)
    first = repr(net).splitlines()[1]
    assert "num_classes=19" in first and "in_channels=(1024, 2048), aux=True" in first


def test_layer_factories_are_checked_by_the_call_they_get() -> None:
    with pytest.raises(TypeError, match=r"norm_layer must be a callable .* an nn.Module instance"):
        gald.GALD(16, "psp", norm_layer=nn.BatchNorm2d(16))
    with pytest.raises(TypeError, match=r"norm_layer\(num_channels\).*functools.partial"):
        gald.GALDHead(16, 3, channels=16, norm_layer=nn.GroupNorm)
    with pytest.raises(TypeError, match=r"act_layer is called as act_layer\(\)"):
        gald.LocalDistribution(8, act_layer=lambda inplace: nn.ReLU(inplace))
    # what the calls can take is accepted: partials, classes with defaults, functions
    gald.GALD(16, "psp", norm_layer=functools.partial(nn.GroupNorm, 4), act_layer=nn.PReLU)


def test_numpy_bools_are_bools() -> None:
    ld = gald.LocalDistribution(8, final_act=np.bool_(False))
    assert ld.final_act is False
    with pytest.raises(TypeError, match=r"final_act must be a bool, got numpy.int64 "):
        gald.LocalDistribution(8, final_act=np.int64(1))


def test_numpy_scalars_are_stored_as_python_values_and_run() -> None:
    """A NumPy bool or float passes the checks; what is stored and passed on is the Python
    value the checks return (torch ops and the custom op's schema take Python types only)."""
    yes, no = np.bool_(True), np.bool_(False)
    x = torch.randn(2, 16, 9, 9)
    psp = gald.create_ga("psp", 16, align_corners=no)
    assert type(psp.align_corners) is bool and psp(x).shape == x.shape
    assert type(gald.create_ga("glore", 16, normalize=yes).normalize) is bool
    assert type(gald.create_ga("ema", 16, em_grad=yes).em_grad) is bool
    block = gald.GALD(16, "gc", downsample=yes)
    assert type(block.downsample) is bool
    block.set_grad_checkpointing(yes)
    assert type(block.ld.grad_checkpointing) is bool
    logits = torch.randn(2, 16, 3, 3)
    out = gald.ops.ld_modulate(x, logits, np.float64(2.0), align_corners=no)
    torch.testing.assert_close(out, gald.ops.ld_modulate(x, logits, 2.0, align_corners=False))
    with torch.device("meta"):
        net = gald.models.DilatedResNet(50, deep_stem=no)
    assert type(net.deep_stem) is bool
    model = nn.Conv2d(3, 2, 1).eval()
    got = gald.models.slide_inference(
        model, torch.randn(1, 3, 6, 6), crop_size=4, stride=2, num_classes=2, flip=yes
    )
    assert got.shape == (1, 2, 6, 6)


def test_prefixed_norm_factories_are_checked_by_signature():
    """``bottleneck_norm_layer`` / ``pool_norm_layer`` are called as f(num_channels) too: a
    GroupNorm class is refused at construction, by name."""
    with pytest.raises(TypeError, match=r"bottleneck_norm_layer is called as"):
        gald.ga.GlobalContext(8, bottleneck_norm_layer=nn.GroupNorm)


def test_first_line_of_a_blank_exception_is_its_class_name():
    """Triton and torch raise bare AssertionErrors; messages quoting first_line() must
    still say something."""
    assert first_line(AssertionError()) == "AssertionError"
    assert first_line("  \n") == ""
