"""gald.fuse folds the conv -> BatchNorm pairs that GA layers apply in their forward code
(the private ``_fuse_pairs`` protocol), next to the ``nn.Sequential`` neighbours."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import gald
from _helpers import randomise
from gald.registry import get_ga_class, list_ga

# Every registered GA, with the BatchNorms (paths inside the GA) that gald.fuse cannot fold and
# why. None is left today: every BatchNorm of every GA is applied directly to a conv's output,
# inside an nn.Sequential (aspp, psp, ema, gc, dualgcn's local/out/final) or through a declared
# _fuse_pairs pair (nonlocal, glore, dualgcn); cgnl, criss_cross and danet have no BatchNorm.
_LEFT: dict[str, set[str]] = {
    "aspp": set(),
    "cgnl": set(),
    "criss_cross": set(),
    "danet": set(),
    "dualgcn": set(),
    "ema": set(),
    "gc": set(),
    "glore": set(),
    "nonlocal": set(),
    "psp": set(),
}

# Non-default configurations that add BatchNorms (all foldable: Sequential neighbours).
_CONFIGS: list[tuple[str, dict[str, Any]]] = [(name, {}) for name in list_ga()] + [
    ("psp", {"pool_norm_layer": nn.BatchNorm2d}),
    ("aspp", {"pool_norm_layer": nn.BatchNorm2d}),
    ("gc", {"bottleneck_norm_layer": nn.BatchNorm2d}),
    ("nonlocal", {"mode": "gaussian", "sub_sample": True}),
    ("nonlocal", {"mode": "concatenation"}),
]


def _batchnorms(m: nn.Module) -> set[str]:
    return {name for name, sub in m.named_modules() if isinstance(sub, _BatchNorm)}


def _models(name: str, kwargs: dict[str, Any]) -> list[tuple[nn.Module, torch.Tensor, str]]:
    """The GA inside GALDHead and GALD, with an input and the prefix of the GA's path."""
    return [
        (
            gald.GALDHead(6, 3, channels=16, ga_module=name, ga_kwargs=kwargs),
            torch.randn(2, 6, 13, 11),
            "gald.ga.",
        ),
        (gald.GALD(16, name, ga_kwargs=kwargs), torch.randn(2, 16, 13, 11), "ga."),
    ]


def test_every_registered_ga_is_listed() -> None:
    assert set(_LEFT) == set(list_ga())


