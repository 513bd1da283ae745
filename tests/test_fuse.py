"""gald.fuse: BatchNorm folding of the LD branch and the GALD ``down`` stage."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

import gald
from gald import fuse, fuse_conv_bn


def _randomise(m: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                n = mod.num_features
                mod.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                mod.bias.copy_(torch.randn(n, generator=gen))
                mod.running_mean.copy_(torch.randn(n, generator=gen))
                mod.running_var.copy_(torch.rand(n, generator=gen) + 0.3)
    return m


def _count(m: nn.Module, kind: type) -> int:
    return sum(isinstance(s, kind) for s in m.modules())


def _slow_conv_bn(x, conv, bn):
    """conv then an eval BatchNorm, written out."""
    y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return (y - bn.running_mean[:, None, None]) * scale[:, None, None] + bn.bias[:, None, None]


@settings(max_examples=15, deadline=None)
@given(
    channels=st.integers(1, 6),
    num_stages=st.integers(1, 3),
    padding=st.integers(0, 1),
    final_act=st.booleans(),
    offset=st.sampled_from([0.0, 1.0, 2.0]),
    cl=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_fused_ld_equals_unfused(channels, num_stages, padding, final_act, offset, cl, seed):
    ld = gald.LocalDistribution(
        channels, num_stages=num_stages, padding=padding, final_act=final_act, offset=offset
    )
    ld = _randomise(ld, seed).eval()
    fused = fuse(ld)
    assert _count(fused, nn.BatchNorm2d) == 0
    assert _count(ld, nn.BatchNorm2d) == num_stages  # a copy: the original is untouched
    side = max(ld.min_size, 9)
    x = torch.randn(2, channels, side + 3, side, generator=torch.Generator().manual_seed(seed))
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ld(x), rtol=1e-5, atol=1e-6)


def test_fuse_conv_bn_matches_written_out_formula():
    conv = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4)
    bn = _randomise(nn.BatchNorm2d(4), 3).eval()
    x = torch.randn(2, 4, 9, 8)
    with torch.no_grad():
        want = _slow_conv_bn(x, conv, bn)
        fuse_conv_bn(conv, bn)
        torch.testing.assert_close(conv(x), want, rtol=1e-5, atol=1e-6)


def test_conv_without_bias_gets_one():
    conv = nn.Conv2d(3, 3, 3, groups=3, bias=False)
    bn = _randomise(nn.BatchNorm2d(3), 1).eval()
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        want = bn(conv(x))
        fuse_conv_bn(conv, bn)
        assert conv.bias is not None
        torch.testing.assert_close(conv(x), want, rtol=1e-5, atol=1e-6)


def test_fused_gald_and_head_equal_unfused():
    torch.manual_seed(0)
    for model, x in [
        (gald.GALD(8, "cgnl", ga_kwargs={"groups": 2}), torch.randn(2, 8, 21, 17)),
        (gald.GALDHead(6, 3, channels=8, ga_kwargs={"groups": 2}), torch.randn(2, 6, 19, 19)),
    ]:
        model = _randomise(model).eval()
        fused = fuse(model)
        gald_blocks = [m for m in fused.modules() if isinstance(m, gald.GALD)]
        assert gald_blocks
        for block in gald_blocks:
            assert isinstance(block.down[1], nn.Identity)
            assert block.ld is not None
            assert all(isinstance(stage[1], nn.Identity) for stage in block.ld.branch)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
        # the Identity replacing a folded norm takes its mode: an eval model stays all eval
        assert not [name for name, m in fused.named_modules() if m.training]


def test_inplace_folds_the_given_module_and_keeps_other_norms():
    block = _randomise(gald.GALD(8, "cgnl", ga_kwargs={"groups": 2})).eval()
    before = _count(block, nn.BatchNorm2d)
    out = fuse(block, inplace=True)
    assert out is block
    assert _count(block, nn.BatchNorm2d) == before - 4  # down + three LD stages
    assert _count(block, nn.GroupNorm) == 1  # the GA's own norm is not touched


def test_training_mode_is_refused():
    ld = _randomise(gald.LocalDistribution(4))  # train mode
    with pytest.raises(ValueError, match=r"LocalDistribution\) must be in eval mode"):
        fuse(ld)


def test_fuse_folds_conv_bn_pairs_of_any_sequential_but_not_shared_convs():
    shared = nn.Conv2d(3, 3, 1)
    seq = nn.Sequential(
        nn.Conv2d(3, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),  # folded
        nn.BatchNorm2d(3),
        nn.Conv2d(3, 3, 1),  # a norm before a conv: kept
        shared,
        nn.BatchNorm2d(3),  # the conv is used twice: kept
        shared,
    )
    seq = _randomise(seq).double().eval()
    fused = fuse(seq)
    kinds = [type(m).__name__ for m in fused]
    assert kinds == [
        "Conv2d",
        "Identity",
        "ReLU",
        "BatchNorm2d",
        "Conv2d",
        "Conv2d",
        "BatchNorm2d",
        "Conv2d",
    ]
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(fused(x), seq(x), rtol=1e-10, atol=1e-10)


class _Separable(nn.Sequential):
    """A separable conv as segmentation-models-pytorch writes it: a Sequential subclass with
    only a constructor (depthwise, then pointwise)."""

    def __init__(self, c: int, out: int) -> None:
        super().__init__(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.Conv2d(c, out, 1))


class _Residual(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


def test_a_norm_after_a_sequential_ending_in_a_conv_is_folded() -> None:
    shared_tail = nn.Sequential(nn.Conv2d(4, 4, 1))
    hooked = nn.Sequential(nn.Conv2d(4, 4, 1))
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    model = nn.Sequential(
        _Separable(4, 6),
        nn.BatchNorm2d(6),  # folded into the pointwise conv
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(6, 6, 1), nn.Sequential(nn.ReLU(), nn.Conv2d(6, 4, 1))),
        nn.BatchNorm2d(4),  # folded: the nested chain ends in a conv
        _Residual(nn.Conv2d(4, 4, 1)),
        nn.BatchNorm2d(4),  # kept: its own forward adds a residual after the conv
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU()),
        nn.BatchNorm2d(4),  # kept: the chain ends in an activation
        hooked,
        nn.BatchNorm2d(4),  # kept: a hook may change the chain's output
        shared_tail,
        nn.BatchNorm2d(4),  # kept: the conv is used twice
        shared_tail,
    )
    model = _randomise(model).double().eval()
    fused = fuse(model)
    assert [i for i, m in enumerate(fused) if isinstance(m, nn.BatchNorm2d)] == [6, 8, 10, 12]
    assert isinstance(fused[1], nn.Identity) and isinstance(fused[4], nn.Identity)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-10, atol=1e-10)


def test_fused_module_trains_without_norms():
    fused = fuse(_randomise(gald.LocalDistribution(3)).eval())
    fused.train()
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    fused(x).sum().backward()
    assert x.grad is not None
    assert all(p.grad is not None for p in fused.parameters())


@pytest.mark.parametrize(
    ("conv", "bn", "exc", "pattern"),
    [
        (
            nn.Linear(2, 2),
            nn.BatchNorm2d(2),
            TypeError,
            r"conv must be an nn.Conv1d or nn.Conv2d, got Linear",
        ),
        (nn.Conv2d(2, 2, 1), nn.ReLU(), TypeError, r"bn must be a BatchNorm module, got ReLU"),
        (nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), ValueError, r"eval mode.*training=True"),
        (nn.Conv2d(2, 2, 1), nn.BatchNorm2d(3).eval(), ValueError, r"3 features.*=2"),
        (
            nn.Conv2d(2, 2, 1),
            nn.BatchNorm2d(2, track_running_stats=False).eval(),
            ValueError,
            r"track_running_stats=False",
        ),
    ],
)
def test_fuse_conv_bn_errors(conv, bn, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fuse_conv_bn(conv, bn)


def test_fuse_argument_errors():
    with pytest.raises(TypeError, match=r"module must be an nn.Module, got int"):
        fuse(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"inplace must be a bool, got int"):
        fuse(nn.Identity(), inplace=1)  # type: ignore[arg-type]


def test_a_conv_whose_weight_is_tied_to_another_is_left_alone() -> None:
    """Tied weights: scaling the folded conv's weight would rescale the other conv too."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.b.weight = self.a[0].weight
            self.c = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))  # not tied: folded

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(self.a(x) + self.b(x))

    torch.manual_seed(0)
    model = Tied().eval()
    for bn in (model.a[1], model.c[1]):
        bn.running_var.uniform_(2.0, 4.0)
        bn.running_mean.normal_()
    x = torch.randn(2, 4, 7, 7)
    fused = gald.fuse(model)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
    assert isinstance(fused.a[1], nn.BatchNorm2d) and isinstance(fused.c[1], nn.Identity)


