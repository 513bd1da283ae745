"""CrissCrossAttention: equality with per-pixel loops, locality, symmetries, gradients, shapes."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gald
from _helpers import randomise
from gald.ga import CrissCrossAttention


def reference_pass(layer: CrissCrossAttention, x: torch.Tensor) -> torch.Tensor:
    """One criss-cross pass by explicit loops over pixels, their row and their column."""
    q, k, v = layer.query(x), layer.key(x), layer.value(x)
    b, _, h, w = x.shape
    out = torch.zeros_like(x)
    for n in range(b):
        for i in range(h):
            for j in range(w):
                # the row of (i, j), then its column without the centre (counted once)
                positions = [(i, jj) for jj in range(w)] + [(ii, j) for ii in range(h) if ii != i]
                logits = torch.stack([q[n, :, i, j] @ k[n, :, pi, pj] for pi, pj in positions])
                weights = torch.softmax(logits, dim=0)
                agg = sum(wt * v[n, :, pi, pj] for wt, (pi, pj) in zip(weights, positions))
                out[n, :, i, j] = agg
    return x + layer.gamma * out


def reference(layer: CrissCrossAttention, x: torch.Tensor) -> torch.Tensor:
    for _ in range(layer.recurrence):
        x = reference_pass(layer, x)
    return x


@pytest.mark.parametrize("recurrence", [1, 2])
def test_matches_per_pixel_loops(recurrence: int) -> None:
    torch.manual_seed(0)
    layer = randomise(CrissCrossAttention(16, recurrence=recurrence))
    x = torch.randn(2, 16, 3, 4)
    expected = reference(copy.deepcopy(layer).double(), x.double())
    assert not torch.allclose(expected, x.double(), atol=1e-3)
    torch.testing.assert_close(layer(x), expected.float(), rtol=1e-4, atol=1e-4)


def test_matches_per_pixel_loops_with_a_unit_side() -> None:
    torch.manual_seed(1)
    layer = randomise(CrissCrossAttention(8, recurrence=1))
    for shape in [(1, 8, 1, 4), (1, 8, 3, 1), (1, 8, 1, 1)]:
        x = torch.randn(shape)
        torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-4, atol=1e-5)


def test_locality_at_one_pass() -> None:
    """With one pass, pixel (i, j) sees only its row and column; two passes see everything."""
    torch.manual_seed(2)
    layer = randomise(CrissCrossAttention(8, recurrence=1))
    x = torch.randn(1, 8, 5, 6)
    i, j = 2, 3
    off = x.clone()
    off[..., i + 1, j + 1] += 5.0  # neither in row i nor in column j
    torch.testing.assert_close(layer(off)[..., i, j], layer(x)[..., i, j], rtol=0, atol=0)
    on = x.clone()
    on[..., i, j - 2] += 5.0  # in row i
    assert not torch.allclose(layer(on)[..., i, j], layer(x)[..., i, j], atol=1e-4)
    layer.recurrence = 2
    assert not torch.allclose(layer(off)[..., i, j], layer(x)[..., i, j], atol=1e-4)


def test_row_column_permutation_and_transpose_equivariance() -> None:
    torch.manual_seed(3)
    layer = randomise(CrissCrossAttention(8))
    x = torch.randn(2, 8, 4, 5)
    rows, cols = torch.randperm(4), torch.randperm(5)
    permuted = x[:, :, rows][..., cols]
    torch.testing.assert_close(
        layer(permuted), layer(x)[:, :, rows][..., cols], rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        layer(x.transpose(2, 3)), layer(x).transpose(2, 3), rtol=1e-5, atol=1e-5
    )


def test_identity_at_initialisation() -> None:
    x = torch.randn(2, 16, 5, 4)
    layer = CrissCrossAttention(16)
    torch.testing.assert_close(layer(x), x, rtol=0, atol=0)


def test_gradcheck() -> None:
    torch.manual_seed(4)
    layer = randomise(CrissCrossAttention(8, recurrence=2)).double()
    x = torch.randn(1, 8, 3, 4, dtype=torch.float64, requires_grad=True)
    params = tuple(layer.parameters())

    def fn(inp: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        names = [name for name, _ in layer.named_parameters()]
        return torch.func.functional_call(layer, dict(zip(names, ps)), (inp,))

    inputs = (x, *(p.detach().clone().requires_grad_() for p in params))
    # gradients for the input and every parameter (gamma included); fast mode keeps it quick
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"channels": 0}, ValueError, "channels"),
        ({"channels": "8"}, TypeError, "channels"),
        ({"channels": 8, "recurrence": 0}, ValueError, "recurrence"),
        ({"channels": 8, "recurrence": 1.0}, TypeError, "recurrence"),
        ({"channels": 8, "reduction": 0}, ValueError, "reduction"),
        ({"channels": 4, "reduction": 8}, ValueError, "reduction"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, error: type, needle: str) -> None:
    channels = kwargs.pop("channels")
    with pytest.raises(error, match=needle):
        CrissCrossAttention(channels, **kwargs)


def test_bad_inputs_name_the_problem() -> None:
    layer = CrissCrossAttention(8)
    with pytest.raises(ValueError, match=r"8 channels.*\(1, 3, 2, 2\)"):
        layer(torch.randn(1, 3, 2, 2))
    with pytest.raises(TypeError, match="Tensor"):
        layer([[1.0]])


@given(
    b=st.integers(0, 3),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    recurrence=st.integers(1, 3),
    training=st.booleans(),
)
def test_shape_preserved(b: int, h: int, w: int, recurrence: int, training: bool) -> None:
    layer = randomise(CrissCrossAttention(8, recurrence=recurrence)).train(training)
    out = layer(torch.randn(b, 8, h, w))
    assert out.shape == (b, 8, h, w)
    assert torch.isfinite(out).all()


def test_bf16_autocast_close_to_fp32() -> None:
    """Tolerance: max |bf16 - fp32| <= 5e-2 * max |fp32 output - x|."""
    torch.manual_seed(5)
    layer = randomise(CrissCrossAttention(16)).eval()
    x = torch.randn(2, 16, 9, 7)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == x.dtype
    assert torch.isfinite(out).all()
    assert (out - expected).abs().max() <= 5e-2 * (expected - x).abs().max()


def test_no_tensor_on_the_default_device() -> None:
    """The diagonal mask is built on the input's device: a meta forward mixes in no CPU tensor."""
    layer = CrissCrossAttention(8).to("meta")
    out = layer(torch.empty(2, 8, 5, 3, device="meta"))
    assert out.device.type == "meta"
    assert out.shape == (2, 8, 5, 3)


def test_registry_and_gald() -> None:
    assert isinstance(gald.create_ga("criss_cross", 16, recurrence=1), CrissCrossAttention)
