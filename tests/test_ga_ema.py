"""EMA (EMANet's EM attention) against an explicit EM reference, its bases and its gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gald
from gald.ga import EMA

C, K = 8, 4


def _randomise(layer: EMA) -> EMA:
    """Random affine parameters and running statistics in the output BatchNorm."""
    with torch.no_grad():
        norm = layer.conv2[1]
        assert isinstance(norm, nn.BatchNorm2d)
        norm.weight.copy_(torch.rand_like(norm.weight) + 0.5)
        norm.bias.copy_(torch.randn_like(norm.bias))
        assert norm.running_mean is not None
        assert norm.running_var is not None
        norm.running_mean.copy_(torch.randn_like(norm.running_mean) * 0.3)
        norm.running_var.copy_(torch.rand_like(norm.running_var) + 0.5)
    return layer


def _unit_columns(t: torch.Tensor) -> torch.Tensor:
    return t / (1e-6 + torch.sqrt((t * t).sum(dim=-2, keepdim=True)))


def _reference(
    layer: EMA, x: torch.Tensor, bases: torch.Tensor, train: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and the updated bases, one sample, one basis and one EM step at a time."""
    b, c, h, w = x.shape
    n, k_count = h * w, layer.num_bases
    w1, b1 = layer.conv1.weight[:, :, 0, 0], layer.conv1.bias
    recons, final_mus = [], []
    for i in range(b):
        feats = w1 @ x[i].reshape(c, n) + b1[:, None]  # (C, N)
        mu = bases[0].clone()  # (C, K)
        z = torch.empty(n, k_count, dtype=x.dtype)
        for _ in range(layer.iterations):
            # E-step: each pixel's responsibilities over the K bases (a softmax per pixel)
            for p in range(n):
                logits = feats[:, p] @ mu
                e = torch.exp(logits - logits.max())
                z[p] = e / e.sum()
            # M-step: each basis is the responsibility-weighted mean of the pixels, unit norm
            new_mu = torch.empty_like(mu)
            for k in range(k_count):
                new_mu[:, k] = (feats * z[:, k]).sum(dim=1) / (1e-6 + z[:, k].sum())
            mu = _unit_columns(new_mu)
        recons.append(torch.relu(mu @ z.T).reshape(c, h, w))
        final_mus.append(mu)
    conv2, norm = layer.conv2[0], layer.conv2[1]
    assert isinstance(conv2, nn.Conv2d)
    assert isinstance(norm, nn.BatchNorm2d)
    y = torch.einsum("oc,bchw->bohw", conv2.weight[:, :, 0, 0], torch.stack(recons))
    if train:
        mean = y.mean(dim=(0, 2, 3))
        var = ((y - mean[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))
    else:
        assert norm.running_mean is not None
        assert norm.running_var is not None
        mean, var = norm.running_mean, norm.running_var
    y = (y - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + norm.eps)
    y = y * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]
    new_bases = bases
    if train and b > 0:
        batch_mean = torch.stack(final_mus).mean(dim=0, keepdim=True)
        mixed = layer.momentum * bases + (1 - layer.momentum) * batch_mean
        new_bases = mixed / torch.sqrt((mixed * mixed).sum(dim=1, keepdim=True))
    return torch.relu(x + y), new_bases


def test_matches_reference_in_eval_and_keeps_the_bases() -> None:
    torch.manual_seed(0)
    layer = _randomise(EMA(C, num_bases=K)).double().eval()
    x = torch.randn(2, C, 3, 5, dtype=torch.float64)
    bases = layer.bases.clone()
    expected, _ = _reference(layer, x, bases, train=False)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)
    assert torch.equal(layer.bases, bases)


@pytest.mark.parametrize("momentum", [0.9, 0.0, 1.0])
def test_matches_reference_in_train_and_updates_the_bases(momentum: float) -> None:
    torch.manual_seed(1)
    layer = _randomise(EMA(C, num_bases=K, iterations=2, momentum=momentum)).double().train()
    bases = layer.bases.clone()
    x = torch.randn(3, C, 4, 2, dtype=torch.float64)
    expected, expected_bases = _reference(layer, x, bases, train=True)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.bases, expected_bases)
    # momentum 1 keeps the bases (up to the re-normalisation of fp32-initialised columns)
    assert torch.allclose(layer.bases, bases, rtol=0, atol=1e-6) == (momentum == 1.0)