class _BatchNormAct(nn.BatchNorm2d):
    """Shaped like timm's BatchNormAct2d: a BatchNorm with its activation inside."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


class _StdConv(nn.Conv2d):
    """Shaped like timm's StdConv2d: standardises its weight in every call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        std, mean = torch.std_mean(self.weight, dim=(1, 2, 3), keepdim=True)
        w = (self.weight - mean) / (std + 1e-6)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class _StdConvInner(nn.Conv2d):
    """Standardises its weight in ``_conv_forward``, keeping ``nn.Conv2d.forward``."""

    def _conv_forward(self, x, weight, bias):  # type: ignore[no-untyped-def, override]
        std, mean = torch.std_mean(weight, dim=(1, 2, 3), keepdim=True)
        return super()._conv_forward(x, (weight - mean) / (std + 1e-6), bias)


def _backward_hooked(conv: nn.Conv2d) -> nn.Conv2d:
    conv.register_full_backward_hook(lambda m, gi, go: None)
    return conv


def _weight_norm(conv: nn.Conv2d) -> nn.Conv2d:
    return nn.utils.parametrizations.weight_norm(conv)


def _pruned(conv: nn.Conv2d) -> nn.Conv2d:
    return prune.random_unstructured(conv, "weight", amount=0.5)


def _hooked(conv: nn.Conv2d) -> nn.Conv2d:
    conv.register_forward_hook(lambda m, args, out: out * 2)
    return conv


