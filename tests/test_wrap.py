"""Wrapping real-shaped context modules: width-changing GA, gald.wrap, identity init, fuse."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import _standins as si
import gald
import gald.testing
from _helpers import randomise
from gald import _wrap


def _small_deeplab() -> si.SegModel:
    """torchvision-shaped DeepLabV3 with a narrow head (ASPP 64 -> 32 with a pooling branch)."""
    head = nn.Sequential(
        si.ASPP(64, (2, 4, 6), out_channels=32), *si._cbr(32, 32), nn.Conv2d(32, 5, 1)
    )
    return si.SegModel(si.TinyBackbone(c3=32, c4=64, width=8), head, None)


def test_wrap_aspp_in_sequential_index_path() -> None:
    model = _small_deeplab()
    aspp = model.classifier[0]
    assert gald.wrap(model, "classifier.0") is model
    block = model.classifier[0]
    assert isinstance(block, gald.GALD) and block.ga is aspp
    assert (block.in_channels, block.out_channels) == (64, 32)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    out = model(x)["out"]
    out.square().mean().backward()
    assert out.shape == (2, 5, 32, 32)
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x[:1])["out"]).all()


def test_wrap_psp_attribute_path_128_to_256() -> None:
    model = si.PSPNet("resnet34", encoder_weights=None, classes=3)
    psp = model.decoder.psp
    gald.wrap(model, "decoder.psp", ga_kwargs=None)
    block = model.decoder.psp
    assert block.ga is psp and (block.in_channels, block.out_channels) == (128, 256)
    model.train()
    model(torch.randn(2, 3, 48, 48)).sum().backward()
    assert block.ld is not None and block.ld.branch[0][0].weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 48, 48))
    assert out.shape == (1, 3, 48, 48) and torch.isfinite(out).all()


def test_wrap_full_width_aspp_2048_to_256() -> None:
    # torchvision's DeepLabV3 head widths: ASPP 2048 -> 256 at rates (12, 24, 36)
    head = nn.Sequential(si.ASPP(2048, (12, 24, 36), out_channels=256), nn.Conv2d(256, 3, 1))
    gald.wrap(head, "0")
    block = head[0]
    assert (block.in_channels, block.out_channels) == (2048, 256)
    x = torch.randn(2, 2048, 9, 9, requires_grad=True)
    head.train()
    head(x).square().mean().backward()
    assert x.grad is not None and block.ld is not None
    assert block.ld.branch[0][0].weight.grad is not None
    head.eval()
    with torch.no_grad():
        assert head(x[:1]).shape == (1, 3, 9, 9)


def test_gald_width_changing_registry_ga() -> None:
    block = gald.GALD(24, "aspp", out_channels=16, ga_kwargs={"rates": (1, 2), "inner_channels": 8})
    assert block.ga.out_channels == 16 and block.out_channels == 16
    y = block.eval()(torch.randn(1, 24, 18, 18))
    assert y.shape == (1, 16, 18, 18)


@given(cin=st.integers(1, 24), cout=st.integers(1, 24), downsample=st.booleans())
def test_width_property(cin: int, cout: int, downsample: bool) -> None:
    ga = nn.Conv2d(cin, cout, 1)
    block = gald.GALD(cin, ga, downsample=downsample).eval()
    assert block.out_channels == cout
    x = torch.randn(2, cin, 9, 7)
    assert block(x).shape == (2, cout, 9, 7)


@settings(max_examples=12, deadline=None)
@given(
    ga=st.sampled_from(["aspp", "psp"]),
    cin=st.integers(1, 20),
    cout=st.integers(1, 20),
    downsample=st.booleans(),
)
def test_width_changing_registry_ga_trains(ga: str, cin: int, cout: int, downsample: bool) -> None:
    # the registry's width-changing layers at random widths, train mode, forward and backward
    kwargs = {"rates": (1, 2), "inner_channels": 4} if ga == "aspp" else {"branch_channels": 4}
    block = gald.GALD(cin, ga, out_channels=cout, ga_kwargs=kwargs, downsample=downsample).train()
    assert block.out_channels == cout and block.ld is not None and block.ld.channels == cout
    x = torch.randn(2, cin, 11, 9, requires_grad=True)
    y = block(x)
    assert y.shape == (2, cout, 11, 9)
    y.square().mean().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    assert all(p.grad is not None for p in block.ld.parameters())


def test_identity_init_equals_original() -> None:
    model = randomise(_small_deeplab()).eval()
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        before = model(x)["out"]
    gald.wrap(model, "classifier.0", init="identity")
    block = model.classifier[0]
    assert block.down is None and block.alpha is not None
    with torch.no_grad():
        after = model(x)["out"]
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_identity_init_is_exact_where_the_ld_output_overflows_in_half_precision() -> None:
    conv = nn.Conv2d(4, 4, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
    conv = conv.half().eval()
    block = gald.GALD(4, conv, init="identity").eval()
    x = torch.full((1, 4, 8, 8), 30000.0, dtype=torch.float16)  # 3 * 30000 overflows float16
    with torch.no_grad():
        assert torch.isinf(block.ld(conv(x))).all()
        torch.testing.assert_close(block(x), conv(x), rtol=0, atol=0)


def test_identity_init_learns_the_ld() -> None:
    block = gald.GALD(8, nn.Conv2d(8, 8, 3, padding=1), init="identity").train()
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    x = torch.randn(2, 8, 12, 12)
    target = torch.randn(2, 8, 12, 12)
    for _ in range(2):
        opt.zero_grad()
        (block(x) - target).square().mean().backward()
        opt.step()
    assert block.alpha is not None and block.alpha.abs().sum() > 0
    # once alpha moved, the LD branch receives gradients
    opt.zero_grad()
    (block(x) - target).square().mean().backward()
    assert block.ld is not None and block.ld.branch[0][0].weight.grad.abs().sum() > 0


def test_fuse_folds_every_batchnorm_of_a_wrapped_model() -> None:
    model = randomise(_small_deeplab())
    gald.wrap(model, "classifier.0")
    model = randomise(model).double().eval()
    fused = gald.fuse(model)
    left = [n for n, m in fused.classifier.named_modules() if isinstance(m, _BatchNorm)]
    # torchvision's ASPPPooling is a Sequential with a forward of its own: left as it is
    assert left == ["0.ga.convs.4.2"]
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x)["out"], model(x)["out"], rtol=1e-9, atol=1e-9)


class _ResidualBeforeNorm(nn.Sequential):
    """conv, then bn, but forward adds the input before the norm: not a foldable chain."""

    def __init__(self, c: int) -> None:
        super().__init__(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self[1](self[0](x) + x)


class _PlainChain(nn.Sequential):
    """A Sequential subclass that keeps Sequential's forward: its pairs are folded."""


