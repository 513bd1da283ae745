"""The contract every registered GA layer honours, checked over ``gald.list_ga()``.

Per-layer references and structural properties live in ``test_ga_<name>.py``; this suite checks
the shared contract: shapes for any B, H, W; eval-mode batch independence; float64 gradcheck;
bf16 autocast; use inside GALD; no tensor created on the default device; the docstring.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import gald

NAMES = gald.list_ga()
C = 16
# small configurations for the float64 gradcheck (the defaults are sized for 512 channels)
SMALL: dict[str, dict] = {
    "cgnl": {"groups": 2},
    "ema": {"num_bases": 4, "em_grad": True},  # the default no-grad EM loop is not differentiable by design
    "aspp": {"inner_channels": 4, "rates": (1, 2, 3)},
}


def perturb_(m: nn.Module, seed: int = 0) -> nn.Module:
    """Move every parameter and BN statistic away from its initial value (zero-initialised gates
    and fresh norms would make comparisons vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
                mod.running_mean.normal_(0, 0.2, generator=g)
                mod.running_var.uniform_(0.5, 1.5, generator=g)
    return m


def build(name: str, channels: int = C, **kw) -> nn.Module:
    return gald.create_ga(name, channels, **kw)


def test_zoo_is_complete() -> None:
    expected = {"nonlocal", "cgnl", "criss_cross", "psp", "aspp", "gc", "danet", "glore", "dualgcn", "ema"}
    assert expected <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
class TestGAContract:
    @given(b=st.integers(0, 3), h=st.integers(1, 12), w=st.integers(1, 12))
    def test_shape_eval(self, name: str, b: int, h: int, w: int) -> None:
        layer = build(name).eval()
        x = torch.randn(b, C, h, w)
        with torch.no_grad():
            y = layer(x)
        assert y.shape == x.shape and y.dtype == x.dtype

    @given(data=st.data(), h=st.integers(1, 12), w=st.integers(1, 12))
    def test_shape_train(self, name: str, data, h: int, w: int) -> None:
        cls = gald.get_ga_class(name)
        b = data.draw(st.integers(max(2, cls.min_train_batch), 3))  # type: ignore[attr-defined]
        layer = build(name).train()
        x = torch.randn(b, C, h, w)
        assert layer(x).shape == x.shape

    def test_train_at_min_batch(self, name: str) -> None:
        cls = gald.get_ga_class(name)
        b = cls.min_train_batch  # type: ignore[attr-defined]
        layer = build(name).train()
        x = torch.randn(b, C, 5, 6)
        assert layer(x).shape == x.shape

    def test_eval_batch_independence(self, name: str) -> None:
        layer = perturb_(build(name)).eval()
        x = torch.randn(3, C, 7, 6)
        with torch.no_grad():
            y = layer(x)
            x2 = x.clone()
            x2[1] = torch.randn(C, 7, 6) * 3
            y2 = layer(x2)
        torch.testing.assert_close(y2[0], y[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y2[2], y[2], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(y2[1], y[1]), "changing a sample must change its own output"

    def test_gradcheck_float64(self, name: str) -> None:
        layer = perturb_(build(name, 8, **SMALL.get(name, {}))).double().eval()
        x = torch.randn(2, 8, 3, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-5, fast_mode=True)

    def test_gradients_reach_parameters(self, name: str) -> None:
        layer = perturb_(build(name)).train()
        x = torch.randn(2, C, 6, 5, requires_grad=True)
        layer(x).square().mean().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        grads = [p.grad for p in layer.parameters() if p.requires_grad]
        assert grads and all(g is None or torch.isfinite(g).all() for g in grads)
        assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) >= 1

    def test_bf16_autocast(self, name: str) -> None:
        layer = perturb_(build(name)).eval()
        x = torch.randn(2, C, 9, 8)
        with torch.no_grad():
            ref = layer(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = layer(x)
        assert torch.isfinite(out).all()
        err = (out.float() - ref).abs().max().item()
        assert err <= 0.05 * ref.abs().max().item() + 0.05, f"bf16 error {err:.3g}"

    def test_inside_gald(self, name: str) -> None:
        block = gald.GALD(C, name).train()
        x = torch.randn(2, C, 11, 13, requires_grad=True)
        y = block(x)
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()

    def test_no_tensor_on_default_device(self, name: str) -> None:
        # Anything the forward creates without device=... would land on "meta" and then fail to
        # mix with the CPU input.
        layer = perturb_(build(name)).eval()
        x = torch.randn(2, C, 5, 7)
        with torch.no_grad():
            ref = layer(x)
            with torch.device("meta"):
                out = layer(x)
        assert out.device == x.device
        torch.testing.assert_close(out, ref)

    def test_docstring(self, name: str) -> None:
        doc = gald.get_ga_class(name).__doc__ or ""
        assert "Shape:" in doc and "(B, C, H, W)" in doc
        assert "omplexity" in doc

    def test_bad_input(self, name: str) -> None:
        layer = build(name)
        with pytest.raises(ValueError, match=f"must have {C} channels"):
            layer(torch.randn(1, C + 1, 4, 4))
        with pytest.raises(ValueError, match="4-D"):
            layer(torch.randn(C, 4, 4))
        with pytest.raises(TypeError, match="floating"):
            layer(torch.zeros(1, C, 4, 4, dtype=torch.long))
