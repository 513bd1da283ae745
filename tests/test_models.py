"""DilatedResNet and GALDNet: structure, output strides, backbone protocols, width checks, errors.

Numerical parity of the whole network with the authors' semantics is in test_convert.py (it loads
their checkpoint layout); sliding-window inference is in test_slide_inference.py.
"""

from __future__ import annotations

import copy
import enum
import re
import types
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import gald
from _helpers import assert_close as _assert_close
from _official_reference import randomise_, upsample_align_corners
from gald.bench._timing import saved_bytes
from gald.models import DilatedResNet, GALDNet

CLASSES = 5


@pytest.fixture(scope="module")
def r50() -> DilatedResNet:
    return DilatedResNet(50).eval()


class MyNorm(nn.BatchNorm2d):
    pass


@pytest.fixture(scope="module")
def r50_os16_plain_stem() -> DilatedResNet:
    return DilatedResNet(
        50, output_stride=16, multi_grid=(1, 2, 1), deep_stem=False, norm_layer=MyNorm
    ).eval()


# --------------------------------------------------------------------------- DilatedResNet


def test_output_stride_8_structure_and_shapes(r50: DilatedResNet) -> None:
    assert r50.channels == (1024, 2048)
    stem = [m for m in r50.conv1 if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in stem] == [
        (3, 64, (2, 2)),
        (64, 64, (1, 1)),
        (64, 128, (1, 1)),
    ]
    assert r50.maxpool.ceil_mode
    assert [len(r50.layer1), len(r50.layer2), len(r50.layer3), len(r50.layer4)] == [3, 4, 6, 3]
    assert r50.layer2[0].conv2.stride == (2, 2)
    assert {b.conv2.dilation for b in r50.layer3} == {(2, 2)}
    assert [b.conv2.dilation for b in r50.layer4] == [(4, 4), (8, 8), (16, 16)]
    assert [b.conv2.padding for b in r50.layer4] == [(4, 4), (8, 8), (16, 16)]
    x = torch.randn(1, 3, 17, 26)
    with torch.no_grad():
        c3, c4 = r50(x)
    assert c3.shape == (1, 1024, 3, 4) and c4.shape == (1, 2048, 3, 4)
    assert (r50.feature_size(17), r50.feature_size(26)) == (3, 4)
    assert torch.isfinite(c4).all() and c4.abs().sum() > 0


def test_output_stride_16_and_plain_stem(r50_os16_plain_stem: DilatedResNet) -> None:
    net = r50_os16_plain_stem
    assert isinstance(net.conv1, nn.Conv2d) and net.conv1.kernel_size == (7, 7)
    assert net.bn1.num_features == 64 and net.layer1[0].conv1.in_channels == 64
    assert net.layer3[0].conv2.stride == (2, 2)
    assert {b.conv2.dilation for b in net.layer3} == {(1, 1)}
    # multi-grid (1, 2, 1) over the three blocks at base dilation 2
    assert [b.conv2.dilation for b in net.layer4] == [(2, 2), (4, 4), (2, 2)]
    # torchvision's 7x7 ResNet pools in floor mode: the same grid as its weights were used on
    assert not net.maxpool.ceil_mode
    with torch.no_grad():
        c3, c4 = net(torch.randn(1, 3, 64, 50))
    assert c3.shape == (1, 1024, 4, 4) and c4.shape == (1, 2048, 4, 4)  # ceil mode: 5, 4
    assert (net.feature_size(64), net.feature_size(50)) == (4, 4)


def test_norm_layer_factory(r50_os16_plain_stem: DilatedResNet) -> None:
    norms = [m for m in r50_os16_plain_stem.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(type(m) is MyNorm for m in norms)
    assert len(norms) == 1 + 4 + 3 * 16  # bn1, downsamples, three per block


def test_one_multi_grid_factor_for_every_block() -> None:
    with torch.device("meta"):
        net = DilatedResNet(50, multi_grid=(2,))
    assert [b.conv2.dilation for b in net.layer4] == [(8, 8)] * 3


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"depth": 34}, ValueError, r"depth must be one of \[50, 101\], got 34"),
        ({"output_stride": 32}, ValueError, "output_stride must be 8 or 16, got 32"),
        ({"depth": 50.0}, TypeError, "depth must be an int, got float 50.0"),
        ({"output_stride": 8.0}, TypeError, "output_stride must be an int, got float 8.0"),
        ({"depth": True}, TypeError, "depth must be an int, got bool"),
        ({"multi_grid": ()}, ValueError, r"one dilation factor per layer4 block \(3\) .* got 0"),
        ({"multi_grid": (1, 2)}, ValueError, r"or one for all of them, got 2: \(1, 2\)"),
        ({"multi_grid": (1, 2, 4, 8)}, ValueError, "or one for all of them, got 4"),
        ({"multi_grid": (1, 0)}, ValueError, r"multi_grid\[1\] must be >= 1, got 0"),
        ({"deep_stem": 1}, TypeError, "deep_stem must be a bool"),
    ],
)
def test_backbone_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        DilatedResNet(**kwargs)