def test_fuse_leaves_a_sequential_with_its_own_forward() -> None:
    model = randomise(nn.Sequential(_ResidualBeforeNorm(8), _PlainChain(*_cbr_pair(8)))).eval()
    fused = gald.fuse(model)
    assert isinstance(fused[0][1], nn.BatchNorm2d)  # kept: folding it would change the output
    assert isinstance(fused[1][1], nn.Identity)  # folded
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x))


def _cbr_pair(c: int) -> tuple[nn.Module, nn.Module]:
    return nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)


def test_fuse_refuses_training_mode() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        gald.fuse(gald.GALD(16, "psp").train())


def test_failed_wrap_leaves_model_unchanged() -> None:
    model = _small_deeplab()
    before = copy.deepcopy(model.state_dict())
    tree = [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError, match="out_channels"):
        gald.wrap(model, "classifier.0", out_channels=17)
    with pytest.raises(KeyError, match="no submodule 'nope'"):
        gald.wrap(model, "classifier.nope")
    with pytest.raises(KeyError, match="has no submodule '9'"):
        gald.wrap(model, "classifier.9")
    assert [n for n, _ in model.named_modules()] == tree
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _NoChannels(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1, keepdim=True).expand(-1, 7, -1, -1)


class _Crashes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def test_errors_name_argument_expected_and_received() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), _NoChannels())
    with pytest.raises(ValueError, match="input channels of _NoChannels.*pass in_channels"):
        gald.wrap(model, "1")
    gald.wrap(model, "1", in_channels=8)  # the dry run finds 7 output channels
    assert model[1].out_channels == 7
    with pytest.raises(ValueError, match=r"_Crashes refuses a \(1, 8, s, s\).*boom.*in_channels=8"):
        gald.GALD(8, _Crashes())
    with pytest.raises(
        ValueError,
        match="in_channels=32 does not match the wrapped Conv2d, which declares in_channels=64",
    ):
        gald.GALD(32, nn.Conv2d(64, 16, 1))
    # a wrong in_channels is caught at construction
    aspp_like = nn.Sequential(nn.Conv2d(256, 64, 1), nn.BatchNorm2d(64), nn.ReLU())
    with pytest.raises(ValueError, match=r"Sequential refuses a \(1, 128, s, s\).*in_channels=128"):
        gald.GALD(128, aspp_like)
    with pytest.raises(ValueError, match="out_channels=32 does not match the wrapped Sequential"):
        gald.GALD(256, aspp_like, out_channels=32, downsample=False)
    # with out_channels given, a module that refuses the small probes is still wrapped (it may
    # need larger inputs); its first forward reports what is wrong
    block = gald.GALD(8, _Crashes(), out_channels=8)
    with pytest.raises(RuntimeError, match="boom"):
        block(torch.randn(1, 8, 9, 9))
    with pytest.raises(ValueError, match="leads to a Parameter, not an nn.Module"):
        gald.wrap(nn.BatchNorm2d(3), "weight")
    with pytest.raises(ValueError, match="dotted path"):
        gald.wrap(model, "a..b")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        gald.wrap("model", "a")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already a GALD"):
        gald.wrap(model, "1")
    with pytest.raises(ValueError, match=r"'1.ga' is inside the GALD block '1'; .* wrapped once"):
        gald.wrap(model, "1.ga")
    with pytest.raises(ValueError, match=r"'ga' is inside the GALD block \(the model itself\)"):
        gald.wrap(model[1], "ga")
    with pytest.raises(ValueError, match=r"'0.ga.t' is inside the GALD block '0'"):
        gald.wrap(nn.Sequential(gald.GALD(16, "cgnl")), "0.ga.t")
    with pytest.raises(ValueError, match="in_channels must be >= 1, got 0"):
        gald.GALD(0, "psp")
    with pytest.raises(ValueError, match="out_channels must be >= 1, got -2"):
        gald.GALD(8, "psp", out_channels=-2)
    with pytest.raises(ValueError, match="'gc'.*has no out_channels"):
        gald.GALD(8, "gc", out_channels=4)


