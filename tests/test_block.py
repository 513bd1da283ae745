"""GALD block: composition semantics, GA resolution rules, ablation switches, errors."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import gald
from gald.testing import randomize_


def _randomise(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.BatchNorm2d, nn.GroupNorm)):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.5)
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m


class Scale(nn.Module):
    """A trivially checkable GA: multiplies by a learnable scalar."""

    def __init__(self, channels: int, factor: float = 3.0) -> None:
        super().__init__()
        self.channels = channels
        self.factor = nn.Parameter(torch.tensor(factor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("downsample", [True, False])
@pytest.mark.parametrize("ld", [True, False])
def test_composition(padding: int, downsample: bool, ld: bool) -> None:
    block = (
        _randomise(
            gald.GALD(
                8, "cgnl", ga_kwargs={"groups": 2}, padding=padding, downsample=downsample, ld=ld
            )
        )
        .double()
        .eval()
    )
    x = torch.randn(2, 8, 17, 19, dtype=torch.float64)
    if downsample:
        conv, bn = block.down[0], block.down[1]
        d = torch.relu(bn(F.conv2d(x, conv.weight, conv.bias, stride=2, padding=padding, groups=8)))
        y = F.interpolate(block.ga(d), size=(17, 19), mode="bilinear", align_corners=True)
    else:
        y = block.ga(x)
    expected = y * (2.0 + block.ld.mask(y)) if ld else y
    torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-12)


def test_offset_two_is_authors_double_residual() -> None:
    block = _randomise(gald.GALD(8, "cgnl", ga_kwargs={"groups": 2})).eval()
    x = torch.randn(1, 8, 16, 16)
    ga_only = gald.GALD(8, "cgnl", ga_kwargs={"groups": 2}, ld=False).eval()
    ga_only.load_state_dict(block.state_dict(), strict=False)
    y = ga_only(x)
    ld = block.ld
    authors = (y + y * ld.mask(y)) + y  # LocalAttenModule(y) + y
    torch.testing.assert_close(block(x), authors, rtol=1e-5, atol=1e-6)


def test_ga_module_forms() -> None:
    by_name = gald.GALD(8, "cgnl", ga_kwargs={"groups": 4})
    assert isinstance(by_name.ga, gald.ga.CGNL) and by_name.ga.groups == 4
    by_class = gald.GALD(8, gald.ga.CGNL, ga_kwargs={"groups": 2})
    assert isinstance(by_class.ga, gald.ga.CGNL) and by_class.ga.groups == 2
    inst = Scale(8)
    by_instance = gald.GALD(8, inst)
    assert by_instance.ga is inst
    custom = gald.GALD(8, Scale, ga_kwargs={"factor": 0.5}, downsample=False, ld=False)
    x = torch.randn(1, 8, 5, 5)
    torch.testing.assert_close(custom(x), 0.5 * x)
    # a keyword partial of a class is the class with those keywords (ga_kwargs override them),
    # and the block's norm still reaches it
    by_partial = gald.GALD(8, functools.partial(_NamesNorm), norm_layer=nn.SyncBatchNorm)
    assert isinstance(by_partial.ga.norm, nn.SyncBatchNorm)
    grouped = gald.GALD(8, functools.partial(gald.ga.CGNL, groups=4), ga_kwargs={"groups": 2})
    assert grouped.ga.groups == 2
    # any other callable in_channels -> module: built, and its width found by a dry run
    narrow = gald.GALD(8, lambda c: nn.Conv2d(c, 4, 1), ld=True)
    assert narrow.out_channels == 4 and narrow(torch.randn(2, 8, 9, 9)).shape == (2, 4, 9, 9)
    with pytest.raises(ValueError, match="out_channels is given twice"):
        gald.GALD(8, functools.partial(gald.ga.PyramidPooling, out_channels=4), out_channels=4)


class _ForwardsKwargs(nn.Module):
    """A user's GA that forwards ``**kwargs`` to its conv: GALD must not inject into it."""

    def __init__(self, channels: int, **kwargs: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, **kwargs)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _NamesNorm(nn.Module):
    def __init__(self, channels: int, norm_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.norm = norm_layer(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


def test_norm_and_act_reach_only_a_ga_that_names_them() -> None:
    block = gald.GALD(8, _ForwardsKwargs, norm_layer=nn.SyncBatchNorm, act_layer=nn.GELU)
    assert isinstance(block.ga, _ForwardsKwargs) and block.out_channels == 8
    named = gald.GALD(8, _NamesNorm, norm_layer=nn.SyncBatchNorm)
    assert isinstance(named.ga.norm, nn.SyncBatchNorm)
    kept = gald.GALD(
        8, _NamesNorm, norm_layer=nn.SyncBatchNorm, ga_kwargs={"norm_layer": nn.Identity}
    )
    assert isinstance(kept.ga.norm, nn.Identity)  # ga_kwargs wins


def test_a_failed_build_names_what_gald_passed() -> None:
    def broken_norm(channels: int) -> nn.Module:
        raise ValueError(f"no norm for {channels}")

    with pytest.raises(
        ValueError, match=r"ga_kwargs=\{\} \(GALD also passed norm_layer=broken_norm\)"
    ):  # no stage of GALD's own builds a norm here: the GA's failure is the one reported
        gald.GALD(8, _NamesNorm, norm_layer=broken_norm, ld=False, downsample=False)
    with pytest.raises(ValueError, match=r"norm_layer=.*broken_norm.* cannot build a 8-channel"):
        gald.GALD(8, _NamesNorm, norm_layer=broken_norm)  # GALD's own stages fail first


def test_ga_module_errors() -> None:
    with pytest.raises(ValueError, match="unknown GA module 'nope'"):
        gald.GALD(8, "nope")
    with pytest.raises(TypeError, match="ga_module must be"):
        gald.GALD(8, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ga_kwargs must be empty"):
        gald.GALD(8, Scale(8), ga_kwargs={"factor": 1.0})
    with pytest.raises(TypeError, match="ga_kwargs must be a mapping"):
        gald.GALD(8, "cgnl", ga_kwargs=[1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="given with ld=False"):
        gald.GALD(16, "cgnl", ld=False, final_act=False)


@given(b=st.integers(0, 3), h=st.integers(1, 40), w=st.integers(1, 40))
def test_shape_property(b: int, h: int, w: int) -> None:
    block = gald.GALD(16, "cgnl").eval()
    x = torch.randn(b, 16, h, w)
    assert block(x).shape == x.shape


@given(h=st.integers(5, 24), w=st.integers(5, 24))
def test_gradients_reach_every_parameter(h: int, w: int) -> None:
    block = gald.GALD(8, "cgnl", ga_kwargs={"groups": 2}, final_act=False).train()
    x = torch.randn(2, 8, h, w, requires_grad=True)
    block(x).square().sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_gradcheck() -> None:
    block = (
        _randomise(gald.GALD(4, "cgnl", ga_kwargs={"groups": 2}, final_act=False)).double().eval()
    )
    x = torch.randn(1, 4, 6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-5)


def test_padding0_minimum() -> None:
    block = gald.GALD(16, "cgnl", padding=0).eval()
    assert block.min_size == 15
    assert block(torch.randn(1, 16, 15, 15)).shape == (1, 16, 15, 15)
    with pytest.raises(ValueError, match=r"GALD\(CGNL\): x is too small.*>= 15"):
        block(torch.randn(1, 16, 15, 14))
    ga_only = gald.GALD(16, "cgnl", padding=0, ld=False)
    assert ga_only.min_size == 3


def test_bad_input() -> None:
    block = gald.GALD(16, "cgnl")
    with pytest.raises(ValueError, match=r"GALD\(CGNL\): x must have 16 channels"):
        block(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"4-D"):
        block(torch.randn(16, 8, 8))
    with pytest.raises(TypeError, match="floating"):
        block(torch.zeros(1, 16, 8, 8, dtype=torch.int32))


def test_padding_that_would_not_halve_the_map_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"^padding must be 0 \(the authors'\) or 1: .*got padding=2$"
    ):
        gald.GALD(16, "gc", padding=2)
    with pytest.raises(ValueError, match=r"padding must be at most kernel_size // 2 = 0"):
        gald.GALD(16, "gc", kernel_size=1, padding=1)  # the LD's own bound, named by the LD


def test_nan_propagates() -> None:
    block = gald.GALD(16, "cgnl").eval()
    x = torch.randn(1, 16, 12, 12)
    x[..., 0, 0] = float("nan")
    y = block(x)
    assert y.shape == x.shape and torch.isnan(y).any()


def test_too_small_message_suggests_padding_only_where_it_helps() -> None:
    x = torch.randn(1, 16, 5, 5)
    # padding 0, kernel 3: padding=1 accepts any size, and the message says so
    with pytest.raises(ValueError, match=r">= 15 for this configuration \(use padding=1"):
        gald.GALD(16, "gc", padding=0)(x)
    # kernel 5 needs 15 even with padding 1: no such advice
    with pytest.raises(ValueError, match=r">= 15 for this configuration, got shape") as err:
        gald.GALD(16, "gc", kernel_size=5)(x)
    assert "padding" not in str(err.value)
    with pytest.raises(ValueError, match=r"LocalDistribution: .*>= 15 for this configuration, got"):
        gald.LocalDistribution(16, kernel_size=5)(x)


def test_compile_fullgraph_with_dynamic_shapes() -> None:
    # dynamic=True traces the LD offset as a symbolic float: the checks must trace too (the GA
    # matters little here: each GA's export with dynamic shapes is tested in test_deploy.py)
    block = gald.GALD(16, "gc").eval()
    compiled = torch.compile(block, fullgraph=True, dynamic=True, backend="eager")
    for shape in ((2, 16, 19, 17), (1, 16, 23, 29)):
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), block(x))


def test_meta_build_then_reset_parameters_gives_the_initial_state() -> None:
    # the FSDP / large-model recipe: build on "meta", to_empty, reset_parameters everywhere
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 1))
        gald.wrap(model, "1", init="identity")
        others = [gald.create_ga(n, 16) for n in ("danet", "criss_cross", "ema")]
    model.to_empty(device="cpu")
    others = [m.to_empty(device="cpu") for m in others]
    for root in (model, *others):
        with torch.no_grad():  # to_empty leaves whatever the memory held: make that visible
            for t in (*root.parameters(), *root.buffers()):
                if t.is_floating_point():
                    t.fill_(math.nan)
        for m in root.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    block = model[1]
    assert block.alpha is not None and torch.equal(block.alpha, torch.zeros(16))
    x = torch.randn(2, 3, 9, 9)
    inner = model[1].ga
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), inner(model[0](x)))  # the identity start
    danet, criss_cross, ema = others
    gammas = [danet.pam.gamma, danet.cam.gamma, criss_cross.gamma]
    assert all(torch.equal(g, torch.zeros(1)) for g in gammas)
    norms = ema.bases.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_identity_init_blends_by_alpha_per_channel() -> None:
    # at alpha = 0 the blend drops out; with a random alpha the documented formula must hold:
    # out = y + alpha * (y * (offset + M(y)) - y), y = GA(x), written out by hand here
    torch.manual_seed(0)
    block = _randomise(gald.GALD(8, "gc", init="identity")).double().eval()
    with torch.no_grad():
        block.alpha.uniform_(-1.0, 2.0)
    x = torch.randn(2, 8, 11, 9, dtype=torch.float64)
    with torch.no_grad():
        y = block.ga(x)
        logits = block.ld.branch(y)
        mask = torch.sigmoid(
            F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=True)
        )
        ld = y * (block.ld.offset + mask)
        want = y + block.alpha.view(1, -1, 1, 1) * (ld - y)
        torch.testing.assert_close(block(x), want)