def test_backbone_bad_input(r50: DilatedResNet) -> None:
    with pytest.raises(
        ValueError, match=r"images must have 3 channels .* got shape \(1, 4, 9, 9\)"
    ):
        r50(torch.randn(1, 4, 9, 9))
    with pytest.raises(ValueError, match="must be 4-D"):
        r50(torch.randn(3, 9, 9))


# --------------------------------------------------------------------------- GALDNet


class Tiny(nn.Module):
    """A small backbone: stride-2 feature (6 ch) then a stride-1 feature (8 ch)."""

    def __init__(self, kind: str = "pair") -> None:
        super().__init__()
        self.kind = kind
        self.a = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.b = nn.Conv2d(6, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor):
        stem = x.mean(1, keepdim=True)
        c3 = torch.relu(self.a(x))
        c4 = torch.relu(self.bn(self.b(c3)))
        if self.kind == "pair":
            return c3, c4
        if self.kind == "list":  # timm features_only style: more features than needed
            return [stem, c3, c4, c4[:, :2]]
        if self.kind == "dict":
            return {"stem": stem, "layer3": c3, "layer4": c4, "extra": c4[:, :2]}
        return c4


def test_backbone_probe_of_a_compiled_backbone_compiles_nothing() -> None:
    """GALDNet reads a compiled backbone's widths by running it eagerly: no graph is compiled
    while the network is built, so the user's first compile sees only the user's input."""
    graphs: list[object] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[object]) -> object:
        graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward

    torch._dynamo.reset()
    backbone = torch.compile(Tiny(), backend=backend)
    net = GALDNet(CLASSES, backbone=backbone, head={"channels": 16}, aux=False)
    assert graphs == []
    assert net.backbone is backbone
    net.eval()(torch.randn(2, 3, 40, 40))
    assert graphs and (2, 3, 40, 40) in graphs[0]


def _tiny_net(kind: str = "pair", **kwargs) -> GALDNet:
    kwargs.setdefault("head", {"channels": 16})
    kwargs.setdefault("aux", gald.AuxHead(6, CLASSES, channels=4))
    net = GALDNet(CLASSES, backbone=Tiny(kind), **kwargs)
    return randomise_(net, torch.Generator().manual_seed(1)).eval()


@pytest.mark.parametrize(
    ("kind", "in_features"),
    [("pair", None), ("list", (1, 2)), ("list", (-3, -2)), ("dict", ("layer3", "layer4"))],
)
def test_forward_dict_matches_explicit_composition(kind: str, in_features) -> None:
    net = _tiny_net(kind, in_features=in_features)
    assert net.in_channels == (6, 8)
    x = torch.randn(2, 3, 13, 10, dtype=torch.float64)
    net = net.double()
    with torch.no_grad():
        out = net(x)
        feats = net.backbone(x)
        if kind == "pair":
            c3, c4 = feats
        elif kind == "list":
            c3, c4 = feats[1], feats[2]
        else:
            c3, c4 = feats["layer3"], feats["layer4"]
        expected_out = upsample_align_corners(net.head(c4), (13, 10))
        expected_aux = upsample_align_corners(net.aux_head(c3), (13, 10))
    assert set(out) == {"out", "aux"}
    assert out["out"].shape == (2, CLASSES, 13, 10)
    _assert_close(out["out"], expected_out, rtol=1e-10, atol=1e-10)
    _assert_close(out["aux"], expected_aux, rtol=1e-10, atol=1e-10)


def test_default_picks_are_the_last_two_features() -> None:
    # the last two of [stem, c3, c4, c4[:, :2]] are 8 and 2 channels wide
    net = GALDNet(CLASSES, backbone=Tiny("list"), head={"channels": 16}, aux=False)
    assert net.in_channels == (8, 2)
    assert net.head.in_channels == 2
    net = GALDNet(CLASSES, backbone=Tiny("dict"), head={"channels": 16}, aux=False)
    assert net.in_channels == (8, 2)


def test_a_head_dict_is_checked_at_construction() -> None:
    for key in ("in_channels", "num_classes"):
        with pytest.raises(ValueError, match=rf"head sets \['{key}'\], which GALDNet sets itself"):
            GALDNet(CLASSES, backbone=Tiny(), head={key: 4})
    with pytest.raises(TypeError, match=r"GALDHead got unexpected keyword arguments \['bad'\]"):
        GALDNet(CLASSES, backbone=Tiny(), head={"channels": 16, "bad": 1})


