"""LocalDistribution: semantics against an explicit restatement, size rules, mask range, errors,
the impl switch, gradient checkpointing, and branches with hooks or stochastic layers."""

from __future__ import annotations

import copy
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gald
import gald.testing
from gald._validate import INT64_MAX, check_positive_int
from gald.bench._timing import saved_bytes
from gald.ld import strided_min_size


def _randomise(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.5)
                mod.running_mean.normal_(0, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m


def _slow_ld(ld: gald.LocalDistribution, x: torch.Tensor) -> torch.Tensor:
    """The formula written out stage by stage."""
    y = x
    for i, stage in enumerate(ld.branch):
        conv, norm = stage[0], stage[1]
        y = F.conv2d(y, conv.weight, conv.bias, stride=2, padding=ld.padding, groups=ld.channels)
        y = norm(y)
        if i < ld.num_stages - 1 or ld.final_act:
            y = torch.relu(y)
    up = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=True)
    return x * (ld.offset + torch.sigmoid(up))


@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("offset", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("final_act", [True, False])
@pytest.mark.parametrize("train", [False, True])
def test_matches_formula(padding: int, offset: float, final_act: bool, train: bool) -> None:
    ld = _randomise(
        gald.LocalDistribution(6, padding=padding, offset=offset, final_act=final_act)
    ).double()
    ld.train(train)
    x = torch.randn(2, 6, 17, 21, dtype=torch.float64)
    torch.testing.assert_close(ld(x), _slow_ld(ld, x), rtol=1e-10, atol=1e-12)


def test_mask_range_quirk() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 33, 33)
    ld = _randomise(gald.LocalDistribution(8, final_act=True)).eval()
    m = ld.mask(x)
    assert m.min() >= 0.5 and m.max() < 1.0
    free = _randomise(gald.LocalDistribution(8, final_act=False)).eval()
    free.load_state_dict(ld.state_dict())
    m2 = free.mask(x)
    assert m2.min() < 0.5, "final_act=False must free the lower half of the range"
    assert m2.min() > 0.0 and m2.max() < 1.0


def test_offset_zero_is_pure_gate() -> None:
    ld = _randomise(gald.LocalDistribution(4, offset=0.0)).eval()
    x = torch.randn(1, 4, 9, 9)
    torch.testing.assert_close(ld(x), x * ld.mask(x))


@pytest.mark.parametrize(
    ("stages", "k", "p", "expected"),
    [(3, 3, 0, 15), (3, 3, 1, 1), (1, 3, 0, 3), (2, 5, 0, 13), (2, 5, 1, 7)],
)
def test_min_size(stages: int, k: int, p: int, expected: int) -> None:
    assert strided_min_size(stages, k, p) == expected
    # the minimum works, one less does not
    conv = nn.Sequential(*[nn.Conv2d(1, 1, k, stride=2, padding=p) for _ in range(stages)])
    conv(torch.zeros(1, 1, expected, expected))
    if expected > 1:
        with pytest.raises(RuntimeError):
            conv(torch.zeros(1, 1, expected - 1, expected - 1))


def test_padding0_too_small_raises_named_minimum() -> None:
    ld = gald.LocalDistribution(
        4, padding=0
    ).eval()  # train-mode BN needs B*h*w > 1 at the last stage
    assert ld(torch.randn(1, 4, 15, 15)).shape == (1, 4, 15, 15)
    with pytest.raises(ValueError, match=r">= 15"):
        ld(torch.randn(1, 4, 14, 40))
    with pytest.raises(ValueError, match=r">= 15.*\(1, 4, 40, 3\)"):
        ld(torch.randn(1, 4, 40, 3))


@given(
    b=st.integers(0, 3),
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    c=st.sampled_from([1, 3, 8]),
    final_act=st.booleans(),
)
def test_shape_property(b: int, h: int, w: int, c: int, final_act: bool) -> None:
    ld = gald.LocalDistribution(c, final_act=final_act).eval()
    x = torch.randn(b, c, h, w)
    y = ld(x)
    assert y.shape == x.shape and y.dtype == x.dtype


@settings(max_examples=5)
@given(h=st.integers(2, 20), w=st.integers(2, 20))
def test_gradients_reach_every_parameter(h: int, w: int) -> None:
    ld = gald.LocalDistribution(3, final_act=False).train()
    x = torch.randn(2, 3, h, w, requires_grad=True)
    ld(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in ld.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in ld.parameters())


