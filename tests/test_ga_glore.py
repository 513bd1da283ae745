"""GloRe (global reasoning unit) against an explicit per-sample reference and its structure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gald
from _helpers import assert_finite_under_fp16_autocast
from gald.ga import GloRe

C = 8


def _randomise(layer: GloRe) -> GloRe:
    """Random non-zero output norm (zero-initialised weight) and random running statistics."""
    with torch.no_grad():
        norm = layer.blocker
        assert isinstance(norm, nn.BatchNorm2d)
        norm.weight.copy_(torch.rand_like(norm.weight) + 0.5)
        norm.bias.copy_(torch.randn_like(norm.bias))
        assert norm.running_mean is not None
        assert norm.running_var is not None
        norm.running_mean.copy_(torch.randn_like(norm.running_mean))
        norm.running_var.copy_(torch.rand_like(norm.running_var) + 0.5)
    return layer


def _batch_norm(
    t: torch.Tensor, norm: nn.BatchNorm2d, train: bool, eps: float | None = None
) -> torch.Tensor:
    """BatchNorm written out: batch statistics (biased variance) in train, running ones in eval;
    ``eps`` defaults to the norm's own."""
    if train:
        mean = t.mean(dim=(0, 2, 3))
        var = ((t - mean[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))
    else:
        assert norm.running_mean is not None
        assert norm.running_var is not None
        mean, var = norm.running_mean, norm.running_var
    scale = norm.weight / torch.sqrt(var + (norm.eps if eps is None else eps))
    return (t - mean[None, :, None, None]) * scale[None, :, None, None] + norm.bias[
        None, :, None, None
    ]


def _reference(
    layer: GloRe, x: torch.Tensor, train: bool, eps: float | None = None
) -> torch.Tensor:
    b, c, h, w = x.shape
    n = h * w
    ws, bs = layer.conv_state.weight[:, :, 0, 0], layer.conv_state.bias
    wp, bp = layer.conv_proj.weight[:, :, 0, 0], layer.conv_proj.bias
    wn, bn = layer.gcn.conv1.weight[:, :, 0], layer.gcn.conv1.bias
    wstate = layer.gcn.conv2.weight[:, :, 0]
    we = layer.conv_extend.weight[:, :, 0, 0]
    outs = []
    for i in range(b):
        pixels = x[i].reshape(c, n)
        states = ws @ pixels + bs[:, None]  # (S, N)
        proj = wp @ pixels + bp[:, None]  # (K, N)
        v = torch.zeros(layer.num_state, layer.num_node, dtype=x.dtype)
        for s in range(layer.num_state):
            for k in range(layer.num_node):
                v[s, k] = (states[s] * proj[k]).sum()  # aggregate every pixel onto node k
        if layer.normalize:
            v = v / n
        hidden = v.clone()
        for s in range(layer.num_state):  # node-wise conv: mixes the nodes of each state row
            hidden[s] = v[s] + wn @ v[s] + bn
        hidden = wstate @ torch.relu(hidden)  # state-wise conv
        y = hidden @ proj  # back-projection onto the pixels, (S, N)
        outs.append((we @ y).reshape(c, h, w))
    blocker = layer.blocker
    assert isinstance(blocker, nn.BatchNorm2d)
    return x + _batch_norm(torch.stack(outs), blocker, train, eps)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("train", [False, True])
def test_matches_explicit_reference(normalize: bool, train: bool) -> None:
    torch.manual_seed(0)
    layer = _randomise(GloRe(C, normalize=normalize)).double().train(train)
    x = torch.randn(2, C, 4, 3, dtype=torch.float64)
    expected = _reference(layer, x, train)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)


def test_custom_sizes_match_reference() -> None:
    torch.manual_seed(1)
    layer = _randomise(GloRe(C, num_state=5, num_node=3)).double().eval()
    assert (layer.num_state, layer.num_node) == (5, 3)
    x = torch.randn(1, C, 2, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _reference(layer, x, False))


AUTHORS_BLOCKER_EPS = 1e-4  # GloRe_Unit_2D: self.blocker = BatchNorm2d(num_in, eps=1e-04)


def test_authors_norm_eps_is_reached_through_norm_layer() -> None:
    """The authors' output norm has eps 1e-4: with the documented norm_layer the layer gives
    their outputs; the default norm's eps gives visibly different ones at a small running
    variance (as trained weights may have)."""
    import functools

    torch.manual_seed(2)
    x = torch.randn(2, C, 4, 3, dtype=torch.float64)
    outs = {}
    for label, norm_layer in (
        ("authors", functools.partial(nn.BatchNorm2d, eps=1e-4)),
        ("default", nn.BatchNorm2d),
    ):
        torch.manual_seed(3)
        layer = _randomise(GloRe(C, normalize=False, norm_layer=norm_layer)).double().eval()
        assert layer.blocker.running_var is not None
        with torch.no_grad():
            layer.blocker.running_var.uniform_(1e-4, 1e-3)
            outs[label] = layer(x)
            expected = _reference(layer, x, False, eps=AUTHORS_BLOCKER_EPS)
    torch.testing.assert_close(outs["authors"], expected)
    assert (outs["default"] - expected).abs().max() > 1e-2 * expected.abs().max()


def test_defaults() -> None:
    layer = GloRe(16)
    assert (layer.num_state, layer.num_node, layer.normalize) == (8, 4, True)
    assert (GloRe(1).num_state, GloRe(1).num_node) == (1, 1)