@pytest.mark.parametrize(
    ("make_conv", "make_bn", "reason"),
    [
        (lambda: nn.Conv2d(4, 4, 3, padding=1), lambda: _BatchNormAct(4), "_BatchNormAct has its"),
        (lambda: _StdConv(4, 4, 3, padding=1), lambda: nn.BatchNorm2d(4), "_StdConv has its own"),
        (lambda: _weight_norm(nn.Conv2d(4, 4, 3, padding=1)), lambda: nn.BatchNorm2d(4), "param"),
        (lambda: _pruned(nn.Conv2d(4, 4, 3, padding=1)), lambda: nn.BatchNorm2d(4), "hooks"),
        (lambda: _hooked(nn.Conv2d(4, 4, 3, padding=1)), lambda: nn.BatchNorm2d(4), "hooks"),
        (lambda: _StdConvInner(4, 4, 3, padding=1), lambda: nn.BatchNorm2d(4), "_StdConvInner"),
        (
            lambda: _backward_hooked(nn.Conv2d(4, 4, 3, padding=1)),
            lambda: nn.BatchNorm2d(4),
            "hooks",
        ),
    ],
)
def test_pairs_the_fold_would_not_reproduce_are_left_alone(make_conv, make_bn, reason) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(make_conv(), make_bn(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).eval()
    for bn in (model[1], model[3]):
        bn.running_var.uniform_(2.0, 4.0)
        bn.running_mean.normal_()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        ref = model(x)
        kept = type(model[1])
        fused = gald.fuse(model, inplace=True)  # a pruned conv cannot be deep-copied
        torch.testing.assert_close(fused(x), ref, rtol=1e-5, atol=1e-5)
    assert type(fused[1]) is kept and isinstance(fused[3], nn.Identity)
    with pytest.raises(ValueError, match=rf"cannot fold bn into conv exactly: .*{reason}"):
        fuse_conv_bn(make_conv(), make_bn().eval())


class _ListCalls(nn.Module):
    """Conv -> norm pairs in forward code, reached through a ModuleList and an alias."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(2))
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(2))
        self.conv = nn.Conv2d(c, c, 1)
        self.bn = nn.BatchNorm2d(c)
        self.norm = self.bn  # the same norm under a second name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in zip(self.convs, self.bns):
            x = torch.relu(bn(conv(x)))
        return self.norm(self.conv(x))


def test_pairs_in_undeclared_forward_code_are_left_and_outputs_kept() -> None:
    # only plain Sequential chains and declared pairs are folded: forward code is not analysed
    model = _randomise(nn.Sequential(_ListCalls(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    model = model.double().eval()
    fused = fuse(model)
    norms = [n for n, m in fused.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms == ["0.bns.0", "0.bns.1", "0.bn"]  # the trailing Sequential pair is folded
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-10, atol=1e-10)


def test_fuse_uses_each_norms_eps() -> None:
    """Ported models often use eps=1e-3: the fold must read it from the norm."""
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, eps=1e-3)).double()
    with torch.no_grad():
        model[1].running_var.uniform_(1e-4, 1e-3)  # small variances: eps matters
        model[1].running_mean.normal_()
    model.eval()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fuse(model)(x), model(x))


def test_fuse_leaves_a_training_mode_norm_inside_an_eval_model() -> None:
    model = nn.Sequential(
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    ).eval()
    model[3].train()
    fused = fuse(model)
    assert isinstance(fused[1], nn.Identity) and isinstance(fused[3], nn.BatchNorm2d)


def test_fuse_keeps_a_frozen_model_frozen() -> None:
    """A conv without bias gets one from the fold: frozen like the rest of the model."""
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)).eval()
    model.requires_grad_(False)
    fused = fuse(model)
    assert fused[0].bias is not None
    assert not any(p.requires_grad for p in fused.parameters())


@pytest.mark.parametrize("name", ["nonlocal", "glore", "dualgcn"])
def test_a_declared_pair_leaves_an_eval_identity(name: str) -> None:
    """The pairs a layer declares in _fuse_pairs are replaced by an Identity in eval mode, as
    the folded norm was: a fused eval model has no submodule in training mode."""
    fused = gald.fuse(gald.get_ga_class(name)(16).eval())
    assert any(isinstance(m, nn.Identity) for m in fused.modules())
    assert not [n for n, m in fused.named_modules() if m.training]