@pytest.mark.parametrize("padding", [0, 1])
def test_gradcheck(padding: int) -> None:
    ld = _randomise(gald.LocalDistribution(2, padding=padding, final_act=False)).double().eval()
    x = torch.randn(1, 2, 15, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ld, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_nan_in_nan_out() -> None:
    ld = gald.LocalDistribution(2).eval()
    x = torch.randn(1, 2, 8, 8)
    x[0, 0, 3, 3] = math.nan
    y = ld(x)
    assert torch.isnan(y[0, 0, 3, 3])
    assert y.shape == x.shape


@pytest.mark.parametrize(
    ("x", "exc", "pattern"),
    [
        (torch.randn(2, 4, 8), ValueError, r"x must be 4-D \(B, C, H, W\), got 3-D"),
        (torch.randn(2, 5, 8, 8), ValueError, r"x must have 4 channels.*got shape \(2, 5, 8, 8\)"),
        (torch.ones(2, 4, 8, 8, dtype=torch.int64), TypeError, r"floating dtype, got torch.int64"),
        ("not a tensor", TypeError, r"x must be a torch.Tensor, got str"),
    ],
)
def test_bad_input(x: object, exc: type[Exception], pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        gald.LocalDistribution(4)(x)


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"channels": 0}, ValueError, "channels must be >= 1"),
        ({"channels": 2.0}, TypeError, "channels must be an int"),
        ({"channels": 4, "num_stages": 0}, ValueError, "num_stages must be >= 1"),
        (
            {"channels": 4, "num_stages": 31},
            ValueError,
            r"num_stages must be <= 30 \(each stage halves",
        ),
        ({"channels": 10**30}, ValueError, r"channels must be <= 9223372036854775807, got 10+$"),
        ({"channels": 4, "padding": -1}, ValueError, "padding must be >= 0"),
        (
            {"channels": 4, "padding": 2},
            ValueError,
            r"padding must be at most kernel_size // 2 = 1: .*got padding=2",
        ),
        (
            {"channels": 4, "kernel_size": 5, "padding": 3},
            ValueError,
            r"at most kernel_size // 2 = 2",
        ),
        ({"channels": 4, "offset": "1"}, TypeError, "offset must be a float"),
        (
            {"channels": 4, "impl": "cuda"},
            ValueError,
            r"impl must be one of \('auto', 'triton', 'torch'\), got 'cuda'",
        ),
        ({"channels": 4, "impl": None}, TypeError, "impl must be a str"),
    ],
)
def test_bad_constructor(kwargs: dict, exc: type[Exception], pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        gald.LocalDistribution(**kwargs)


@pytest.mark.parametrize(
    ("padding", "hw", "fails"),
    [
        (0, (20, 20), True),
        (0, (23, 23), False),
        (1, (8, 8), True),
        (1, (8, 9), False),
        (1, (1, 1), True),
        (1, (9, 1), False),
    ],
)
def test_batch_one_training_names_the_stage_that_is_one_by_one(padding, hw, fails) -> None:
    """Train-mode BatchNorm refuses one value per channel: at batch 1 the LD says which stage
    is 1x1 and what to do, where torch's message names neither; the smallest side it names
    trains."""
    ld = gald.LocalDistribution(4, padding=padding)
    x = torch.randn(1, 4, *hw)
    if not fails:
        ld(x).sum().backward()
        return
    with pytest.raises(ValueError, match=r"batch size 1, mask stage \d sees a 1x1 map") as info:
        ld(x)
    side = int(str(info.value).rsplit(" ", 1)[-1])
    ld(torch.randn(1, 4, side, 1 if padding else side)).sum().backward()  # the remedy trains
    ld(torch.randn(2, 4, *hw))  # a batch of two trains
    ld.eval()(x)  # eval mode uses the running statistics


def test_batch_one_training_names_the_stage_under_torch_compile() -> None:
    """The named refusal is raised from compiled code too (TorchDynamo runs the check at trace
    time); a batch-1 input that trains compiles and matches eager."""
    ld = gald.LocalDistribution(4).train()
    compiled = torch.compile(ld, backend="eager")
    with pytest.raises(ValueError, match=r"batch size 1, mask stage 0 sees a 1x1 map"):
        compiled(torch.randn(1, 4, 1, 1))
    x = torch.randn(1, 4, 12, 10)
    torch.testing.assert_close(compiled(x), ld(x))


def test_norm_and_act_injection() -> None:
    ld = gald.LocalDistribution(4, norm_layer=lambda c: nn.GroupNorm(2, c), act_layer=nn.GELU)
    assert isinstance(ld.branch[0][1], nn.GroupNorm)
    assert isinstance(ld.branch[0][2], nn.GELU)
    assert ld(torch.randn(1, 4, 9, 9)).shape == (1, 4, 9, 9)


@pytest.mark.parametrize("channels_last", [False, True])
def test_parameter_gradients_have_parameter_layout(channels_last: bool) -> None:
    # DDP's gradient buckets expect each gradient in its parameter's strides; a channels_last
    # model is converted as a whole (model.to(memory_format=torch.channels_last))
    ld = gald.LocalDistribution(16).train()
    x = torch.randn(2, 16, 33, 33)
    if channels_last:
        ld = ld.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    ld(x.requires_grad_(True)).sum().backward()
    for name, p in ld.named_parameters():
        assert p.grad is not None and p.grad.stride() == p.stride(), name


def test_impl_is_passed_to_the_op(monkeypatch):
    seen: list[str] = []
    real = gald.ld.ld_modulate

    def spy(x, logits, offset, *, impl):
        seen.append(impl)
        return real(x, logits, offset, impl=impl)

    monkeypatch.setattr(gald.ld, "ld_modulate", spy)
    x = torch.randn(1, 4, 9, 9)
    auto = gald.LocalDistribution(4).eval()
    forced = gald.LocalDistribution(4, impl="torch").eval()
    forced.load_state_dict(auto.state_dict())
    torch.testing.assert_close(forced(x), auto(x), rtol=0, atol=0)
    assert seen == ["torch", "auto"]
    assert "impl='torch'" in repr(forced)


def _train_step(ld: gald.LocalDistribution, x: torch.Tensor, g: torch.Tensor, seed: int = 0):
    torch.manual_seed(seed)
    ld.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_()
    out = ld(xr)
    out.backward(g)
    return out.detach(), xr.grad, [p.grad for p in ld.parameters()]


def _plain_step(ld: gald.LocalDistribution, x: torch.Tensor, g: torch.Tensor, seed: int = 0):
    """Autograd through plain ops: the branch modules as they are, the reference formula."""
    torch.manual_seed(seed)
    ld.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_()
    out = gald.ops.ld_modulate_reference(xr, ld.branch(xr), ld.offset)
    out.backward(g)
    return out.detach(), xr.grad, [p.grad for p in ld.parameters()]


def _assert_same(a, b, **tol) -> None:
    torch.testing.assert_close(a[0], b[0], **tol)
    torch.testing.assert_close(a[1], b[1], **tol)
    for ga, gb in zip(a[2], b[2]):
        torch.testing.assert_close(ga, gb, **tol)


@pytest.mark.parametrize("channels_last", [False, True])
def test_grad_checkpointing_gives_identical_gradients(channels_last: bool) -> None:
    ld = _randomise(gald.LocalDistribution(6, offset=2.0)).train()
    x = torch.randn(2, 6, 19, 17)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    plain = _train_step(ld, x, g)
    ld.set_grad_checkpointing()
    assert ld.grad_checkpointing
    ckpt = _train_step(ld, x, g)
    _assert_same(ckpt, plain, rtol=0, atol=0)
    ld.set_grad_checkpointing(False)
    _assert_same(_train_step(ld, x, g), plain, rtol=0, atol=0)
    with pytest.raises(TypeError, match="enable must be a bool, got int"):
        ld.set_grad_checkpointing(1)  # type: ignore[arg-type]


@pytest.mark.parametrize("momentum", [0.1, None])
def test_grad_checkpointing_updates_running_statistics_once(momentum: float | None) -> None:
    # the recomputation in backward runs the branch's BatchNorms in train mode again; it must
    # not update their running statistics (or num_batches_tracked) a second time
    def norm(c: int) -> nn.Module:
        return nn.BatchNorm2d(c, momentum=momentum)

    plain = _randomise(gald.LocalDistribution(6, norm_layer=norm)).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing()
    for _ in range(3):
        x = torch.randn(2, 6, 19, 17, requires_grad=True)
        for ld in (plain, ckpt):
            ld(x).square().sum().backward()
    for (name, want), (_, got) in zip(plain.named_buffers(), ckpt.named_buffers(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    assert int(ckpt.branch[0][1].num_batches_tracked) == 3


def test_grad_checkpointing_backward_twice() -> None:
    # retain_graph: the second backward recomputes the branch again (gradient penalties,
    # autograd.grad then backward); the gradients add up as without checkpointing
    plain = _randomise(gald.LocalDistribution(4)).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing()
    x = torch.randn(2, 4, 15, 13)
    grads = []
    for ld in (plain, ckpt):
        xr = x.clone().requires_grad_()
        y = ld(xr).square().sum()
        y.backward(retain_graph=True)
        y.backward()
        grads.append(xr.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    for (name, want), (_, got) in zip(plain.named_buffers(), ckpt.named_buffers(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


def test_grad_checkpointing_saves_less() -> None:
    ld = gald.LocalDistribution(8).train()
    x = torch.randn(2, 8, 32, 32, requires_grad=True)
    plain = saved_bytes(lambda: ld(x))
    ld.set_grad_checkpointing()
    ckpt = saved_bytes(lambda: ld(x))
    # x and the logits (plus a few per-channel BatchNorm statistics) instead of every activation
    assert ckpt < plain
    assert ckpt <= x.numel() * 4 * 1.1


@pytest.mark.parametrize("checkpointing", [False, True])
def test_branch_with_forward_hooks_gets_correct_gradients(checkpointing: bool) -> None:
    ld = _randomise(gald.LocalDistribution(4)).train()
    calls: list[str] = []

    def scale(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        calls.append(type(module).__name__)
        return out * 1.5  # a hook that changes the branch

    ld.branch[1][0].register_forward_hook(scale)
    ld.set_grad_checkpointing(checkpointing)
    x = torch.randn(2, 4, 15, 13, dtype=torch.float64)
    ld.double()
    g = torch.randn_like(x)
    got = _train_step(ld, x, g)
    assert calls  # the hook ran
    want = _plain_step(ld, x, g)
    _assert_same(got, want)


@pytest.mark.parametrize("final_act", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_stochastic_activation_gets_correct_gradients(checkpointing: bool, final_act: bool) -> None:
    # nn.RReLU in train mode draws a random slope per element: the backward must use the
    # slopes of the forward (with checkpointing, the recomputation must draw the same ones).
    # As the branch's last op (final_act=True) its noise is filled after being saved, which
    # checkpointing's early stop would leave unfilled
    ld = _randomise(gald.LocalDistribution(4, act_layer=nn.RReLU, final_act=final_act)).double()
    ld.train().set_grad_checkpointing(checkpointing)
    x = torch.randn(2, 4, 17, 15, dtype=torch.float64)
    g = torch.randn_like(x)
    got = _train_step(ld, x, g, seed=3)
    want = _plain_step(ld, x, g, seed=3)
    _assert_same(got, want)
    other = _plain_step(ld, x, g, seed=4)
    assert not torch.equal(other[1], want[1])  # the slopes are random indeed


def test_autocast_output_has_the_input_dtype() -> None:
    ld = gald.LocalDistribution(4).train()
    x = torch.randn(1, 4, 16, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ld(x)
        logits = ld.logits(x)
    assert out.dtype == logits.dtype == torch.float32
    out.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32


def test_torch_func_grad_matches_autograd() -> None:
    from torch.func import functional_call, grad

    ld = _randomise(gald.LocalDistribution(4)).eval().double()
    x = torch.randn(1, 4, 9, 8, dtype=torch.float64)
    params = {k: v.detach() for k, v in ld.named_parameters()}
    got = grad(lambda p: functional_call(ld, p, (x,)).square().sum())(params)
    ld(x).square().sum().backward()
    for name, p in ld.named_parameters():
        torch.testing.assert_close(got[name], p.grad, msg=name)
    xr = x.clone().requires_grad_()
    ld(xr).sum().backward()
    torch.testing.assert_close(grad(lambda t: ld(t).sum())(x), xr.grad)


@pytest.mark.parametrize("offset", [2.0, 0.0])
def test_blend_is_the_linear_blend_with_its_gradients(offset: float) -> None:
    """``ld(x, blend=a) == x + a * (ld(x) - x)`` in float64, values and gradients (x, a and the
    branch's parameters); ``a = 0`` gives ``x`` bit for bit."""
    ld = _randomise(gald.LocalDistribution(4, offset=offset)).double().train()
    x = torch.randn(2, 4, 13, 11, dtype=torch.float64)
    a = torch.randn(1, 4, 1, 1, dtype=torch.float64)
    g = torch.randn_like(x)
    got_x, got_a = x.clone().requires_grad_(), a.clone().requires_grad_()
    ld(got_x, blend=got_a).backward(g)
    got_params = [p.grad.clone() for p in ld.parameters()]
    ld.zero_grad()
    want_x, want_a = x.clone().requires_grad_(), a.clone().requires_grad_()
    (want_x + want_a * (ld(want_x) - want_x)).backward(g)
    torch.testing.assert_close(got_x.grad, want_x.grad)
    torch.testing.assert_close(got_a.grad, want_a.grad)
    for p, want in zip(ld.parameters(), got_params):
        torch.testing.assert_close(want, p.grad)
    with torch.no_grad():
        assert torch.equal(ld.eval()(x, blend=torch.zeros_like(a)), x)


def test_blend_is_checked_and_the_mask_is_computed_as_the_op_does() -> None:
    ld = gald.LocalDistribution(4).eval()
    x = torch.randn(1, 4, 9, 9)
    with pytest.raises(TypeError, match=r"blend must be a tensor or None, got float"):
        ld(x, blend=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"without enlarging it, got \(2, 4, 1, 1\)"):
        ld(x, blend=torch.zeros(2, 4, 1, 1))  # would turn a batch of 1 into 2
    assert torch.equal(ld(x, blend=torch.zeros(1, 4, 1, 1)), x)
    # half precision: the mask in float32, as the fused op applies it
    with torch.no_grad():
        xb = x.to(torch.bfloat16)
        ld_b = ld.to(torch.bfloat16)
        m = ld_b.mask(xb)
        assert m.dtype == torch.float32
        torch.testing.assert_close(ld_b(xb), (xb.float() * (ld.offset + m)).to(torch.bfloat16))


@pytest.mark.parametrize(
    "norm", [nn.InstanceNorm2d, partial(nn.GroupNorm, 4)], ids=["instance", "group-per-channel"]
)
@pytest.mark.parametrize(("padding", "expected"), [(1, 9), (0, 23)])
def test_a_norm_that_refuses_a_one_by_one_map_raises_the_minimum(norm, padding, expected) -> None:
    """An instance norm, or a GroupNorm with one channel per group, cannot normalise the 1x1
    map of the last stage (at any batch size, or at batch 1): min_size keeps every stage's map
    at least 2 wide, the block's too, and a smaller input is refused naming the norm."""
    ld = gald.LocalDistribution(4, padding=padding, norm_layer=norm).eval()
    assert ld.min_size == expected
    ld(torch.randn(1, 4, expected, expected))
    with pytest.raises(ValueError, match=rf">= {expected} .*cannot normalise the 1x1 map"):
        ld(torch.randn(1, 4, expected - 1, expected - 1))
    block = gald.GALD(4, "gc", padding=padding, norm_layer=norm).eval()
    assert block.min_size == strided_min_size(3, 3, padding, start=2)
    block(torch.randn(1, 4, block.min_size, block.min_size))
    # norms that take one value keep the smaller minimum
    assert (
        gald.LocalDistribution(4, padding=padding, norm_layer=partial(nn.GroupNorm, 2)).min_size
        < expected
    )


def test_single_sample_check_exempts_syncbatchnorm():
    """SyncBatchNorm normalises over every process's batch: a 1x1 stage at batch 1 per GPU
    is what multi-GPU segmentation training does, and must not be refused by gald."""
    ld = gald.LocalDistribution(8, padding=1, norm_layer=nn.SyncBatchNorm).train()
    ld._check_single_sample(torch.Size([5, 5]))  # stage 2 is 1x1
    bn = gald.LocalDistribution(8, padding=1).train()
    with pytest.raises(ValueError, match="mask stage 2 sees a 1x1 map"):
        bn._check_single_sample(torch.Size([5, 5]))


def test_num_stages_maximum_is_inclusive():
    """``check_positive_int``'s maximum is inclusive (num_stages=30 is documented as allowed);
    the default maximum is the largest int64."""
    assert gald.LocalDistribution(8, num_stages=30, padding=1).num_stages == 30
    assert check_positive_int(INT64_MAX, "n") == INT64_MAX
    with pytest.raises(ValueError, match="must be <= 30"):
        gald.LocalDistribution(8, num_stages=31, padding=1)