@pytest.mark.parametrize("train", [False, True])
def test_identity_at_initialisation(train: bool) -> None:
    torch.manual_seed(2)
    layer = GloRe(C).train(train)
    x = torch.randn(2, C, 5, 4)
    with torch.no_grad():
        assert torch.equal(layer(x), x)
        assert not torch.allclose(_randomise(layer)(x), x)


def test_normalize_makes_the_projection_size_independent() -> None:
    # Tiling the input 2x2 multiplies N by 4: with normalize the per-node aggregate is unchanged,
    # so the output is the tiled output; without it the aggregate is 4x larger.
    torch.manual_seed(3)
    x = torch.randn(1, C, 3, 2, dtype=torch.float64)
    tiled = x.repeat(1, 1, 2, 2)
    with torch.no_grad():
        layer = _randomise(GloRe(C, normalize=True)).double().eval()
        torch.testing.assert_close(layer(tiled), layer(x).repeat(1, 1, 2, 2))
        layer.normalize = False
        assert not torch.allclose(layer(tiled), layer(x).repeat(1, 1, 2, 2))


def test_spatial_permutation_equivariance() -> None:
    torch.manual_seed(4)
    layer = _randomise(GloRe(C)).double().eval()
    b, h, w = 2, 4, 5
    x = torch.randn(b, C, h, w, dtype=torch.float64)
    perm = torch.randperm(h * w)

    def permute(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, C, h * w)[:, :, perm].reshape(b, C, h, w)

    with torch.no_grad():
        torch.testing.assert_close(layer(permute(x)), permute(layer(x)))


def test_eval_batch_independence() -> None:
    torch.manual_seed(5)
    layer = _randomise(GloRe(C)).eval()
    x = torch.randn(3, C, 4, 6)
    y = x.clone()
    y[2] = torch.randn(C, 4, 6) * 3
    with torch.no_grad():
        out_x, out_y = layer(x), layer(y)
    torch.testing.assert_close(out_x[:2], out_y[:2])
    assert not torch.allclose(out_x[2], out_y[2])


@pytest.mark.parametrize("train", [False, True])
def test_gradcheck_float64(train: bool) -> None:
    torch.manual_seed(6)
    layer = _randomise(GloRe(C)).double().train(train)
    x = torch.randn(1, C, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_train_batch_two_is_needed_and_sufficient() -> None:
    layer = GloRe(C).train()
    with pytest.raises(ValueError, match="more than 1 value"):
        layer(torch.randn(1, C, 1, 1))
    assert layer(torch.randn(2, C, 1, 1)).shape == (2, C, 1, 1)
    assert layer(torch.randn(1, C, 2, 1)).shape == (1, C, 2, 1)  # batch 1 is fine when H*W > 1


def test_injectable_layers() -> None:
    layer = GloRe(C, norm_layer=lambda ch: nn.GroupNorm(2, ch), act_layer=nn.GELU)
    assert isinstance(layer.blocker, nn.GroupNorm)
    assert isinstance(layer.gcn.act, nn.GELU)
    assert torch.count_nonzero(layer.blocker.weight) == 0  # still zero-initialised
    x = torch.randn(1, C, 1, 1)
    assert torch.equal(layer.train()(x), x)  # GroupNorm works at batch 1 on a 1x1 map


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_state": 0}, ValueError, "num_state"),
        ({"num_node": -1}, ValueError, "num_node"),
        ({"num_node": 2.5}, TypeError, "num_node"),
        ({"normalize": "yes"}, TypeError, "normalize"),
        ({"norm_layer": 3}, TypeError, "norm_layer"),
        ({"act_layer": "relu"}, TypeError, "act_layer"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        GloRe(C, **kwargs)


def test_bad_channels_and_inputs() -> None:
    with pytest.raises(TypeError, match="channels"):
        GloRe(8.0)  # type: ignore[arg-type]
    layer = GloRe(C)
    with pytest.raises(ValueError, match=r"8 channels.*\(1, 3, 2, 2\)"):
        layer(torch.randn(1, 3, 2, 2))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        layer([[1.0]])


def test_bf16_autocast_close_to_fp32() -> None:
    # tolerance: convs and the GCN run in bf16 (relative step 2^-8), the projection V in fp32;
    # measured 0.1-0.3 % of the fp32 output scale, asserted within 3 %
    torch.manual_seed(7)
    layer = _randomise(GloRe(C)).eval()
    x = torch.randn(2, C, 7, 9)
    with torch.no_grad():
        ref = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() <= 0.03 * ref.abs().max()


def test_registered_and_inside_gald() -> None:
    assert "glore" in gald.list_ga()
    assert isinstance(gald.create_ga("glore", C, num_node=3), GloRe)
    block = gald.GALD(C, ga_module="glore").eval()
    with torch.no_grad():
        assert block(torch.randn(1, C, 11, 6)).shape == (1, C, 11, 6)


def test_fp16_autocast_without_normalize_stays_finite() -> None:
    # normalize=False (the authors' setting) sums N positions into the graph's nodes
    torch.manual_seed(0)
    m = gald.create_ga("glore", 16, normalize=False).eval()
    with torch.no_grad():
        m.blocker.running_var.fill_(1e12)
    assert_finite_under_fp16_autocast(m, torch.relu(torch.randn(1, 16, 33, 33)) * 20)