def test_wrong_width_at_forward_names_the_module() -> None:
    conv = nn.Conv2d(8, 8, 1)
    block = gald.GALD(8, conv, out_channels=8)
    block.ga = nn.Conv2d(8, 5, 1)  # edited after construction
    with pytest.raises(
        ValueError, match=r"GA Conv2d must return \(B, 8, 4, 4\).*got \(1, 5, 4, 4\)"
    ):
        block(torch.randn(1, 8, 8, 8))


class _To32(nn.Module):
    """A user's context module that changes the width without an out_channels argument."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, 32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def test_users_class_that_changes_the_width() -> None:
    block = gald.GALD(64, _To32)  # built as _To32(64); the dry run finds 32
    assert block.out_channels == 32 and block.ld is not None and block.ld.channels == 32
    assert block(torch.randn(2, 64, 17, 17)).shape == (2, 32, 17, 17)
    assert gald.GALD(64, _To32, out_channels=32).out_channels == 32
    with pytest.raises(
        ValueError, match=r"out_channels=16 does not match the GA '_To32'.*returns 32"
    ):
        gald.GALD(64, _To32, out_channels=16)
    # a head keeps its width: said at construction, not at the first forward
    with pytest.raises(ValueError, match="keep the width channels=48, got a GA returning 32"):
        gald.GALDHead(64, 3, channels=48, ga_module=_To32)


def test_dry_run_restores_every_submodule_mode() -> None:
    # a frozen (eval-mode) norm inside a module in training mode stays frozen
    module = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU()).train()
    module[1].eval()
    gald.GALD(8, module)
    assert module.training and module[0].training and not module[1].training


def test_wrong_input_width_at_forward_names_the_module() -> None:
    block = gald.GALD(8, nn.Conv2d(8, 4, 1))
    with pytest.raises(ValueError, match=r"GALD\(Conv2d\): x must have 8 channels.*\(1, 6, 9, 9\)"):
        block(torch.randn(1, 6, 9, 9))


def test_default_ga_width_error_names_user_argument() -> None:
    # CGNL with 8 groups takes multiples of 16; the message lists the widths it accepts
    with pytest.raises(ValueError, match=r"in_channels=40.*accepts: 16, 32, 48, 64, \.\.\."):
        gald.GALD(40)
    # inside a head the user's argument is `channels`
    with pytest.raises(ValueError, match=r"GALDHead\(channels=40\).*accepts: 16, 32"):
        gald.GALDHead(64, 5, channels=40)


def test_ld_false_with_norm_layer_and_head_ablation() -> None:
    block = gald.GALD(16, "psp", ld=False, norm_layer=nn.SyncBatchNorm)
    assert block.ld is None
    head = gald.GALDHead(32, 4, channels=16, ga_module="psp", ld=False).eval()
    assert head.gald.ld is None and head(torch.randn(1, 32, 9, 9)).shape == (1, 4, 9, 9)
    with pytest.raises(ValueError, match=r"LD arguments \['final_act'\] given with ld=False"):
        gald.GALD(16, "psp", ld=False, final_act=False)


@pytest.mark.parametrize("ga", gald.list_ga())
def test_syncbn_reaches_every_layer(ga: str) -> None:
    head = gald.GALDHead(32, 3, channels=32, ga_module=ga, norm_layer=nn.SyncBatchNorm)
    plain = [n for n, m in head.named_modules() if type(m) is nn.BatchNorm2d]
    assert plain == []
    assert any(isinstance(m, nn.SyncBatchNorm) for m in head.gald.modules())


def test_act_layer_reaches_down_ld_and_head() -> None:
    head = gald.GALDHead(16, 3, channels=16, ga_module="psp", act_layer=nn.GELU)
    acts = {type(m) for m in head.modules() if isinstance(m, (nn.ReLU, nn.GELU))}
    assert acts == {nn.GELU}


class _NeedsFive(nn.Module):
    min_size = 5

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(self.conv(x), (2, 2, 2, 2))


@pytest.mark.parametrize(
    ("downsample", "padding", "expected"), [(True, 1, 9), (True, 0, 11), (False, 1, 5)]
)
def test_min_size_includes_the_ga_declared_minimum(
    downsample: bool, padding: int, expected: int
) -> None:
    block = gald.GALD(4, _NeedsFive, downsample=downsample, padding=padding, ld=False).eval()
    assert block.min_size == expected
    assert block(torch.randn(1, 4, expected, expected)).shape[-1] == expected
    with pytest.raises(ValueError, match=f">= {expected}"):
        block(torch.randn(1, 4, expected - 1, expected))


def test_out_channels_inferred_on_the_meta_device() -> None:
    with torch.device("meta"):
        block = gald.GALD(16, nn.Conv2d(16, 8, 1))
    assert block.out_channels == 8
    assert all(p.device.type == "meta" for p in block.parameters())


def test_wrap_edge_cases_of_real_modules() -> None:
    # a meta-device model, identity init: every new part lands on meta too
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Sequential(nn.Conv2d(8, 16, 3, padding=1)))
    gald.wrap(model, "1", init="identity")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    # a half-precision module: GALD around it joins its dtype, and runs
    half = nn.Conv2d(8, 8, 1).to(torch.bfloat16)
    block = gald.GALD(8, half).eval()
    assert {p.dtype for p in block.parameters()} == {torch.bfloat16}
    assert block(torch.randn(1, 8, 9, 9, dtype=torch.bfloat16)).dtype == torch.bfloat16
    # a frozen norm inside the wrapped module stays frozen after wrap
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)))
    model.train()
    model[1][1].eval()
    gald.wrap(model, "1")
    assert model.training and model[1].ga.training and not model[1].ga[1].training
    # a scripted module: its input width read from the scripted Conv2d
    model = nn.Sequential(nn.Conv2d(3, 8, 1), torch.jit.script(nn.Sequential(nn.Conv2d(8, 4, 1))))
    assert gald.wrap(model, "1")[1].in_channels == 8
    with pytest.raises(ValueError, match=r"got '' \(the model itself.*gald.GALD\(in_channels"):
        gald.wrap(model, "")


class _ChannelsIsTheOutput(nn.Module):
    """Records its output width as `channels` (as some pooling modules do)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.channels = cout
        self.proj = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class _TupleOut(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


def test_dry_run_outranks_attributes_and_types_fail_at_construction() -> None:
    # the module runs with 32 channels: its `channels` attribute is not its input width
    model = nn.Sequential(nn.Conv2d(3, 32, 1), _ChannelsIsTheOutput(32, 16))
    gald.wrap(model, "1", in_channels=32)
    assert model[1].out_channels == 16
    # a tuple output is refused at construction, even with out_channels given
    with pytest.raises(
        TypeError, match="_TupleOut must return a \\(B, C, H, W\\) tensor.*got tuple"
    ):
        gald.GALD(8, _TupleOut(), out_channels=8)


class _ParameterFree(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x.mean((2, 3), keepdim=True))


def test_wrap_of_a_parameter_free_module_joins_the_model() -> None:
    # nothing in the module says where it lives: the new parts take the model's dtype
    model = nn.Sequential(nn.Conv2d(3, 8, 1), _ParameterFree(), nn.Conv2d(8, 2, 1)).double()
    gald.wrap(model, "1", in_channels=8)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model(torch.randn(1, 3, 12, 13, dtype=torch.float64)).dtype == torch.float64


class _ProjectionFirst(nn.Module):
    """Registers a 32 -> 16 conv before the 64 -> 32 conv it runs first."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(32, 16, 1)
        self.inp = nn.Conv2d(64, 32, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.inp(x))


def test_an_inferred_width_is_named_as_inferred() -> None:
    model = nn.Sequential(_ProjectionFirst())
    with pytest.raises(
        ValueError,
        match=r"in_channels=32 was inferred from its first registered Conv2d 'proj'.*"
        r"wrap\(\.\.\., in_channels=\.\.\.\)",
    ) as info:
        gald.wrap(model, "0")
    assert type(info.value) is ValueError and isinstance(model[0], _ProjectionFirst)
    assert gald.wrap(model, "0", in_channels=64)[0].out_channels == 16


def test_a_wrong_out_channels_is_not_blamed_on_the_inferred_in_channels() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 16, 1))
    with pytest.raises(ValueError, match=r"^out_channels=4 does not match") as info:
        gald.wrap(model, "1", out_channels=4)
    assert "was inferred" not in str(info.value) and isinstance(model[1], nn.Conv2d)


def test_a_lazy_conv_not_run_yet_is_named() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Sequential(nn.LazyConv2d(8, 1), nn.ReLU()))
    with pytest.raises(ValueError, match=r"'0' is a lazy module not run yet; run the model once"):
        gald.wrap(model, "1")
    bare = nn.Sequential(nn.Conv2d(3, 8, 1), nn.LazyConv2d(8, 1))
    with pytest.raises(ValueError, match=r"of LazyConv2d: it is a lazy module not run yet"):
        gald.wrap(bare, "1")
    model(torch.randn(1, 3, 8, 8))  # the lazy conv learns its width
    assert gald.wrap(model, "1")[1].in_channels == 8


def test_out_channels_given_once_and_kept() -> None:
    with pytest.raises(ValueError, match=r"out_channels is given twice: out_channels=64 and"):
        gald.GALD(64, "psp", out_channels=64, ga_kwargs={"out_channels": 32})
    assert gald.GALD(64, "psp", ga_kwargs={"out_channels": 32}).out_channels == 32
    with pytest.raises(ValueError, match=r"LD arguments \['impl'\] given with ld=False"):
        gald.GALD(16, "gc", ld=False, impl="torch")
    with pytest.raises(TypeError, match="enable must be a bool, got int"):
        gald.GALD(16, "gc", ld=False).set_grad_checkpointing(1)  # type: ignore[arg-type]


def test_a_module_that_changes_the_spatial_size_is_refused_at_construction() -> None:
    with pytest.raises(
        ValueError,
        match=r"Conv2d does not keep the height and width of its input "
        r"\(16x16 -> 14x14, 33x33 -> 31x31, 65x65 -> 63x63\)",
    ):
        gald.GALD(16, nn.Conv2d(16, 8, 3))  # no padding
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.Conv2d(16, 16, 3, stride=2, padding=1))
    with pytest.raises(ValueError, match="does not keep the height and width") as info:
        gald.wrap(model, "1")
    assert "inferred" not in str(info.value)
    # it ran at every probe and halved each: passing out_channels would not help
    assert "downsamples every input" in str(info.value)
    assert "pass out_channels" not in str(info.value)
    assert type(model[1]) is nn.Conv2d


class _KeepsOnlyLargeInputs(nn.Module):
    """Keeps H x W from 33 x 33 up (crops small inputs), as some encoder-decoders do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y[..., :-1, :-1] if x.shape[-1] < 33 else y


class _KeepsNoProbe(_KeepsOnlyLargeInputs):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if x.shape[-1] % 32 == 0 else self.conv(x)[..., :-1, :-1]


def test_a_module_that_keeps_the_size_at_some_probe_is_accepted() -> None:
    block = gald.GALD(8, _KeepsOnlyLargeInputs(), downsample=False)
    assert block.out_channels == 8
    assert block(torch.randn(1, 8, 40, 40)).shape == (1, 8, 40, 40)
    # keeps it only at multiples of 32: refused by the dry run, accepted with out_channels
    with pytest.raises(ValueError, match="pass out_channels"):
        gald.GALD(8, _KeepsNoProbe(), downsample=False)
    block = gald.GALD(8, _KeepsNoProbe(), out_channels=8, downsample=False)
    assert block(torch.randn(1, 8, 64, 64)).shape == (1, 8, 64, 64)


def test_a_state_dict_saved_before_wrapping_loads_after_it() -> None:
    model = randomise(_small_deeplab()).eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)["out"]
    fresh = _small_deeplab()
    gald.wrap(fresh, "classifier.0", init="identity")
    result = fresh.load_state_dict(before, strict=False)
    assert result.unexpected_keys == []
    new_parts = ("classifier.0.down.", "classifier.0.ld.", "classifier.0.alpha")
    assert result.missing_keys and all(k.startswith(new_parts) for k in result.missing_keys)
    for key, value in before.items():  # every old key landed, in its wrapped place
        wrapped = key.replace("classifier.0.", "classifier.0.ga.", 1)
        torch.testing.assert_close(fresh.state_dict()[wrapped], value, msg=key)
    with torch.no_grad():  # identity start: the pretrained output, exactly
        torch.testing.assert_close(fresh.eval()(x)["out"], expected)
    # a state dict of the wrapped model round-trips strictly, untouched by the hook
    again = _small_deeplab()
    gald.wrap(again, "classifier.0", init="identity")
    again.load_state_dict(fresh.state_dict(), strict=True)