def test_a_factory_that_cannot_build_a_width_is_named_before_the_module_runs() -> None:
    from functools import partial

    calls: list[int] = []
    model = nn.Sequential(nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 1))
    model[1].register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=r"norm_layer=.*GroupNorm.*3\) cannot build a 16-channel"):
        gald.wrap(model, "1", norm_layer=partial(nn.GroupNorm, 3))
    with pytest.raises(TypeError, match=r"act_layer=.* must build an nn.Module .*returned int 5"):
        gald.wrap(model, "1", act_layer=lambda: 5)
    assert calls == [] and type(model[1]) is nn.Conv2d  # nothing ran, nothing replaced
    with pytest.raises(ValueError, match=r"cannot build the norm of a 16 -> 16 conv block"):
        gald.GALDHead(16, 3, channels=16, norm_layer=partial(nn.GroupNorm, 32))
    # the LD's width of a module instance is known only after the dry run: still named
    with pytest.raises(ValueError, match=r"cannot build the norm of the LD's 24-channel mask"):
        gald.GALD(16, nn.Conv2d(16, 24, 1), init="identity", norm_layer=partial(nn.GroupNorm, 16))


def test_the_factory_probe_does_not_guess_the_width_of_a_widening_ga() -> None:
    from functools import partial

    gn = partial(nn.GroupNorm, 16)  # takes 64 channels, not 40

    class Widen(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(channels, 64, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    for block in (
        gald.GALD(40, "aspp", ga_kwargs={"out_channels": 64}, downsample=False, norm_layer=gn),
        gald.GALD(40, Widen, downsample=False, norm_layer=gn),
    ):
        assert block.out_channels == 64
        assert block(torch.randn(1, 40, 17, 17)).shape == (1, 64, 17, 17)


@pytest.mark.parametrize("ga", gald.list_ga())
def test_torch_func_grad_through_every_ga_matches_autograd(ga: str) -> None:
    """torch.func transforms the whole block (an autograd.Function of the old single-method form
    anywhere inside would refuse): parameter gradients equal autograd's."""
    from torch.func import functional_call, grad

    torch.manual_seed(0)
    block = randomize_(gald.GALD(16, ga), seed=1).double().eval()
    x = torch.randn(2, 16, 9, 11, dtype=torch.float64)
    params = {k: v.detach() for k, v in block.named_parameters()}
    got = grad(lambda p: functional_call(block, p, (x,)).square().sum())(params)
    block.zero_grad()
    block(x).square().sum().backward()
    for name, p in block.named_parameters():
        want = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got[name], want, msg=lambda m, n=name: f"{ga} {n}: {m}")
