"""DualGCN (DGCNet) against an explicit reference, the authors' layout, and its contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gald
from _helpers import assert_finite_under_fp16_autocast
from gald.ga import DualGCN
from gald.ga.dualgcn import _DenseGrad

C = 8


def _randomise(layer: DualGCN) -> DualGCN:
    """Random affine parameters and running statistics in every BatchNorm."""
    with torch.no_grad():
        for m in layer.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand_like(m.weight) + 0.5)
                m.bias.copy_(torch.randn_like(m.bias) * 0.5)
                assert m.running_mean is not None
                assert m.running_var is not None
                m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.5)
                m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
    return layer


def _bn(t: torch.Tensor, norm: nn.Module, train: bool) -> torch.Tensor:
    """BatchNorm over every dim but the channel one (so 1-D and 2-D alike), written out."""
    assert isinstance(norm, nn.BatchNorm2d)
    dims = [0, *range(2, t.ndim)]
    shape = [1, -1] + [1] * (t.ndim - 2)
    if train:
        mean = t.mean(dim=dims)
        var = ((t - mean.reshape(shape)) ** 2).mean(dim=dims)  # biased, as BatchNorm normalises
    else:
        assert norm.running_mean is not None
        assert norm.running_var is not None
        mean, var = norm.running_mean, norm.running_var
    scale = norm.weight / torch.sqrt(var + norm.eps)
    return (t - mean.reshape(shape)) * scale.reshape(shape) + norm.bias.reshape(shape)


def _mix(t: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """A 1x1 conv (2-D or 1-D) as a channel-mixing matrix product on (B, Cin, ...)."""
    assert isinstance(conv, (nn.Conv1d, nn.Conv2d))
    w = conv.weight.reshape(conv.weight.shape[0], conv.weight.shape[1])
    out = torch.einsum("oc,bc...->bo...", w, t)
    if conv.bias is not None:
        out = out + conv.bias.reshape([1, -1] + [1] * (t.ndim - 2))
    return out


def _depthwise_s2p1(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """Depthwise 3x3, stride 2, zero padding 1, as a sum over the nine kernel taps."""
    assert isinstance(conv, nn.Conv2d)
    _, _, h, w = x.shape
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    padded = F.pad(x, (1, 1, 1, 1))
    out = torch.zeros(x.shape[0], x.shape[1], ho, wo, dtype=x.dtype)
    for di in range(3):
        for dj in range(3):
            tap = conv.weight[:, 0, di, dj].reshape(1, -1, 1, 1)
            out = out + tap * padded[:, :, di : di + 2 * ho - 1 : 2, dj : dj + 2 * wo - 1 : 2]
    return out


def _interp_matrix(n_out: int, n_in: int, dtype: torch.dtype) -> torch.Tensor:
    """Linear interpolation with align_corners=True: output i samples input i*(n_in-1)/(n_out-1)."""
    m = torch.zeros(n_out, n_in, dtype=dtype)
    step = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    for i in range(n_out):
        src = i * step
        lo = min(int(src), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        frac = src - lo
        m[i, lo] += 1 - frac
        m[i, hi] += frac
    return m


def _reference(layer: DualGCN, x: torch.Tensor, train: bool) -> torch.Tensor:
    b, c, h, w = x.shape
    n = h * w

    # coordinate space
    small = x
    for conv_i, norm_i in ((0, 1), (2, 3), (4, 5)):
        small = _bn(_depthwise_s2p1(small, layer.local[conv_i]), layer.local[norm_i], train)
    g = layer.gcn_local_attention
    _, _, hs, ws = small.shape
    flat = small.reshape(b, c, hs * ws)
    k, v, q = _mix(flat, g.node_k), _mix(flat, g.node_v), _mix(flat, g.node_q)
    y = torch.empty_like(k)
    for i in range(b):
        affinity = torch.softmax(q[i] @ v[i].T, dim=1)  # (C/2, C/2), rows sum to one
        y[i] = affinity.T @ k[i]
    y = _bn(_mix(y, g.conv_wg), g.bn_wg, train)
    y = _bn(_mix(y.reshape(b, -1, hs, ws), g.out[0]), g.out[1], train)
    local = torch.relu(y + small)
    local = torch.einsum(
        "hi,bcij,wj->bchw", _interp_matrix(h, hs, x.dtype), local, _interp_matrix(w, ws, x.dtype)
    )
    local_feat = x * local + x

    # feature space
    states = _bn(_mix(x, layer.phi), layer.bn_phi, train).reshape(b, -1, n)
    nodes = _bn(_mix(x, layer.theta), layer.bn_theta, train).reshape(b, -1, n)
    z0 = torch.stack([states[i] @ nodes[i].T for i in range(b)])  # (B, 2C/r, C/r)
    adj = _bn(_mix(z0.transpose(1, 2), layer.conv_adj), layer.bn_adj, train).transpose(1, 2)
    z = _bn(_mix(z0 + adj, layer.conv_wg), layer.bn_wg, train)
    y = torch.stack([z[i] @ nodes[i] for i in range(b)]).reshape(b, -1, h, w)
    global_feat = torch.relu(x + _bn(_mix(y, layer.conv3), layer.bn3, train))

    fused = torch.cat([local_feat, global_feat], dim=1)
    return _bn(_mix(fused, layer.final[0]), layer.final[1], train)


@pytest.mark.parametrize(
    ("train", "shape"), [(False, (2, 5, 11)), (True, (2, 9, 6)), (False, (1, 1, 1))]
)
def test_matches_explicit_reference(train: bool, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    layer = _randomise(DualGCN(C, ratio=2)).double().train(train)
    b, h, w = shape
    x = torch.randn(b, C, h, w, dtype=torch.float64)
    expected = _reference(layer, x, train)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)


def test_authors_state_dict_layout() -> None:
    # the authors' DualGCN keys, with BatchNorm1d for bn_adj / bn_wg / gcn_local_attention.bn_wg
    layer = DualGCN(16, ratio=4)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    expected = {
        "phi.weight": (8, 16, 1, 1),
        "theta.weight": (4, 16, 1, 1),
        "conv_adj.weight": (4, 4, 1),
        "conv_wg.weight": (8, 8, 1),
        "conv3.weight": (16, 8, 1, 1),
        "local.0.weight": (16, 1, 3, 3),
        "local.5.running_var": (16,),
        "gcn_local_attention.node_k.bias": (8,),
        "gcn_local_attention.conv_wg.weight": (8, 8, 1),
        "gcn_local_attention.out.0.weight": (16, 8, 1, 1),
        "gcn_local_attention.out.1.weight": (16,),
        "final.0.weight": (16, 32, 1, 1),
        "final.1.running_mean": (16,),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    # a BatchNorm1d state dict loads into the norms applied on (B, C, L) tensors
    bn1d = nn.BatchNorm1d(4)
    with torch.no_grad():
        bn1d.running_mean.uniform_()
    layer.bn_adj.load_state_dict(bn1d.state_dict())
    torch.testing.assert_close(layer.bn_adj.running_mean, bn1d.running_mean)


def test_1d_norms_equal_batchnorm1d_in_train_mode() -> None:
    torch.manual_seed(1)
    layer = DualGCN(C, ratio=2).train()
    seen: list[torch.Tensor] = []
    handle = layer.conv_wg.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    layer(torch.randn(3, C, 4, 5))
    handle.remove()
    bn1d = nn.BatchNorm1d(layer.num_state).train()
    bn1d_out = bn1d(seen[0])
    torch.testing.assert_close(layer.bn_wg.running_mean, bn1d.running_mean)
    torch.testing.assert_close(layer.bn_wg.running_var, bn1d.running_var)
    assert bn1d_out.shape == seen[0].shape


def test_not_position_free() -> None:
    # the coordinate branch (strided convs, bilinear upsampling) sees positions: a spatial
    # permutation does not commute with the layer, unlike the position-free GA layers
    torch.manual_seed(2)
    layer = _randomise(DualGCN(C)).double().eval()
    b, h, w = 1, 6, 5
    x = torch.randn(b, C, h, w, dtype=torch.float64)
    perm = torch.randperm(h * w)

    def permute(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, C, h * w)[:, :, perm].reshape(b, C, h, w)

    with torch.no_grad():
        assert not torch.allclose(layer(permute(x)), permute(layer(x)))


def test_eval_batch_independence() -> None:
    torch.manual_seed(3)
    layer = _randomise(DualGCN(C)).eval()
    x = torch.randn(3, C, 4, 6)
    y = x.clone()
    y[0] = torch.randn(C, 4, 6) * 3
    with torch.no_grad():
        out_x, out_y = layer(x), layer(y)
    torch.testing.assert_close(out_x[1:], out_y[1:])
    assert not torch.allclose(out_x[0], out_y[0])


def test_dense_grad_is_the_identity_with_a_dense_gradient() -> None:
    x = torch.randn(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_DenseGrad.apply, (x,), eps=1e-6, atol=1e-5)
    upstream = torch.randn(1, 2, 2, 3, dtype=torch.float64).permute(0, 3, 1, 2)  # strided
    assert not upstream.is_contiguous()
    (grad,) = torch.autograd.grad(_DenseGrad.apply(x), x, upstream)
    assert grad.is_contiguous()
    assert torch.equal(grad, upstream)


@pytest.mark.parametrize(
    ("train", "shape"), [(False, (1, 3, 4)), (True, (2, 3, 4)), (True, (1, 9, 5))]
)
def test_gradcheck_float64(train: bool, shape: tuple[int, int, int]) -> None:
    # batch 1 guards the BatchNorm-backward stride workaround (_DenseGrad): without it the
    # input gradient of the feature-space graph is silently wrong on CPU
    torch.manual_seed(4)
    layer = _randomise(DualGCN(C)).double().train(train)
    b, h, w = shape
    x = torch.randn(b, C, h, w, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_train_batch_two_is_needed_and_sufficient() -> None:
    layer = DualGCN(C).train()
    with pytest.raises(ValueError, match="more than 1 value"):
        layer(torch.randn(1, C, 8, 8))  # the coordinate branch reaches a 1x1 map
    assert layer(torch.randn(2, C, 1, 1)).shape == (2, C, 1, 1)
    assert layer(torch.randn(1, C, 17, 9)).shape == (1, C, 17, 9)  # batch 1 on a larger map


def test_injectable_layers() -> None:
    layer = DualGCN(C, norm_layer=lambda ch: nn.GroupNorm(1, ch), act_layer=nn.SiLU)
    assert isinstance(layer.bn_adj, nn.GroupNorm)
    assert isinstance(layer.act, nn.SiLU)
    out = layer.train()(torch.randn(1, C, 3, 2))
    assert out.shape == (1, C, 3, 2)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"ratio": 0}, ValueError, "ratio"),
        ({"ratio": 9}, ValueError, "ratio"),
        ({"ratio": 2.0}, TypeError, "ratio"),
        ({"norm_layer": None}, TypeError, "norm_layer"),
        ({"act_layer": 1}, TypeError, "act_layer"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        DualGCN(C, **kwargs)


def test_bad_inputs() -> None:
    layer = DualGCN(C)
    with pytest.raises(ValueError, match=r"8 channels.*\(1, 16, 2, 2\)"):
        layer(torch.randn(1, 16, 2, 2))
    with pytest.raises(ValueError, match="4-D"):
        layer(torch.randn(1, C, 2, 2, 2))


def test_bf16_autocast_close_to_fp32() -> None:
    # tolerance: every conv runs in bf16 (relative step 2^-8) and errors compound over about ten
    # layers; logits, softmax and graph products run in fp32. Measured about 1 % of the fp32
    # output scale, asserted within 5 %.
    torch.manual_seed(5)
    layer = _randomise(DualGCN(C)).eval()
    x = torch.randn(2, C, 7, 9)
    with torch.no_grad():
        ref = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()


def test_registered_and_inside_gald() -> None:
    assert "dualgcn" in gald.list_ga()
    assert isinstance(gald.create_ga("dualgcn", C, ratio=2), DualGCN)
    block = gald.GALD(C, ga_module="dualgcn").eval()
    with torch.no_grad():
        assert block(torch.randn(1, C, 11, 6)).shape == (1, C, 11, 6)


def test_fp16_autocast_on_a_large_sum_stays_finite() -> None:
    # the re-projection sums N positions: with the norms' statistics as training leaves them
    # (large variances) the output is moderate, but an fp16 copy of the sum would overflow
    torch.manual_seed(0)
    m = gald.create_ga("dualgcn", 16).eval()
    with torch.no_grad():
        for bn, var in ((m.bn_adj, 1e9), (m.bn_wg, 1e9), (m.bn3, 1e12)):
            bn.running_var.fill_(var)
    assert_finite_under_fp16_autocast(m, torch.relu(torch.randn(1, 16, 33, 33)) * 20)