class _HasDown(nn.Module):
    """A context module with a child named like a part of the block (``down``)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16))
        self.proj = nn.Conv2d(16, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.down(x))


def test_an_unwrapped_key_named_like_a_block_part_goes_to_the_ga() -> None:
    before = randomise(nn.Sequential(nn.Conv2d(3, 16, 1), _HasDown())).state_dict()
    model = nn.Sequential(nn.Conv2d(3, 16, 1), _HasDown())
    gald.wrap(model, "1")
    own_down = model[1].down[0].weight.detach().clone()
    result = model.load_state_dict(before, strict=False)
    assert result.unexpected_keys == []
    assert all(k.startswith(("1.down.", "1.ld.")) for k in result.missing_keys)
    torch.testing.assert_close(model[1].ga.down[0].weight, before["1.down.0.weight"])
    torch.testing.assert_close(model[1].down[0].weight, own_down)  # the block's own: untouched


class _HasGA(nn.Module):
    """A context module with a child named like the block's ``ga``."""

    def __init__(self) -> None:
        super().__init__()
        self.ga = nn.Conv2d(16, 16, 3, padding=1)
        self.proj = nn.Conv2d(16, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.ga(x))


def test_an_unwrapped_module_with_a_child_named_ga_loads() -> None:
    pretrained = randomise(nn.Sequential(nn.Conv2d(3, 16, 1), _HasGA())).eval()
    before = copy.deepcopy(pretrained.state_dict())
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        expected = pretrained(x)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), _HasGA())
    gald.wrap(model, "1", init="identity")
    result = model.eval().load_state_dict(before, strict=False)
    assert result.unexpected_keys == []
    assert all(k.startswith(("1.ld.", "1.alpha")) for k in result.missing_keys)
    torch.testing.assert_close(model[1].ga.ga.weight, before["1.ga.weight"])
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    # and the wrapped model's own state dict round-trips strictly, untouched by the hook
    again = nn.Sequential(nn.Conv2d(3, 16, 1), _HasGA())
    gald.wrap(again, "1", init="identity")
    again.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(again[1].ga.ga.weight, before["1.ga.weight"])