def test_no_aux_and_default_heads() -> None:
    net = GALDNet(CLASSES, backbone=Tiny(), aux=False).eval()
    assert net.aux_head is None
    assert isinstance(net.head, gald.GALDHead) and net.head.channels == 512
    out = net(torch.randn(1, 3, 9, 9))
    assert set(out) == {"out"} and out["out"].shape == (1, CLASSES, 9, 9)
    net = GALDNet(CLASSES, backbone=Tiny(), head={"channels": 16})
    assert isinstance(net.aux_head, gald.AuxHead) and net.aux_head.in_channels == 6


def test_train_mode_backward_reaches_every_part() -> None:
    net = _tiny_net().train()
    out = net(torch.randn(2, 3, 12, 12))
    (out["out"].square().mean() + 0.4 * out["aux"].square().mean()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_declared_channels_are_used_without_a_dry_run() -> None:
    class Declared(Tiny):
        def __init__(self, channels) -> None:
            super().__init__("list")
            self.channels = channels
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return super().forward(x)

    backbone = Declared([1, 6, 8, 2])
    net = GALDNet(CLASSES, backbone=backbone, in_features=(1, 2), head={"channels": 16})
    assert net.in_channels == (6, 8) and backbone.calls == 0

    class Info:  # timm's feature_info
        def channels(self):
            return [1, 6, 8]

        def module_name(self):
            return ["stem", "layer3", "layer4"]

    backbone = Declared(None)  # a list output (timm's FeatureListNet): indices
    backbone.feature_info = Info()
    net = GALDNet(CLASSES, backbone=backbone, in_features=(1, 2), aux=False)
    assert net.in_channels == (6, 8) and backbone.calls == 0
    with pytest.raises(ValueError, match=r"in_channels=\(6, 7\), but the backbone .* declares"):
        GALDNet(CLASSES, backbone=backbone, in_features=(1, 2), in_channels=(6, 7))


class _TimmDict(nn.Module):
    """timm's FeatureDictNet: a dict keyed by ``return_layers``' values (module name -> key,
    ``str(out_index)`` by default) and a ``feature_info`` naming the modules."""

    def __init__(self, keys: dict[str, str]) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.layer3 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.layer4 = nn.Conv2d(6, 8, 3, padding=1)
        self.return_layers = keys
        self.calls = 0

        class Info:
            def channels(self) -> list[int]:
                return [4, 6, 8]

            def module_name(self) -> list[str]:
                return ["stem", "layer3", "layer4"]

        self.feature_info = Info()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        out = {}
        for name in ("stem", "layer3", "layer4"):
            x = getattr(self, name)(x)
            out[self.return_layers[name]] = x
        return out


def test_a_timm_dict_backbone_is_picked_by_its_output_keys() -> None:
    backbone = _TimmDict({"stem": "0", "layer3": "3", "layer4": "4"})
    net = GALDNet(CLASSES, backbone=backbone, in_features=("3", "4"), head={"channels": 16})
    assert net.in_channels == (6, 8) and backbone.calls == 0  # declared: no dry run
    assert net.eval()(torch.randn(1, 3, 16, 16))["out"].shape == (1, CLASSES, 16, 16)
    renamed = _TimmDict({"stem": "s", "layer3": "c3", "layer4": "c4"})  # an out_map
    net = GALDNet(CLASSES, backbone=renamed, in_features=("c3", "c4"), head={"channels": 16})
    assert net.in_channels == (6, 8) and renamed.calls == 0
    # the module names are not the output keys: refused, naming the keys it returns
    with pytest.raises(ValueError, match=r"keys \['0', '3', '4'\]"):
        GALDNet(CLASSES, backbone=backbone, in_features=("layer3", "layer4"))


class FeatureListNet(_TimmDict):
    """timm's FeatureListNet: a FeatureDictNet (``return_layers``, ``feature_info``) whose
    forward returns the dict's values as a list."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        return list(super().forward(x).values())


def test_feature_names_for_a_list_backbone_are_refused_by_what_it_returns() -> None:
    backbone = FeatureListNet({"stem": "0", "layer3": "3", "layer4": "4"})
    for names in (("layer3", "layer4"), ("3", "4")):  # module names or FeatureDictNet keys
        with pytest.raises(
            ValueError,
            match=rf"^GALDNet: in_features={re.escape(repr(names))} names features, but the backbone "
            r"\(FeatureListNet\) returns a list of them, which in_features picks by integer "
            r"index: pass in_features=\(1, 2\) \(its features come from the modules "
            r"\['stem', 'layer3', 'layer4'\], in that order\)$",
        ) as err:
            GALDNet(CLASSES, backbone=backbone, in_features=names)
        assert "dict" not in str(err.value)
    with pytest.raises(ValueError, match=r"pass in_features=\(i, j\) \(its features come from"):
        GALDNet(CLASSES, backbone=backbone, in_features=("a", "b"))
    assert backbone.calls == 0  # said at construction, without running the backbone
    net = GALDNet(CLASSES, backbone=backbone, in_features=(1, 2), head={"channels": 16})
    assert net.in_channels == (6, 8) and backbone.calls == 0
    assert net.eval()(torch.randn(1, 3, 16, 16))["out"].shape == (1, CLASSES, 16, 16)
    # a feature net with return_dict=False (timm's FeatureHookNet, FeatureGetterNet)
    hooks = Tiny("list")
    hooks.return_dict = False
    with pytest.raises(
        ValueError, match=r"\(Tiny\) returns a list of them, .*in_features=\(i, j\)$"
    ):
        GALDNet(CLASSES, backbone=hooks, in_features=("a", "b"))


def test_feature_names_for_a_list_found_by_the_dry_run_or_declared() -> None:
    from _standins import create_model

    features = create_model("resnet50d", features_only=True)  # a list, widths declared
    with pytest.raises(
        ValueError,
        match=r"^GALDNet: the backbone returned a list of 2 features, which in_features picks "
        r"by integer index; got the names in_features=\('a', 'b'\): pass two indices from -2 "
        r"to 1 \(in_features=\(-2, -1\) for the last two\)$",
    ):
        GALDNet(CLASSES, backbone=features, in_features=("a", "b"))
    declared = Tiny("list")
    declared.channels = [1, 6, 8, 2]  # read without running it: said so
    with pytest.raises(
        ValueError, match=r"^GALDNet: the backbone declares widths for a list of 4 features, "
    ):
        GALDNet(CLASSES, backbone=declared, in_features=("layer3", "layer4"))
    declared.channels = {"layer3": 6, "layer4": 8}
    with pytest.raises(
        ValueError,
        match=r"^GALDNet: the backbone declares widths for a dict with keys \['layer3', 'layer4'\]; "
        r"in_features=\(0, 1\) must be two of its keys \(a dict is picked by key, not by position\)$",
    ):
        GALDNet(CLASSES, backbone=declared, in_features=(0, 1))


def test_a_timm_dict_backbone_given_module_names_is_told_its_keys() -> None:
    backbone = _TimmDict({"stem": "0", "layer3": "3", "layer4": "4"})
    with pytest.raises(
        ValueError,
        match=r"^GALDNet: in_features=\('layer3', 'layer4'\) are not output keys of the backbone "
        r"\(_TimmDict\), which returns a dict with keys \['0', '3', '4'\] \(from its modules "
        r"\['stem', 'layer3', 'layer4'\]\); \('layer3', 'layer4'\) name its modules, whose "
        r"output keys are \('3', '4'\): pass in_features=\('3', '4'\)$",
    ):
        GALDNet(CLASSES, backbone=backbone, in_features=("layer3", "layer4"))
    with pytest.raises(ValueError, match=r"keys \['0', '3', '4'\] \(from its modules .*\)$"):
        GALDNet(CLASSES, backbone=backbone, in_features=("c3", "c4"))
    assert backbone.calls == 0


def test_dry_run_restores_train_flags() -> None:
    backbone = Tiny("dict").train()
    backbone.bn.eval()
    before = backbone.bn.running_mean.clone()
    GALDNet(CLASSES, backbone=backbone, in_features=("layer3", "layer4"), head={"channels": 16})
    assert backbone.training and not backbone.bn.training
    assert torch.equal(backbone.bn.running_mean, before)


def test_dry_run_leaves_a_training_backbone_statistics_alone() -> None:
    # a pretrained backbone left in training mode: the width probe must run it in eval mode
    backbone = Tiny("dict").train()
    with torch.no_grad():
        backbone.bn.running_mean.normal_()
    stats = {k: v.clone() for k, v in backbone.state_dict().items()}
    GALDNet(CLASSES, backbone=backbone, in_features=("layer3", "layer4"), head={"channels": 16})
    assert backbone.training and backbone.bn.training
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, stats[key]), key


def test_width_mismatch_caught_at_construction() -> None:
    with pytest.raises(ValueError, match=r"head expects 16 input channels .*\(c4\) has 8"):
        GALDNet(CLASSES, backbone=Tiny(), head=gald.GALDHead(16, CLASSES, channels=16))
    with pytest.raises(
        ValueError, match=r"aux head expects 1024 input channels .*'layer3'.* has 6"
    ):
        GALDNet(
            CLASSES,
            backbone=Tiny("dict"),
            in_features=("layer3", "layer4"),
            head={"channels": 16},
            aux=gald.AuxHead(1024, CLASSES),
        )


def test_numpy_ints_select_features_and_widths() -> None:
    import numpy as np

    net = GALDNet(
        CLASSES,
        backbone=Tiny("list"),
        in_features=(np.int64(1), np.int64(2)),
        in_channels=(np.int64(6), np.int32(8)),
        head={"channels": 16},
    )
    assert net.in_features == (1, 2) and net.in_channels == (6, 8)
    assert all(type(v) is int for v in (*net.in_features, *net.in_channels))
    assert net.eval()(torch.randn(1, 3, 9, 9))["out"].shape == (1, CLASSES, 9, 9)


def test_declared_width_wrong_is_named_at_the_first_forward() -> None:
    # given by hand for a backbone that declares nothing: the first forward names in_channels
    net = GALDNet(CLASSES, backbone=Tiny(), in_channels=(6, 16), head={"channels": 16}, aux=False)
    with pytest.raises(
        ValueError,
        match=r"feature .*has shape \(1, 8, 5, 5\), but in_channels\[1\]=16: the head was "
        r"built for 16 channels, the backbone gives 8; pass in_channels",
    ):
        net(torch.randn(1, 3, 9, 9))
    net = GALDNet(CLASSES, backbone=Tiny(), in_channels=(4, 8), head={"channels": 16})
    with pytest.raises(ValueError, match=r"in_channels\[0\]=4: the auxiliary head was built"):
        net(torch.randn(1, 3, 9, 9))


def test_dry_run_failure_asks_for_in_channels() -> None:
    gray = nn.Sequential(nn.Conv2d(1, 4, 1))  # expects 1-channel input
    with pytest.raises(ValueError, match=r"could not infer .* pass in_channels=\(c3, c4\)"):
        GALDNet(CLASSES, backbone=gray)


def test_non_feature_outputs_are_rejected() -> None:
    class Flat(nn.Module):
        def forward(self, x):
            return [x.mean((2, 3)), x.mean((1, 2, 3))]

    with pytest.raises(TypeError, match=r"must be \(B, C, H, W\) tensors, got Tensor and Tensor"):
        GALDNet(CLASSES, backbone=Flat())


def test_single_tensor_backbone_is_rejected() -> None:
    with pytest.raises(TypeError, match=r"backbone must return a \(c3, c4\) pair, .*, got Tensor"):
        GALDNet(CLASSES, backbone=Tiny("tensor"))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"in_features": ("layer3",)}, ValueError, r"in_features must be a pair .* got 1 items"),
        ({"in_features": "ab"}, TypeError, "in_features must be None or a pair"),
        ({"in_features": (0, 7)}, ValueError, r"cannot pick in_features=\(0, 7\)"),
        ({"in_channels": (6, 0)}, ValueError, r"in_channels\[1\] must be >= 1, got 0"),
        ({"in_channels": (6,)}, ValueError, r"in_channels must be a pair of ints .* got 1 items"),
        ({"in_channels": 6}, TypeError, r"in_channels must be None or a pair of ints .* got int"),
        ({"in_features": (0, 1.0)}, TypeError, r"in_features\[1\] must be an int, got float"),
        ({"depth": 50}, ValueError, "depth and output_stride configure the default backbone"),
        ({"output_stride": 16}, ValueError, "depth and output_stride configure the default"),
        ({"head": "cgnl"}, TypeError, "head must be None, a dict of GALDHead arguments"),
        ({"aux": 1}, TypeError, "aux must be a bool or an nn.Module, got int"),
        ({"backbone": "resnet"}, TypeError, "backbone must be an nn.Module or None, got str"),
        (
            {"head": gald.GALDHead(2, CLASSES + 2, channels=16)},
            ValueError,
            rf"head predicts num_classes={CLASSES + 2}, but the network has num_classes={CLASSES}",
        ),
        (
            {"aux": gald.AuxHead(8, CLASSES + 1, channels=4)},
            ValueError,
            rf"aux head predicts num_classes={CLASSES + 1}, but the network",
        ),
        # a plain conv head, or a Sequential ending in one: the class count is its out_channels
        (
            {"head": nn.Conv2d(2, CLASSES + 1, 1)},
            ValueError,
            rf"head predicts num_classes={CLASSES + 1}, but",
        ),
        (
            {"aux": nn.Sequential(nn.Conv2d(6, 4, 1), nn.ReLU(), nn.Conv2d(4, CLASSES + 2, 1))},
            ValueError,
            rf"aux head predicts num_classes={CLASSES + 2}, but",
        ),
        ({"aux": "yes"}, TypeError, "aux must be a bool or an nn.Module, got str 'yes'"),
    ],
)
def test_galdnet_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    kwargs.setdefault("backbone", Tiny("list"))
    with pytest.raises(error, match=match):
        GALDNet(CLASSES, **kwargs)


class _OpaqueHead(nn.Module):
    """A head whose class count its structure does not say (its forward code decides)."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_a_head_of_another_class_count_is_named_at_the_first_forward() -> None:
    net = GALDNet(CLASSES, backbone=Tiny(), head=_OpaqueHead(8, CLASSES + 1), aux=False)
    with pytest.raises(
        ValueError,
        match=rf"^GALDNet: the head \(_OpaqueHead\) returns {CLASSES + 1} channels, but the "
        rf"network has num_classes={CLASSES}$",
    ):
        net(torch.randn(1, 3, 16, 16))
    net = GALDNet(CLASSES, backbone=Tiny(), aux=_OpaqueHead(6, CLASSES - 1), head={"channels": 16})
    with pytest.raises(ValueError, match=r"the aux head \(_OpaqueHead\) returns"):
        net.eval()(torch.randn(1, 3, 16, 16))
    assert GALDNet(CLASSES, backbone=Tiny(), aux=np.bool_(False)).aux_head is None


def test_bad_num_classes() -> None:
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        GALDNet(0, backbone=Tiny())


def test_dict_backbone_missing_key() -> None:
    with pytest.raises(ValueError, match=r"keys \['stem', 'layer3', 'layer4', 'extra'\]"):
        GALDNet(CLASSES, backbone=Tiny("dict"), in_features=("c3", "c4"))


def test_input_too_small_for_the_official_head(r50: DilatedResNet) -> None:
    head = gald.GALDHead.official(num_classes=CLASSES, channels=16)  # narrow, same min size
    net = GALDNet(CLASSES, backbone=r50, head=head)
    assert net.min_input_size == 111  # the authors' network fails at 110 px, works from 111
    assert r50.feature_size(110) == 14 and r50.feature_size(111) == 15
    with pytest.raises(
        ValueError, match=r"GALDNet: images is too small: .* >= 111 .*\(1, 3, 110, 200\)"
    ) as err:
        net(torch.randn(1, 3, 110, 200))
    # a remedy that GALDNet has (it takes no padding argument)
    assert "padding=1" not in str(err.value)
    assert (
        "(zero-pad them to at least 111x111 and crop the logits back, as "
        "gald.models.slide_inference with crop_size >= 111 does)" in str(err.value)
    )
    # any other backbone: the check after the backbone names both sizes
    tiny = GALDNet(CLASSES, backbone=Tiny(), head={"channels": 16, "padding": 0}, aux=False)
    assert tiny.min_input_size == 1 and tiny.head.min_size == 15
    with pytest.raises(
        ValueError,
        match=r"images of size \(20, 40\) give a backbone feature of size \(10, 20\), but the head needs at least 15x15",
    ):
        tiny(torch.randn(1, 3, 20, 40))


def test_bad_images() -> None:
    net = _tiny_net()
    with pytest.raises(TypeError, match="images must have a floating dtype"):
        net(torch.zeros(1, 3, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="images must be 4-D"):
        net(torch.zeros(3, 8, 8))


def test_torchvision_style_imagenet_weights_load_into_the_plain_stem(
    r50_os16_plain_stem: DilatedResNet,
) -> None:
    net = r50_os16_plain_stem
    sd = dict(net.state_dict())
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    sd.update({"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    mapped = gald.convert.imagenet_to_backbone(sd)
    assert sorted(mapped) == sorted(net.state_dict())
    net.load_state_dict(mapped, strict=True)


@pytest.fixture(scope="module")
def meta_resnets() -> dict[str, DilatedResNet]:
    with torch.device("meta"):
        return {
            "50": DilatedResNet(50),
            "101": DilatedResNet(101),
            "50-plain": DilatedResNet(50, deep_stem=False),
        }


def _imagenet_sd(net: DilatedResNet) -> dict[str, torch.Tensor]:
    sd = dict(net.state_dict())
    sd.update({"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    return gald.convert.imagenet_to_backbone(sd)


def test_checkpoint_of_another_depth_is_named(meta_resnets) -> None:
    r50, r101 = meta_resnets["50"], meta_resnets["101"]
    with pytest.raises(
        ValueError,
        match=r"^DilatedResNet: the state dict is a ResNet-101 \(23 blocks in layer3\); this "
        r"DilatedResNet has depth=50 \(\[3, 4, 6, 3\] blocks\): build it with depth=101$",
    ):
        r50.load_state_dict(_imagenet_sd(r101))
    with pytest.raises(
        ValueError, match=r"is a ResNet-50 \(6 blocks in layer3\); .* has depth=101 .*depth=50$"
    ):
        r101.load_state_dict(r50.state_dict())
    sd = {k: v for k, v in r50.state_dict().items() if not k.startswith("layer3.5.")}
    with pytest.raises(
        ValueError,
        match=r"has ResNet layers with \[3, 4, 5, 3\] blocks; this DilatedResNet has depth=50",
    ):
        r50.load_state_dict(sd)
    # strict=False keeps torch's semantics (extra and missing blocks are reported, not raised),
    # with a warning that names both depths: the missing blocks stay random
    with pytest.warns(UserWarning, match=r"is a ResNet-101 .* has depth=50") as record:
        result = r50.load_state_dict(r101.state_dict(), strict=False, assign=True)
    assert record[0].filename == __file__  # points at the caller's line
    assert "layer3.6.conv1.weight" in result.unexpected_keys and not result.missing_keys
    with pytest.warns(UserWarning, match=r"is a ResNet-50 .* has depth=101"):
        result = r101.load_state_dict(r50.state_dict(), strict=False, assign=True)
    assert "layer3.22.bn3.weight" in result.missing_keys and not result.unexpected_keys


def test_checkpoint_with_a_data_parallel_prefix_is_named(meta_resnets) -> None:
    r50 = meta_resnets["50"]
    prefixed = {f"module.{k}": v for k, v in r50.state_dict().items()}
    for strict in (True, False):
        with pytest.raises(
            ValueError,
            match=r"^DilatedResNet: every key of the state dict starts with 'module\.' .*"
            r"gald\.convert\.imagenet_to_backbone, which strips the prefix",
        ):
            r50.load_state_dict(prefixed, strict=strict)
    # the converter strips it, and the result loads
    r50.load_state_dict(gald.convert.imagenet_to_backbone(prefixed), assign=True)


def test_checkpoint_of_the_other_stem_is_named(meta_resnets) -> None:
    deep, plain = meta_resnets["50"], meta_resnets["50-plain"]
    for strict in (True, False):  # a stem mismatch is a shape mismatch: never allowed
        with pytest.raises(
            ValueError,
            match=r"the state dict has a 7x7 stem \(conv1\.weight of shape \(64, 3, 7, 7\)\); "
            r"this DilatedResNet has the deep stem: build DilatedResNet\(deep_stem=False\)",
        ):
            deep.load_state_dict(_imagenet_sd(plain), strict=strict)
        with pytest.raises(
            ValueError, match=r"has the deep stem .*build DilatedResNet\(deep_stem=True\)"
        ):
            plain.load_state_dict(deep.state_dict(), strict=strict)
    # an ImageNet checkpoint with the stem as conv1, bn1, conv2, bn2, conv3, bn3, not converted
    names = {"conv1.0": "conv1", "conv1.1": "bn1", "conv1.3": "conv2", "conv1.4": "bn2",
             "conv1.6": "conv3", "bn1": "bn3"}  # fmt: skip
    split = {}
    for key, value in deep.state_dict().items():
        module, _, leaf = key.rpartition(".")
        split[f"{names.get(module, module)}.{leaf}"] = value
    assert "conv2.weight" in split
    with pytest.raises(ValueError, match="separate conv1, conv2, conv3 .*imagenet_to_backbone"):
        deep.load_state_dict(split)


def test_matching_checkpoints_still_load(meta_resnets) -> None:
    for net in meta_resnets.values():
        assert not any(net.load_state_dict(net.state_dict(), assign=True))  # strict: all match
    r50 = meta_resnets["50"]
    partial = {k: v for k, v in r50.state_dict().items() if k.startswith("layer1.")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a subset of the layers, loaded non-strictly: no warning
        result = r50.load_state_dict(partial, strict=False, assign=True)
    assert "conv1.0.weight" in result.missing_keys and not result.unexpected_keys
    with pytest.raises(RuntimeError, match="Missing key"):  # nothing recognised: torch's message
        r50.load_state_dict({"backbone." + k: v for k, v in r50.state_dict().items()}, assign=True)


@given(
    height=st.integers(4, 24),
    width=st.integers(4, 24),
    batch=st.integers(1, 2),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_property_output_shapes_and_dtypes(height: int, width: int, batch: int, dtype) -> None:
    net = _NET.to(dtype)
    with torch.no_grad():
        out = net(torch.randn(batch, 3, height, width, dtype=dtype))
    for key in ("out", "aux"):
        assert out[key].shape == (batch, CLASSES, height, width) and out[key].dtype == dtype
        assert torch.isfinite(out[key]).all()


_NET = _tiny_net()


def test_empty_images_are_refused_by_name() -> None:
    net = _tiny_net().eval()
    with pytest.raises(ValueError, match=r"GALDNet: images has an empty side: .*\(2, 3, 9, 0\)"):
        net(torch.randn(2, 3, 9, 0))


def test_backbone_and_network_grad_checkpointing_change_nothing_but_memory() -> None:
    torch.manual_seed(0)
    net = GALDNet(5, depth=50, head={"channels": 16})
    net.train()
    ckpt = copy.deepcopy(net)
    ckpt.set_grad_checkpointing()
    assert ckpt.backbone.grad_checkpointing and ckpt.head.gald.ld.grad_checkpointing
    x = torch.randn(2, 3, 40, 40)
    outs = []
    for model in (net, ckpt):
        torch.manual_seed(1)  # the heads' dropout draws the same masks
        out = model(x)
        (out["out"].square().mean() + out["aux"].square().mean()).backward()
        outs.append(out["out"].detach())
    torch.testing.assert_close(outs[1], outs[0])
    for (name, p), q in zip(net.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=lambda m, n=name: f"{n}: {m}")
    for (name, b), c in zip(net.named_buffers(), ckpt.buffers()):  # BatchNorm updated once
        torch.testing.assert_close(c, b, msg=lambda m, n=name: f"{n}: {m}")
    with pytest.raises(TypeError, match="enable must be a bool"):
        ckpt.set_grad_checkpointing(1)  # type: ignore[arg-type]
    # and the memory: the checkpointed backbone keeps about one map per block
    assert saved_bytes(lambda: ckpt.backbone(x)) < 0.3 * saved_bytes(lambda: net.backbone(x))


class _NHWCList(nn.Module):
    """timm's features_only Swin: a list of (B, H, W, C) features and ``output_fmt``, a str
    enum (timm's ``Format``) or plain string."""

    def __init__(self, output_fmt: object = "NHWC", declare: bool = True) -> None:
        super().__init__()
        self.layer3 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.layer4 = nn.Conv2d(6, 8, 3, padding=1)
        self.output_fmt = output_fmt
        if declare:
            self.feature_info = types.SimpleNamespace(channels=lambda: [6, 8])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c3 = self.layer3(x)
        c4 = self.layer4(c3)
        return [c3.permute(0, 2, 3, 1), c4.permute(0, 2, 3, 1)]


class _Format(str, enum.Enum):  # the shape of timm.layers.Format
    NCHW = "NCHW"
    NHWC = "NHWC"
    NLC = "NLC"


@pytest.mark.parametrize("fmt", ["NHWC", _Format.NHWC])
@pytest.mark.parametrize("declare", [True, False])
def test_an_nhwc_backbone_is_permuted_to_the_heads_layout(fmt: object, declare: bool) -> None:
    """The same network as on the NCHW features the backbone computes inside, to rounding."""
    torch.manual_seed(0)
    backbone = _NHWCList(fmt, declare)
    net = GALDNet(CLASSES, backbone=backbone, head={"channels": 16}).eval()
    assert net.in_channels == (6, 8) and net.nhwc_features and "nhwc_features=True" in repr(net)

    class NCHW(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = backbone

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            return [f.permute(0, 3, 1, 2) for f in self.inner(x)]

    ref = GALDNet(CLASSES, backbone=NCHW(), head=net.head, aux=net.aux_head).eval()
    x = torch.randn(2, 3, 21, 19)
    got, want = net(x), ref(x)
    for key in ("out", "aux"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    net.train()(x)["out"].sum().backward()  # gradients flow through the permute
    assert backbone.layer3.weight.grad is not None


def test_a_backbone_of_token_features_or_an_undeclared_nhwc_layout_is_named() -> None:
    with pytest.raises(ValueError, match=r"output_fmt='NLC'.*'NCHW' or 'NHWC'"):
        GALDNet(CLASSES, backbone=_NHWCList(_Format.NLC), head={"channels": 16})
    # channels-last features without the attribute: widths declared, the layout is not
    backbone = _NHWCList("NCHW")
    net = GALDNet(CLASSES, backbone=backbone, head={"channels": 16}).eval()
    assert not net.nhwc_features
    with pytest.raises(ValueError, match=r"\(B, H, W, C\) with C=6 it seems.*output_fmt"):
        net(torch.randn(1, 3, 16, 16))


def test_undeclared_nhwc_features_found_by_the_dry_run() -> None:
    # no declared widths: the dry run reads dimension 1, which is the height here; a 64x64
    # probe alone would read (32, 32) as widths and build heads for them
    backbone = _NHWCList("NCHW", declare=False)
    del backbone.output_fmt
    with pytest.raises(
        ValueError,
        match=r"dimension 1 of the backbone's features follows the input height \(\(32, 32\) at "
        r"64x64, \(64, 64\) at 128x64\).*output_fmt = 'NHWC'.*in_channels=\(c3, c4\)",
    ):
        GALDNet(CLASSES, backbone=backbone, head={"channels": 16})
    # the usual NCHW backbone: the second probe agrees
    assert GALDNet(CLASSES, backbone=_NHWCList("NHWC", declare=False)).in_channels == (6, 8)