def test_bases_stay_unit_norm_and_move_towards_the_data() -> None:
    torch.manual_seed(2)
    layer = EMA(C, num_bases=K, momentum=0.5).train()
    first = layer.bases.clone()
    torch.testing.assert_close(first.norm(dim=1), torch.ones(1, K), rtol=0, atol=1e-5)
    for _ in range(3):
        layer(torch.randn(2, C, 4, 4) + 2.0)
    torch.testing.assert_close(layer.bases.norm(dim=1), torch.ones(1, K), rtol=0, atol=1e-5)
    assert not torch.allclose(layer.bases, first)
    assert "bases" in layer.state_dict()  # a persistent buffer, saved with the weights


def test_empty_batch_in_train_leaves_the_bases() -> None:
    layer = EMA(C, num_bases=K).train()
    bases = layer.bases.clone()
    out = layer(torch.randn(0, C, 3, 3))
    assert out.shape == (0, C, 3, 3)
    assert torch.equal(layer.bases, bases)


def test_em_grad_changes_gradients_not_outputs() -> None:
    torch.manual_seed(3)
    x = torch.randn(2, C, 4, 3)
    frozen = _randomise(EMA(C, num_bases=K)).eval()
    flowing = EMA(C, num_bases=K, em_grad=True).eval()
    flowing.load_state_dict(frozen.state_dict())
    torch.testing.assert_close(flowing(x), frozen(x))

    # em_grad=False (the authors): mu and Z are constants, so conv1 gets no gradient and the
    # input gradient is the identity path only, d relu(x + const) / dx = 1[out > 0]
    xf = x.clone().requires_grad_()
    out = frozen(xf)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    assert frozen.conv1.weight.grad is None
    assert frozen.conv1.bias.grad is None
    assert frozen.conv2[0].weight.grad is not None
    torch.testing.assert_close(xf.grad, upstream * (out > 0))

    # em_grad=True: gradients flow through the EM iterations into conv1 and the input
    xg = x.clone().requires_grad_()
    flowing(xg).backward(upstream)
    assert flowing.conv1.weight.grad is not None
    assert flowing.conv1.weight.grad.abs().sum() > 0
    assert not torch.allclose(xg.grad, xf.grad)


