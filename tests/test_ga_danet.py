"""DualAttention (DANet PAM + CAM) against materialised-softmax references and its structure."""

from __future__ import annotations

import pytest
import torch

import gald
from gald.ga import DualAttention

C = 8


def _random_gates(layer: DualAttention) -> DualAttention:
    """Give every zero-initialised gate a random non-zero value (else comparisons are vacuous)."""
    with torch.no_grad():
        for branch in (layer.pam, layer.cam):
            if branch is not None:
                branch.gamma.copy_(torch.rand(1, dtype=branch.gamma.dtype) + 0.5)
    return layer


def _conv1x1(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """A 1x1 conv as a per-pixel matrix product: (B, Cin, N) -> (B, Cout, N)."""
    w = conv.weight[:, :, 0, 0]
    return torch.einsum("oc,bcn->bon", w, x) + conv.bias[None, :, None]


def _softmax_rows(e: torch.Tensor) -> torch.Tensor:
    """Row softmax written out: exp(e_ij - max_i) / sum_j exp(e_ij - max_i)."""
    shifted = torch.exp(e - e.max(dim=-1, keepdim=True).values)
    return shifted / shifted.sum(dim=-1, keepdim=True)


def _ref_pam(layer: DualAttention, x: torch.Tensor) -> torch.Tensor:
    """gamma * V softmax(Q^T K)^T with the N x N affinity materialised per sample."""
    pam = layer.pam
    assert pam is not None
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    q, k, v = (_conv1x1(flat, conv) for conv in (pam.query_conv, pam.key_conv, pam.value_conv))
    out = torch.empty_like(flat)
    for i in range(b):
        affinity = _softmax_rows(q[i].T @ k[i])  # (N, N): row = query position
        for p in range(h * w):
            out[i, :, p] = (v[i] * affinity[p][None, :]).sum(dim=1)
    return pam.gamma * out.reshape(b, c, h, w)


def _ref_cam(layer: DualAttention, x: torch.Tensor) -> torch.Tensor:
    """gamma * softmax(max_row(E) - E) X with E = X X^T, one channel row at a time."""
    cam = layer.cam
    assert cam is not None
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    out = torch.empty_like(flat)
    for i in range(b):
        energy = flat[i] @ flat[i].T  # (C, C)
        for row in range(c):
            e = energy[row].max() - energy[row]
            a = torch.exp(e - e.max())
            a = a / a.sum()
            out[i, row] = (a[:, None] * flat[i]).sum(dim=0)
    return cam.gamma * out.reshape(b, c, h, w)


@pytest.mark.parametrize("branches", [("pam", "cam"), ("pam",), ("cam",)])
def test_matches_materialised_reference(branches: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    layer = _random_gates(DualAttention(C, reduction=4, branches=branches)).double().eval()
    x = torch.randn(2, C, 5, 3, dtype=torch.float64)
    expected = x.clone()
    if "pam" in branches:
        expected = expected + _ref_pam(layer, x)
    if "cam" in branches:
        expected = expected + _ref_cam(layer, x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)
        # the train flag changes nothing (no norm, no dropout)
        torch.testing.assert_close(layer.train()(x), expected)


@pytest.mark.parametrize("reduction", [8, 1])
def test_pam_runs_on_the_fused_kernel(reduction: int) -> None:
    # with only the flash backend allowed SDPA raises unless q, k, v share a head size and have
    # unit stride: this guards that the N x N affinity is never materialised on CPU
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(8)
    layer = _random_gates(DualAttention(16, reduction=reduction, branches=("pam",))).eval()
    x = torch.randn(2, 16, 6, 5)
    with torch.no_grad():
        expected = layer(x)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = layer(x)
    torch.testing.assert_close(out, expected)


def test_branch_selection_builds_only_the_chosen_branches() -> None:
    assert DualAttention(C, branches=["cam"]).pam is None
    assert DualAttention(C, branches=("pam",)).cam is None
    both = DualAttention(C, branches=("cam", "pam"))
    assert both.pam is not None
    assert both.cam is not None
    assert both.branches == ("pam", "cam")
    assert DualAttention(C, reduction=C).inter_channels == 1
    with pytest.raises(ValueError, match="leaves no channels"):  # not clamped to 1 silently
        DualAttention(C, reduction=C + 1)


def test_identity_at_initialisation() -> None:
    torch.manual_seed(1)
    layer = DualAttention(C)
    x = torch.randn(2, C, 6, 5)
    with torch.no_grad():
        assert torch.equal(layer(x), x)
        # and not the identity once the gates move
        assert not torch.allclose(_random_gates(layer)(x), x)


@pytest.mark.parametrize("branches", [("pam",), ("cam",)])
def test_spatial_permutation_equivariance(branches: tuple[str, ...]) -> None:
    torch.manual_seed(2)
    layer = _random_gates(DualAttention(C, reduction=2, branches=branches)).double()
    b, h, w = 2, 4, 5
    x = torch.randn(b, C, h, w, dtype=torch.float64)
    perm = torch.randperm(h * w)

    def permute(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, C, h * w)[:, :, perm].reshape(b, C, h, w)

    with torch.no_grad():
        torch.testing.assert_close(layer(permute(x)), permute(layer(x)))


def test_eval_batch_independence() -> None:
    torch.manual_seed(3)
    layer = _random_gates(DualAttention(C)).eval()
    x = torch.randn(3, C, 4, 6)
    y = x.clone()
    y[1] = torch.randn(C, 4, 6) * 3
    with torch.no_grad():
        out_x, out_y = layer(x), layer(y)
    torch.testing.assert_close(out_x[[0, 2]], out_y[[0, 2]])
    assert not torch.allclose(out_x[1], out_y[1])


def test_gradcheck_float64() -> None:
    torch.manual_seed(4)
    layer = _random_gates(DualAttention(C, reduction=4)).double()
    x = torch.randn(1, C, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(5)
    layer = _random_gates(DualAttention(C))
    layer(torch.randn(2, C, 4, 3)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        if name == "pam.key_conv.bias":
            # q_i . b_k is the same for every key j: the softmax cancels it, its gradient is 0
            assert p.grad.abs().max() < 1e-5
        else:
            assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"reduction": 0}, ValueError, "reduction"),
        ({"reduction": 2.0}, TypeError, "reduction"),
        ({"branches": ()}, ValueError, "branches"),
        ({"branches": ("pam", "sam")}, ValueError, "branches"),
        ({"branches": ("cam", "cam")}, ValueError, "branches"),
        ({"branches": "pam"}, TypeError, "branches"),
        ({"branches": None}, TypeError, "branches"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        DualAttention(C, **kwargs)


def test_bad_channels_and_inputs() -> None:
    with pytest.raises(ValueError, match="channels"):
        DualAttention(0)
    layer = DualAttention(C)
    with pytest.raises(ValueError, match=r"8 channels.*\(2, 4, 3, 3\)"):
        layer(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="4-D"):
        layer(torch.randn(C, 3, 3))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(1, C, 3, 3, dtype=torch.long))


def test_bf16_autocast_close_to_fp32() -> None:
    # tolerance: bf16 has an 8-bit mantissa (relative step 2^-8 = 0.4 %); the convs run in bf16,
    # the logits and softmax in fp32; measured ~0.1 % of the fp32 scale, asserted within 2 %
    torch.manual_seed(6)
    layer = _random_gates(DualAttention(C)).eval()
    x = torch.randn(2, C, 7, 9)
    with torch.no_grad():
        ref = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    scale = ref.abs().max()
    assert (out.float() - ref).abs().max() <= 0.02 * scale


def test_registered_and_inside_gald() -> None:
    assert "danet" in gald.list_ga()
    assert isinstance(gald.create_ga("danet", C, branches=("cam",)), DualAttention)
    block = gald.GALD(C, ga_module="danet").eval()
    with torch.no_grad():
        assert block(torch.randn(1, C, 11, 6)).shape == (1, C, 11, 6)
