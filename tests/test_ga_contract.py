"""Every registered GA layer meets ``gald.testing.check_ga``, alone and inside GALD.

The contract itself (and that it catches broken layers) is tested in ``test_testing.py``;
per-layer references live in ``test_ga_<name>.py``. This file adds what is gald's own policy
for its built-ins: the docstring sections and the input validation.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gald
from gald.testing import check_ga, check_gald, ga_inputs

NAMES = gald.list_ga()
C = 16
# small configurations (the defaults are sized for 512 channels)
SMALL: dict[str, dict] = {
    "cgnl": {"groups": 2},
    "ema": {"num_bases": 4, "em_grad": True},
    "aspp": {"inner_channels": 4, "rates": (1, 2, 3)},
}


def test_zoo_is_complete() -> None:
    expected = {
        "nonlocal",
        "cgnl",
        "criss_cross",
        "psp",
        "aspp",
        "gc",
        "danet",
        "glore",
        "dualgcn",
        "ema",
    }
    assert expected <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_contract(name: str) -> None:
    checked = check_ga(partial(gald.get_ga_class(name), **SMALL.get(name, {})), channels=C)
    assert checked == list(gald.testing.PROPERTIES)


def test_ema_default_detaches_the_em_loop() -> None:
    # with em_grad=False (the authors' default) conv1 gets no gradient and the float64
    # gradient is not the derivative of the forward: exactly these two properties fail
    ema = partial(gald.ga.EMA, num_bases=4)
    check_ga(ema, channels=C, gradients=False, gradcheck=False, compile=False)
    with pytest.raises(AssertionError, match=r"^gradients: .*'conv1\.weight'.*no gradient"):
        check_ga(ema, channels=C, only=("gradients",))
    with pytest.raises(AssertionError, match=r"^gradcheck: .*Jacobians disagree"):
        check_ga(ema, channels=4, only=("gradcheck",))  # a failure reruns gradcheck in slow mode


@pytest.mark.parametrize("name", NAMES)
def test_contract_inside_gald(name: str) -> None:
    # compile of the whole block is checked once, with the default GA
    check_gald(
        name, in_channels=C, gald_kwargs={"ga_kwargs": SMALL.get(name, {})}, compile=name == "cgnl"
    )


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_any_map_keeps_its_shape(name: str, data: st.DataObject) -> None:
    layer = gald.create_ga(name, C, **SMALL.get(name, {})).eval()
    x = data.draw(ga_inputs(layer, max_side=12))
    with torch.no_grad():
        y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()


@pytest.mark.parametrize("name", NAMES)
def test_docstring(name: str) -> None:
    doc = gald.get_ga_class(name).__doc__ or ""
    assert "Shape:" in doc and "(B, C, H, W)" in doc
    assert "omplexity" in doc


@pytest.mark.parametrize("name", NAMES)
def test_bad_input(name: str) -> None:
    layer = gald.create_ga(name, C, **SMALL.get(name, {}))
    with pytest.raises(ValueError, match=f"must have {C} channels"):
        layer(torch.randn(1, C + 1, 4, 4))
    with pytest.raises(ValueError, match="4-D"):
        layer(torch.randn(C, 4, 4))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.zeros(1, C, 4, 4, dtype=torch.long))
