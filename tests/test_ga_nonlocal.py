"""NonLocal2d: equality with a materialised-affinity reference, structure, gradients, shapes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import gald
from _helpers import randomise
from gald.ga import NonLocal2d

MODES = ("embedded_gaussian", "gaussian", "dot_product", "concatenation")


def subsample_reference(t: torch.Tensor) -> torch.Tensor:
    """2x2 max over blocks, a last partial block kept (ceil mode), by explicit loops."""
    h, w = t.shape[-2:]
    hk, wk = (h + 1) // 2, (w + 1) // 2
    out = t.new_empty(*t.shape[:-2], hk, wk)
    for i in range(hk):
        for j in range(wk):
            out[..., i, j] = t[..., 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].amax(dim=(-2, -1))
    return out


def reference(layer: NonLocal2d, x: torch.Tensor) -> torch.Tensor:
    """The block with the full (B, N, Nk) pairwise-weight matrix built explicitly."""
    b, _, h, w = x.shape
    inter = layer.inter_channels
    keys = subsample_reference if layer.sub_sample else (lambda t: t)
    g = keys(layer.g(x)).flatten(2)  # (B, C', Nk)
    if layer.mode == "gaussian":
        theta, phi = x.flatten(2), keys(x).flatten(2)
    else:
        theta, phi = layer.theta(x).flatten(2), keys(layer.phi(x)).flatten(2)
    nk = phi.shape[-1]
    if layer.mode in ("embedded_gaussian", "gaussian"):
        logits = torch.einsum("bci,bcj->bij", theta, phi)
        if layer.use_scale:
            logits = logits / theta.shape[1] ** 0.5
        weights = torch.softmax(logits, dim=-1)
    elif layer.mode == "dot_product":
        weights = torch.einsum("bci,bcj->bij", theta, phi) / nk
    else:
        n = theta.shape[-1]
        pairs = torch.cat(
            [
                theta.unsqueeze(-1).expand(b, inter, n, nk),
                phi.unsqueeze(-2).expand(b, inter, n, nk),
            ],
            dim=1,
        )  # (B, 2C', N, Nk): [theta_i; phi_j] for every pair
        weights = torch.relu(F.conv2d(pairs, layer.concat_project.weight)).squeeze(1) / nk
    y = torch.einsum("bij,bcj->bci", weights, g).reshape(b, inter, h, w)
    return x + layer.norm(layer.conv_out(y))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sub_sample", [False, True])
def test_matches_reference_eval(mode: str, sub_sample: bool) -> None:
    torch.manual_seed(0)
    layer = randomise(NonLocal2d(16, mode=mode, sub_sample=sub_sample, chunk_elements=37)).eval()
    x = torch.randn(2, 16, 5, 7)
    ref_layer = copy.deepcopy(layer).double()
    expected = reference(ref_layer, x.double())
    assert not torch.allclose(expected, x.double(), atol=1e-3)  # the block does something
    torch.testing.assert_close(layer(x), expected.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_matches_reference_train_with_gradients(mode: str) -> None:
    """Train mode (batch statistics), and parameter gradients equal the reference's."""
    torch.manual_seed(1)
    layer = randomise(NonLocal2d(8, mode=mode, use_scale=False, chunk_elements=29)).train()
    ref_layer = copy.deepcopy(layer)
    x = torch.randn(2, 8, 4, 6)
    out, expected = layer(x), reference(ref_layer, x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for (name, p), p_ref in zip(layer.named_parameters(), ref_layer.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_concatenation_chunking_does_not_change_the_result() -> None:
    torch.manual_seed(2)
    small = randomise(NonLocal2d(8, mode="concatenation", chunk_elements=5)).eval()
    large = copy.deepcopy(small)
    large.chunk_elements = 1 << 30
    x = torch.randn(3, 8, 5, 3)
    torch.testing.assert_close(small(x), large(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_spatial_permutation_equivariance(mode: str) -> None:
    """Without subsampling the block has no notion of position: permuting pixels commutes."""
    torch.manual_seed(3)
    layer = randomise(NonLocal2d(8, mode=mode)).eval()
    x = torch.randn(2, 8, 4, 5)
    perm = torch.randperm(20)

    def permute(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(2)[..., perm].reshape(t.shape)

    torch.testing.assert_close(layer(permute(x)), permute(layer(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norm", ["bn", None])
def test_identity_at_initialisation(mode: str, norm: str | None) -> None:
    norm_layer = nn.BatchNorm2d if norm == "bn" else None
    x = torch.randn(2, 8, 5, 4)
    layer = NonLocal2d(8, mode=mode, norm_layer=norm_layer)
    for training in (False, True):
        layer.train(training)
        torch.testing.assert_close(layer(x), x, rtol=0, atol=0)
    assert not torch.allclose(
        NonLocal2d(8, mode=mode, norm_layer=norm_layer, zero_init=False).eval()(x), x
    )


@pytest.mark.parametrize("mode", MODES)
def test_backward_never_keeps_an_n_by_n_affinity(mode: str) -> None:
    """Bytes saved for backward (unique storages) stay below one N x N float32 affinity."""
    torch.manual_seed(4)
    layer = NonLocal2d(8, mode=mode, chunk_elements=1 << 16).train()
    x = torch.randn(1, 8, 32, 32)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    n = 32 * 32
    assert sum(storages.values()) < n * n * 4 // 2
    out.sum().backward()


@pytest.mark.parametrize(
    ("mode", "sub_sample"),
    [
        ("embedded_gaussian", False),
        ("gaussian", True),
        ("dot_product", True),
        ("concatenation", False),
    ],
)
def test_gradcheck(mode: str, sub_sample: bool) -> None:
    torch.manual_seed(5)
    # chunk_elements=48 splits the 12 concatenation queries into 3 checkpointed blocks
    layer = randomise(NonLocal2d(8, mode=mode, sub_sample=sub_sample, chunk_elements=48))
    layer = layer.double().eval()
    x = torch.randn(1, 8, 3, 4, dtype=torch.float64, requires_grad=True)
    # fast mode (random projections of the Jacobian) keeps the four checks quick
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"channels": 0}, ValueError, "channels"),
        ({"channels": 8.0}, TypeError, "channels"),
        ({"channels": 8, "reduction": 0}, ValueError, "reduction"),
        ({"channels": 4, "reduction": 8}, ValueError, "reduction"),
        ({"channels": 8, "mode": "cosine"}, ValueError, "mode"),
        ({"channels": 8, "mode": 1}, TypeError, "mode"),
        ({"channels": 8, "chunk_elements": 0}, ValueError, "chunk_elements"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, error: type, needle: str) -> None:
    channels = kwargs.pop("channels")
    with pytest.raises(error, match=needle):
        NonLocal2d(channels, **kwargs)


def test_bad_inputs_name_the_problem() -> None:
    layer = NonLocal2d(8)
    with pytest.raises(ValueError, match=r"8 channels.*\(2, 4, 3, 3\)"):
        layer(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="4-D"):
        layer(torch.randn(8, 3, 3))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(1, 8, 3, 3, dtype=torch.long))


@given(
    b=st.integers(0, 3),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    mode=st.sampled_from(MODES),
    sub_sample=st.booleans(),
    training=st.booleans(),
)
def test_shape_preserved(
    b: int, h: int, w: int, mode: str, sub_sample: bool, training: bool
) -> None:
    # train-mode BatchNorm needs more than one value per channel
    assume(not training or b * h * w >= 2)
    layer = randomise(NonLocal2d(8, mode=mode, sub_sample=sub_sample, chunk_elements=17))
    layer.train(training)
    out = layer(torch.randn(b, 8, h, w))
    assert out.shape == (b, 8, h, w)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("mode", MODES)
def test_bf16_autocast_close_to_fp32(mode: str) -> None:
    """Tolerance: max |bf16 - fp32| <= 5e-2 * max |fp32 output - x| (bf16 has ~3 digits)."""
    torch.manual_seed(6)
    layer = randomise(NonLocal2d(16, mode=mode)).eval()
    x = torch.randn(2, 16, 9, 7)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert torch.isfinite(out).all()
    scale = (expected - x).abs().max()
    assert (out.float() - expected).abs().max() <= 5e-2 * scale


def test_no_tensor_on_the_default_device() -> None:
    """Forward on the meta device mixes no CPU tensor in (it would raise)."""
    for mode in MODES:
        layer = NonLocal2d(8, mode=mode, sub_sample=True).to("meta")
        out = layer(torch.empty(2, 8, 5, 3, device="meta"))
        assert out.device.type == "meta"
        assert out.shape == (2, 8, 5, 3)


def test_registry_and_gald() -> None:
    assert isinstance(gald.create_ga("nonlocal", 16, mode="dot_product"), NonLocal2d)