def test_gradcheck_float64_through_em() -> None:
    torch.manual_seed(4)
    layer = _randomise(EMA(C, num_bases=K, em_grad=True)).double().eval()
    x = torch.randn(1, C, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_gradcheck_float64_no_grad_em_wrt_conv2() -> None:
    # with the no-grad EM loop the layer is still an exact function of conv2's weight (mu and Z
    # do not depend on it), so its gradient is checkable there; w.r.t. x it is not the full
    # derivative by design (see test_em_grad_changes_gradients_not_outputs)
    torch.manual_seed(5)
    layer = _randomise(EMA(C, num_bases=K)).double().eval()
    x = torch.randn(1, C, 3, 4, dtype=torch.float64)
    params = dict(layer.named_parameters())
    weight = params.pop("conv2.0.weight").detach().clone().requires_grad_()

    def run(w: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, {**params, "conv2.0.weight": w}, (x,))

    assert torch.autograd.gradcheck(run, (weight,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_spatial_permutation_equivariance() -> None:
    torch.manual_seed(6)
    layer = _randomise(EMA(C, num_bases=K)).double().eval()
    b, h, w = 2, 3, 5
    x = torch.randn(b, C, h, w, dtype=torch.float64)
    perm = torch.randperm(h * w)

    def permute(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, C, h * w)[:, :, perm].reshape(b, C, h, w)

    with torch.no_grad():
        torch.testing.assert_close(layer(permute(x)), permute(layer(x)))


def test_eval_batch_independence() -> None:
    torch.manual_seed(7)
    layer = _randomise(EMA(C, num_bases=K)).eval()
    x = torch.randn(3, C, 4, 6)
    y = x.clone()
    y[1] = torch.randn(C, 4, 6) * 3
    with torch.no_grad():
        out_x, out_y = layer(x), layer(y)
    torch.testing.assert_close(out_x[[0, 2]], out_y[[0, 2]])
    assert not torch.allclose(out_x[1], out_y[1])


def test_sync_bases_is_a_no_op_without_a_process_group() -> None:
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    layer = EMA(C, num_bases=K)
    bases = layer.bases.clone()
    layer.sync_bases()
    assert torch.equal(layer.bases, bases)


def test_sync_bases_averages_over_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks simulated in one process: ``all_reduce`` is replaced by a sum with the other
    rank's bases, so the check is of the arithmetic (the mean's direction, unit columns) and of
    the call made (a SUM over the given group)."""
    gen = torch.Generator().manual_seed(100)
    sent = [torch.randn((1, 4, 3), generator=gen) for _ in range(2)]
    group = object()
    calls = []

    def all_reduce(tensor: torch.Tensor, op: object, group: object) -> None:
        calls.append((op, group))
        tensor.add_(sent[1])  # what rank 1 contributes

    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    layer = EMA(4, num_bases=3)
    with torch.no_grad():
        layer.bases.copy_(sent[0])
    layer.sync_bases(group)
    assert calls == [(torch.distributed.ReduceOp.SUM, group)]
    mean = (sent[0] + sent[1]) / 2
    torch.testing.assert_close(layer.bases, mean / mean.norm(dim=1, keepdim=True))


def test_train_batch_two_is_needed_and_sufficient() -> None:
    layer = EMA(C, num_bases=K).train()
    with pytest.raises(ValueError, match="more than 1 value"):
        layer(torch.randn(1, C, 1, 1))
    assert layer(torch.randn(2, C, 1, 1)).shape == (2, C, 1, 1)
    assert layer(torch.randn(1, C, 3, 1)).shape == (1, C, 3, 1)


def test_injectable_layers() -> None:
    layer = EMA(C, num_bases=K, norm_layer=lambda ch: nn.GroupNorm(2, ch), act_layer=nn.GELU)
    assert isinstance(layer.conv2[1], nn.GroupNorm)
    assert isinstance(layer.out_act, nn.GELU)
    out = layer.train()(torch.randn(1, C, 1, 1))
    assert out.shape == (1, C, 1, 1)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_bases": 0}, ValueError, "num_bases"),
        ({"iterations": 0}, ValueError, "iterations"),
        ({"iterations": 2.0}, TypeError, "iterations"),
        ({"momentum": 1.5}, ValueError, "momentum"),
        ({"momentum": -0.1}, ValueError, "momentum"),
        ({"momentum": "0.9"}, TypeError, "momentum"),
        ({"em_grad": 1}, TypeError, "em_grad"),
        ({"norm_layer": None}, TypeError, "norm_layer"),
        ({"act_layer": 0}, TypeError, "act_layer"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        EMA(C, **kwargs)


def test_bad_inputs() -> None:
    layer = EMA(C, num_bases=K)
    with pytest.raises(ValueError, match=r"8 channels.*\(2, 7, 3, 3\)"):
        layer(torch.randn(2, 7, 3, 3))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.zeros(2, C, 3, 3, dtype=torch.int32))


def test_bf16_autocast_close_to_fp32() -> None:
    # tolerance: the two 1x1 convs run in bf16 (relative step 2^-8) and the EM iterations in
    # fp32, but the softmax sharpens small logit errors; measured below 1 % of the fp32
    # output scale, asserted within 5 %
    torch.manual_seed(8)
    layer = _randomise(EMA(C, num_bases=K)).eval()
    x = torch.randn(2, C, 7, 9)
    with torch.no_grad():
        ref = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()


def test_registered_and_inside_gald() -> None:
    assert "ema" in gald.list_ga()
    assert isinstance(gald.create_ga("ema", C, num_bases=K), EMA)
    block = gald.GALD(C, ga_module="ema", ga_kwargs={"num_bases": K}).eval()
    with torch.no_grad():
        assert block(torch.randn(1, C, 11, 6)).shape == (1, C, 11, 6)


def test_em_grad_train_step_with_the_inplace_bases_update() -> None:
    """In training the bases buffer is updated in place after the EM iterations; with
    em_grad=True autograd must still hold the bases that forward used."""
    layer = EMA(C, num_bases=K, em_grad=True).train()
    before = layer.bases.clone()
    x = torch.randn(2, C, 6, 7, requires_grad=True)
    layer(x).square().mean().backward()
    assert not torch.equal(layer.bases, before)
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert layer.conv1.weight.grad is not None and layer.conv1.weight.grad.abs().sum() > 0