def _assert_fused_equals(model: nn.Module, fused: nn.Module, x: torch.Tensor, tol: float) -> None:
    """The fused model's output equals the unfused one's, relative to the output's size."""
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(fused(x), want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize(("name", "kwargs"), _CONFIGS, ids=lambda v: str(v))
def test_fuse_folds_every_foldable_batchnorm_of_every_ga(name: str, kwargs: dict[str, Any]) -> None:
    for model, x, prefix in _models(name, kwargs):
        model = randomise(model).eval()
        before = _batchnorms(model)
        assert before  # the comparison is not vacuous (GALD's down and LD have BatchNorms)
        fused = gald.fuse(model)
        assert _batchnorms(fused) == {prefix + n for n in _LEFT[name]}
        assert _batchnorms(model) == before  # fuse works on a copy
        _assert_fused_equals(model, fused, x, 1e-5)


@pytest.mark.parametrize("name", list_ga())
def test_fused_equals_unfused_in_float64(name: str) -> None:
    for model, x, _ in _models(name, {}):
        model = randomise(model).double().eval()
        _assert_fused_equals(model, gald.fuse(model), x.double(), 1e-10)


@pytest.mark.parametrize("name", list_ga())
def test_declared_pairs_name_a_conv_and_its_batchnorm(name: str) -> None:
    # A renamed attribute would silently turn the fold off; the unfused state dict keeps the
    # BatchNorms under their own names (converted checkpoints load into it).
    layer = get_ga_class(name)(16)
    declared = [(sub, pair) for sub in layer.modules() for pair in getattr(sub, "_fuse_pairs", ())]
    keys = layer.state_dict().keys()
    for sub, (conv_name, bn_name) in declared:
        conv, bn = getattr(sub, conv_name), getattr(sub, bn_name)
        assert isinstance(conv, (nn.Conv1d, nn.Conv2d))
        assert isinstance(bn, _BatchNorm)
        assert bn.num_features == conv.out_channels
        assert any(k.endswith(f"{bn_name}.running_var") for k in keys)
    expected = {"nonlocal": 1, "glore": 1, "dualgcn": 6}.get(name, 0)
    assert len(declared) == expected


def test_declared_pairs_of_the_ported_layers() -> None:
    fused = gald.fuse(randomise(gald.GALD(16, "dualgcn")).eval())
    ga = fused.ga
    for bn_name in ("bn_phi", "bn_theta", "bn_adj", "bn_wg", "bn3"):
        assert isinstance(getattr(ga, bn_name), nn.Identity)
    assert isinstance(ga.gcn_local_attention.bn_wg, nn.Identity)
    keys = fused.state_dict().keys()
    assert "ga.conv_adj.bias" in keys and "ga.bn_adj.weight" not in keys
    for name, bn_name in (("nonlocal", "norm"), ("glore", "blocker")):
        layer = gald.fuse(randomise(gald.GALD(16, name)).eval()).ga
        assert isinstance(getattr(layer, bn_name), nn.Identity)


def test_syncbatchnorm_is_folded_too() -> None:
    model = gald.GALDHead(6, 3, channels=16, ga_module="dualgcn", norm_layer=nn.SyncBatchNorm)
    model = randomise(model).double().eval()
    assert _batchnorms(model)
    fused = gald.fuse(model)
    assert _batchnorms(fused) == set()
    x = torch.randn(1, 6, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-10, atol=1e-8)


class _Declared(nn.Module):
    """Three declared pairs, of which only the first two can be folded, and one BN after a
    non-conv op."""

    _fuse_pairs = (("conv", "bn"), ("conv1d", "bn1d"), ("shared", "bn_shared"), ("conv", "gn"))

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv1d = nn.Conv1d(4, 5, 1, bias=False)
        self.bn1d = nn.BatchNorm1d(5)
        self.shared = nn.Conv1d(5, 5, 1)
        self.bn_shared = nn.BatchNorm1d(5)
        self.again = nn.Sequential(self.shared)  # the same conv at a second place
        self.gn = nn.GroupNorm(1, 4)
        self.bn_after_relu = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gn(self.bn(self.conv(x))).flatten(2)  # the declared ("conv", "gn") is invalid
        y = self.bn_shared(self.shared(self.bn1d(self.conv1d(y))))
        return self.again(self.bn_after_relu(torch.relu(y)))


def test_declared_pairs_are_folded_only_where_sound() -> None:
    model = randomise(_Declared()).double().eval()
    fused = gald.fuse(model)
    assert isinstance(fused.bn, nn.Identity)
    assert isinstance(fused.bn1d, nn.Identity)
    assert isinstance(fused.bn_shared, nn.BatchNorm1d)  # its conv is used twice
    assert isinstance(fused.bn_after_relu, nn.BatchNorm1d)  # after a ReLU, not a conv
    assert isinstance(fused.gn, nn.GroupNorm)  # not a BatchNorm
    assert set(model.state_dict()) == set(_Declared().state_dict())  # the original is intact
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-10, atol=1e-10)


def test_conv1d_batchnorm1d_in_a_sequential_and_by_hand() -> None:
    seq = randomise(nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.BatchNorm1d(4))).eval()
    x = torch.randn(2, 3, 7)
    with torch.no_grad():
        want = seq(x)
        fused = gald.fuse(seq)
        assert isinstance(fused[1], nn.Identity)
        torch.testing.assert_close(fused(x), want, rtol=1e-5, atol=1e-5)
        conv, bn = seq[0], seq[1]
        gald.fuse_conv_bn(conv, bn)
        torch.testing.assert_close(conv(x), want, rtol=1e-5, atol=1e-5)


def test_whole_galdnet_and_aux_head_leave_no_batchnorm() -> None:
    # the backbone's bottlenecks and deep stem and the auxiliary head declare their pairs too
    from gald.models import DilatedResNet, GALDNet

    net = GALDNet(5, backbone=DilatedResNet(50))
    net = randomise(net).eval().double()
    x = torch.randn(1, 3, 49, 49, dtype=torch.float64)
    with torch.no_grad():
        want = net(x)
        fused = gald.fuse(net)
        got = fused(x)
    assert _batchnorms(fused) == set()
    for key in ("out", "aux"):
        # random weights through 50 layers make large logits: compare relative to their size
        scale = want[key].abs().max()
        torch.testing.assert_close(got[key] / scale, want[key] / scale, rtol=0, atol=1e-10)


def test_the_plain_stem_folds_too() -> None:
    # the 7x7 stem (deep_stem=False) declares its own pair; the rest is the network above
    from gald.models import DilatedResNet

    net = randomise(DilatedResNet(50, deep_stem=False)).eval().double()
    fused = gald.fuse(net)
    assert _batchnorms(fused) == set()
    x = torch.randn(2, 3, 21, 23, dtype=torch.float64)
    with torch.no_grad():
        want = net.relu(net.bn1(net.conv1(x)))
        got = fused.relu(fused.bn1(fused.conv1(x)))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