def test_a_shared_module_is_refused_naming_every_path() -> None:
    conv = nn.Conv2d(8, 8, 1)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), conv, conv)
    for path, other in (("1", "2"), ("2", "1")):
        with pytest.raises(ValueError, match=rf"'{path}' is a module shared with \['{other}'\]"):
            gald.wrap(model, path)
    assert model[1] is conv and model[2] is conv  # unchanged


class _DefaultWidth(nn.Module):
    """A torchvision-like context module whose ``out_channels`` defaults to another width."""

    def __init__(self, in_channels: int, out_channels: int = 24) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_an_explicit_out_channels_reaches_the_class_even_when_it_keeps_the_width() -> None:
    for width in (16, 8):
        block = gald.GALD(16, _DefaultWidth, out_channels=width)
        assert block.ga.conv.out_channels == width and block.out_channels == width
    assert gald.GALD(16, _DefaultWidth).out_channels == 24  # the class's own default


class _OptionalNorm(nn.Module):
    """timm's convention: ``norm_layer=None`` / ``act_layer=None`` build no norm / act."""

    def __init__(
        self,
        channels: int,
        norm_layer: type[nn.Module] | None = None,
        act_layer: type[nn.Module] | None = None,
        gate_layer: type[nn.Module] = nn.Sigmoid,
    ) -> None:
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1)
        self.bn = norm_layer(channels) if norm_layer is not None else nn.Identity()
        self.act = act_layer() if act_layer is not None else nn.Identity()
        self.gate = gate_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.act(self.bn(self.fc(x.mean((2, 3), keepdim=True)))))


class _DefaultNorm(_OptionalNorm):
    def __init__(self, channels: int, norm_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__(channels, norm_layer=norm_layer)


def test_a_class_whose_norm_defaults_to_none_gets_none() -> None:
    for kwargs in ({}, {"norm_layer": nn.SyncBatchNorm, "act_layer": nn.GELU}):
        block = gald.GALD(16, _OptionalNorm, **kwargs)  # type: ignore[arg-type]
        assert isinstance(block.ga.bn, nn.Identity) and isinstance(block.ga.act, nn.Identity)
        block.train()(torch.randn(1, 16, 32, 32))  # no norm over a 1x1 map of one sample
    # asked for through the GA's own arguments, it is built
    block = gald.GALD(16, _OptionalNorm, ga_kwargs={"norm_layer": nn.BatchNorm2d})
    assert isinstance(block.ga.bn, nn.BatchNorm2d)
    # a class with a norm by default takes the block's
    block = gald.GALD(16, _DefaultNorm, norm_layer=nn.SyncBatchNorm)
    assert isinstance(block.ga.bn, nn.SyncBatchNorm)


class _PoolPyramid(nn.Module):
    """A context module without a declared minimum that fails below ``2 ** levels`` (three
    max-pools of stride 2 before an upsampling, as in a feature pyramid attention block)."""

    def __init__(self, channels: int, levels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = x
        for _ in range(self.levels):
            p = nn.functional.max_pool2d(p, 2)
        return self.conv(x) + nn.functional.interpolate(p, size=x.shape[-2:])


class _EvenSidesOnly(nn.Module):
    """Runs on even sides only: the smallest side found must not be above one that works."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            raise RuntimeError("odd side")
        return x * 2


@pytest.mark.parametrize(
    ("levels", "downsample", "padding", "expected"),
    [(3, True, 1, 15), (3, True, 0, 17), (3, False, 1, 8), (2, True, 1, 7), (0, True, 1, 1)],
)
def test_the_smallest_side_of_a_users_module_is_found(
    levels: int, downsample: bool, padding: int, expected: int
) -> None:
    """Instance and class alike: the block refuses, naming the module, exactly the inputs the
    module itself cannot take (checked one side below and at the minimum)."""
    kw = {"downsample": downsample, "padding": padding, "ld": False}
    for block in (
        gald.GALD(6, _PoolPyramid(6, levels), **kw),
        gald.GALD(6, _PoolPyramid, ga_kwargs={"levels": levels}, **kw),
    ):
        block.eval()
        assert block.min_size == expected
        assert block(torch.randn(1, 6, expected, expected + 3)).shape[-2] == expected
        if expected > 1:
            with pytest.raises(ValueError, match="_PoolPyramid refused inputs smaller than"):
                block(torch.randn(1, 6, expected - 1, 40))
            # the same input without the block's check fails inside the module
            d = block.down(torch.randn(1, 6, expected - 1, 40)) if downsample else None
            with pytest.raises(RuntimeError):
                block.ga(d if d is not None else torch.randn(1, 6, expected - 1, 40))


def test_the_smallest_side_never_refuses_a_side_that_works() -> None:
    block = gald.GALD(3, _EvenSidesOnly(), downsample=False, ld=False, out_channels=3)
    assert block.min_size == 2
    assert block(torch.randn(1, 3, 2, 2)).shape == (1, 3, 2, 2)


def test_a_module_refusing_every_probe_keeps_min_size_one() -> None:
    """A module taken at a given out_channels without a dry run is not probed further."""

    class Refuses(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("runs on another device only")

    assert gald.GALD(3, Refuses(), out_channels=3, ld=False).min_size == 1


def test_a_module_reached_but_not_registered_at_the_path_names_its_path() -> None:
    class Ctx(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    class ByProperty(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Conv2d(3, 8, 1), Ctx()])

        @property
        def ctx(self) -> nn.Module:
            return self.layers[1]

    model = ByProperty()
    with pytest.raises(KeyError, match=r"through the attribute 'ctx'.*registered at 'layers.1'"):
        gald.wrap(model, "ctx")
    assert isinstance(model.layers[1], Ctx)
    compiled = torch.compile(nn.Sequential(nn.Conv2d(3, 8, 1), Ctx()), backend="eager")
    with pytest.raises(KeyError, match=r"registered at '_orig_mod.1'"):
        gald.wrap(compiled, "1")
    gald.wrap(compiled, "_orig_mod.1")
    assert isinstance(compiled._orig_mod[1], gald.GALD)


@pytest.mark.parametrize(
    "bad",
    [{"num_stages": 0}, {"offset": float("nan")}, {"kernel_size": 0}, {"final_act": 1}],
)
def test_bad_ld_arguments_are_refused_before_the_module_runs(bad: dict) -> None:
    class Counts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 1)
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.conv(x)

    model = nn.Sequential(Counts())
    with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
        gald.wrap(model, "0", **bad)
    assert model[0].calls.item() == 0 and isinstance(model[0], Counts)


def test_the_small_input_advice_names_what_sets_the_limit() -> None:
    class NeedsThree(nn.Module):  # takes sides >= 3 (reflect padding), keeps them
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(nn.functional.pad(x, (2, 2, 2, 2), mode="reflect"))

    block = gald.GALD(8, NeedsThree(), padding=0).eval()  # the LD's padding-0 branch binds
    assert block.min_size == block.ld.min_size == 15
    with pytest.raises(ValueError, match=r"use padding=1"):
        block(torch.randn(1, 8, 14, 14))
    block = gald.GALD(8, NeedsThree(), padding=1, ld=False).eval()  # the module binds
    assert block.min_size == 5
    with pytest.raises(ValueError, match=r"NeedsThree refused inputs smaller than 3x3"):
        block(torch.randn(1, 8, 4, 4))


class _ListDecoder(nn.Module):
    """Takes a list of features, as segmentation-models-pytorch's decoders do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(32, 16, 3, padding=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.conv(features[-1])


class _DictHead(_ListDecoder):
    """Takes a dict of backbone features, as torchvision's LRASPPHead does."""

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        return self.conv(features["high"])


class _StarDecoder(_ListDecoder):
    def forward(self, *features: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        low, high = features  # two levels, 16 channels each
        return self.conv(torch.cat([low, high], 1))


def test_modules_that_are_not_context_modules_are_named_as_such() -> None:
    # a segmentation head that upsamples: out_channels would not help, so it is not advised
    model = nn.Sequential(nn.Conv2d(8, 3, 1), nn.UpsamplingBilinear2d(scale_factor=8))
    with pytest.raises(ValueError, match="upsamples every input it was given") as info:
        gald.wrap(nn.Sequential(model), "0")
    assert "pass out_channels" not in str(info.value)
    # a decoder over a list of features: the signature is named, the width is not blamed
    for decoder, signature in (
        (_ListDecoder(), r"features: list\[torch.Tensor\]"),
        (_StarDecoder(), r"\*features"),
        (_DictHead(), r"features: dict\[str, torch.Tensor\] \(a dict of features"),
    ):
        holder = nn.Sequential(decoder)
        with pytest.raises(ValueError, match=f"its forward takes {signature}") as info:
            gald.wrap(holder, "0")
        assert "inferred" not in str(info.value) and "check in_channels" not in str(info.value)
        assert holder[0] is decoder
        with pytest.raises(ValueError, match=f"its forward takes {signature}"):
            gald.wrap(holder, "0", out_channels=16)  # no width makes it take one tensor
        assert holder[0] is decoder


def test_a_norm_layer_for_another_layout_is_refused_by_name() -> None:
    with pytest.raises(
        ValueError,
        match=r"norm_layer=<class 'torch.nn.modules.normalization.LayerNorm'> builds "
        r"LayerNorm\(\(16,\).*cannot normalise a \(B, C, H, W\) feature map",
    ):
        gald.GALD(16, "gc", norm_layer=nn.LayerNorm)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.Conv2d(16, 16, 3, padding=1))
    with pytest.raises(ValueError, match="norm_layer="):
        gald.wrap(model, "1", norm_layer=nn.LayerNorm)
    assert type(model[1]) is nn.Conv2d
    # channels-first norms pass: SyncBatchNorm runs its eval path without a process group
    assert gald.GALD(16, "gc", norm_layer=nn.SyncBatchNorm).out_channels == 16


class _PassThrough(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        return self.inner(*args, **kwargs)


def test_advice_for_wrappers_and_slightly_larger_outputs() -> None:
    # a pass-through wrapper takes one tensor: a wrong width is still blamed on in_channels
    with pytest.raises(ValueError, match=r"check in_channels=32") as info:
        gald.GALD(32, _PassThrough(nn.Conv2d(64, 64, 3, padding=1)))
    assert "list of features" not in str(info.value)
    # two pixels more is not a segmentation head
    with pytest.raises(ValueError, match="does not keep the height and width") as info:
        gald.GALD(16, nn.Conv2d(16, 16, 3, padding=2))
    assert "upsamples every input" not in str(info.value)


def test_norm_factories_that_set_a_device_or_dtype_are_probed_there() -> None:
    block = gald.GALD(16, "gc", norm_layer=partial(nn.BatchNorm2d, dtype=torch.float64))
    assert block.down is not None and block.down[1].weight.dtype == torch.float64
    block = gald.GALD(16, "gc", norm_layer=partial(nn.BatchNorm2d, device="meta"))
    assert block.down is not None and block.down[1].weight.is_meta


def test_wrapping_an_eval_model_keeps_it_in_eval_mode() -> None:
    """A pretrained model is often wrapped after .eval(): the new block's norms must not then
    normalise with batch statistics (and move their running statistics)."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)),
        nn.Conv2d(8, 2, 1),
    ).eval()
    gald.wrap(model, "1")
    assert not any(m.training for m in model.modules())
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model(torch.randn(2, 3, 17, 17))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


class FakeDDP(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


def test_refuse_distributed_matches_whole_path_components(monkeypatch):
    """With a DDP part at index '1', wrapping the sibling '10' is allowed (a plain string
    prefix test would refuse it as if it were inside '1')."""
    monkeypatch.setattr(_wrap, "_distributed_wrappers", lambda: (FakeDDP,))
    layers = [nn.Conv2d(8, 8, 1) for _ in range(11)]
    layers[1] = FakeDDP(nn.Conv2d(8, 8, 1))
    model = nn.Sequential(*layers)
    gald.wrap(model, "10")
    assert isinstance(model[10], gald.GALD)
    with pytest.raises(ValueError, match=r"'1' is a FakeDDP"):
        gald.wrap(model, "1.module")


class _CountingBackend:
    """A torch.compile backend that records the input shapes of every graph it is given."""

    def __init__(self) -> None:
        self.graphs: list[list[object]] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[object]) -> object:
        self.graphs.append(
            [tuple(t.shape) if isinstance(t, torch.Tensor) else t for t in example_inputs]
        )
        return gm.forward


def test_dry_runs_of_a_compiled_module_compile_nothing() -> None:
    """Reading a compiled module's width and smallest size runs it eagerly: no graph is compiled
    at construction, and the user's first compile sees only the user's own input (TorchDynamo
    would otherwise have marked height and width dynamic after the probes' sizes)."""
    backend = _CountingBackend()
    torch._dynamo.reset()
    context = torch.compile(
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        backend=backend,
    )
    block = gald.GALD(8, context)
    assert backend.graphs == []
    assert block.ga is context
    model = nn.Sequential(nn.Conv2d(3, 8, 1), context)
    gald.wrap(model, "1")
    assert backend.graphs == []
    x = torch.randn(2, 8, 20, 20)
    context(x)
    assert backend.graphs and all(isinstance(s, tuple) for s in backend.graphs[0])
    assert (2, 8, 20, 20) in backend.graphs[0]


def test_the_norm_probe_of_a_compiled_norm_compiles_nothing() -> None:
    """A norm factory that returns a compiled norm: the construction-time probe runs it eagerly,
    and the first forward compiles it."""
    backend = _CountingBackend()
    torch._dynamo.reset()
    ld = gald.LocalDistribution(
        8, norm_layer=lambda c: torch.compile(nn.BatchNorm2d(c), backend=backend)
    )
    assert backend.graphs == []
    ld.eval()(torch.randn(2, 8, 16, 16))
    assert backend.graphs
