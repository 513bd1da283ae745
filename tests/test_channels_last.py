"""channels_last and the eager CPU fast path of the LD.

An input in channels_last gives the same values as NCHW, and the LD branch runs in channels_last
whatever the input's layout: the first depthwise conv of an NCHW input goes slab by slab
(``gald.ops._depthwise_cl``), and in training the whole LD is one autograd node that replays the
branch in backward (``gald.ops._ld_train_cpu``). Each piece is compared here with the plain
modules (the slow, obviously correct path) on random inputs.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gald
from gald.fuse import fuse
from gald.ld import run_depthwise_chain
from gald.ops import _alloc, _depthwise_cl, _ld_torch
from gald.ops._ld_train_cpu import ld_train_cpu

CL = torch.channels_last


def _randomise(m: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                n = mod.num_features
                mod.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                mod.bias.copy_(torch.randn(n, generator=gen) * 0.5)
                mod.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                mod.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return m


@contextmanager
def small_chunks(slab: int = 200, chunk: int = 64) -> Iterator[None]:
    """Tiny slabs and chunks, so small inputs cross many slab and chunk boundaries."""
    old = _depthwise_cl.SLAB_ELEMS, _ld_torch.CPU_CHUNK_ELEMS
    _depthwise_cl.SLAB_ELEMS, _ld_torch.CPU_CHUNK_ELEMS = slab, chunk
    try:
        yield
    finally:
        _depthwise_cl.SLAB_ELEMS, _ld_torch.CPU_CHUNK_ELEMS = old


def plain_ld(ld: gald.LocalDistribution, x: torch.Tensor) -> torch.Tensor:
    """The LD with its modules called as they are and the plain-ops modulation."""
    return gald.ops.ld_modulate_reference(x, ld.branch(x), ld.offset)


def train_step(fn, module, x, g):
    xr = x.clone().requires_grad_()
    out = fn(module, xr)
    out.backward(g)
    return out.detach(), xr.grad, {n: p.grad for n, p in module.named_parameters()}


def assert_same_step(a, b, *, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(a[1], b[1], rtol=rtol, atol=atol)
    assert a[2].keys() == b[2].keys()
    # a conv bias before a train-mode BatchNorm has a zero gradient up to the rounding of sums
    # of large terms: compare every gradient on the scale of the largest one
    scale = max(1.0, *(float(g.abs().max()) for g in b[2].values() if g is not None))
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], rtol=rtol, atol=atol * scale, msg=name)


# --------------------------------------------------------------------------------------------
# the depthwise conv, slab by slab


@settings(max_examples=20, deadline=None)
@given(
    c=st.integers(1, 7),
    k=st.sampled_from([1, 3, 5]),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    bias=st.booleans(),
    slab=st.sampled_from([1, 50, 300, 1 << 18]),
    seed=st.integers(0, 1000),
)
def test_slab_depthwise_matches_conv2d(c, k, stride, padding, dilation, bias, slab, seed):
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(c, c, k, stride, padding, dilation, groups=c, bias=bias)
    side = dilation * (k - 1) + 1 - 2 * padding
    x = torch.randn(2, c, max(side, 1) + 6, max(side, 1) + 3, generator=gen)
    xr, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    with small_chunks(slab=slab):
        out = _depthwise_cl.depthwise_conv_cl(xr, conv)
    want = F.conv2d(xp, conv.weight, conv.bias, stride, padding, dilation, c)
    assert out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    g = torch.randn(want.shape, generator=gen)
    params = list(conv.parameters())
    with small_chunks(slab=slab):
        got = torch.autograd.grad(out, [xr, *params], g)
    exp = torch.autograd.grad(want, [xp, *params], g)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_slab_depthwise_gradcheck():
    conv = nn.Conv2d(3, 3, 3, stride=2, padding=1, groups=3).double()
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    sf = _depthwise_cl._SlabDepthwise
    with small_chunks(slab=90):
        assert torch.autograd.gradcheck(
            lambda x, w, b: sf.apply(x, w, b, [2, 2], [1, 1], [1, 1]),
            (x, conv.weight, conv.bias),
            fast_mode=True,
        )


# --------------------------------------------------------------------------------------------
# the LD: channels_last input, the branch layout, the fused training node


def test_branch_runs_in_channels_last():
    ld = gald.LocalDistribution(4).eval()
    for x in (torch.randn(2, 4, 20, 18), torch.randn(2, 4, 20, 18).contiguous(memory_format=CL)):
        with torch.no_grad():
            logits = run_depthwise_chain(x, ld.branch)
            assert logits.is_contiguous(memory_format=CL)
            torch.testing.assert_close(logits, ld.branch(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("padding", [0, 1])
def test_ld_channels_last_input_gives_the_same_values(padding):
    ld = _randomise(gald.LocalDistribution(5, padding=padding), 1)
    x = torch.randn(2, 5, 31, 22)
    g = torch.randn(2, 5, 31, 22)
    xcl, gcl = x.contiguous(memory_format=CL), g.contiguous(memory_format=CL)
    ld_cl = copy.deepcopy(ld)
    with small_chunks():
        ref = train_step(lambda m, t: m(t), ld, x, g)
        got = train_step(lambda m, t: m(t), ld_cl, xcl, gcl)
    assert_same_step(got, ref)
    assert got[0].is_contiguous(memory_format=CL)
    for name, buf in ld.named_buffers():
        torch.testing.assert_close(dict(ld_cl.named_buffers())[name], buf, msg=name)
    ld.eval()
    ld_cl.eval()
    with torch.no_grad():
        out = ld_cl(xcl)
        assert out.is_contiguous(memory_format=CL)
        torch.testing.assert_close(out, ld(x), rtol=1e-5, atol=1e-6)


CONFIGS = {
    "default": {},
    "paper": {"padding": 0, "num_stages": 3},
    "one_stage_no_final_act": {"num_stages": 1, "final_act": False},
    "groupnorm_silu": {"norm_layer": lambda c: nn.GroupNorm(1, c), "act_layer": nn.SiLU},
    "inplace_relu": {"act_layer": lambda: nn.ReLU(inplace=True)},
}


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fused_training_node_matches_plain_modules(name, layout):
    ld = _randomise(gald.LocalDistribution(4, offset=2.0, **CONFIGS[name]), 2)
    plain = copy.deepcopy(ld)
    x = torch.randn(3, 4, 33, 29)
    if layout == "cl":
        x = x.contiguous(memory_format=CL)
    g = torch.randn(3, 4, 33, 29)
    with small_chunks():
        got = train_step(lambda m, t: m(t), ld, x, g)
    want = train_step(plain_ld, plain, x, g)
    assert_same_step(got, want)
    # the BatchNorm running statistics were updated exactly once
    for (n, a), (_, b) in zip(ld.named_buffers(), plain.named_buffers()):
        torch.testing.assert_close(a, b, msg=n)


def test_fused_node_after_fuse_with_inplace_act():
    # fuse() leaves Identity before an in-place ReLU: the kept conv output must survive it
    ld = _randomise(gald.LocalDistribution(3, act_layer=lambda: nn.ReLU(inplace=True))).eval()
    fused = fuse(ld)
    x, g = torch.randn(2, 3, 20, 20), torch.randn(2, 3, 20, 20)
    got = train_step(lambda m, t: m(t), fused, x, g)
    want = train_step(plain_ld, copy.deepcopy(fused), x, g)
    assert_same_step(got, want)


def test_fused_node_partial_gradients():
    ld = _randomise(gald.LocalDistribution(3))
    plain = copy.deepcopy(ld)
    for m in (ld, plain):
        m.branch[0][0].weight.requires_grad_(False)  # frozen first conv
        m.branch[2][1].requires_grad_(False)  # frozen last norm
    x = torch.randn(2, 3, 17, 19)  # x itself needs no gradient
    g = torch.randn(2, 3, 17, 19)
    ld(x).backward(g)
    plain_ld(plain, x).backward(g)
    for (n, a), (_, b) in zip(ld.named_parameters(), plain.named_parameters()):
        if b.grad is None:
            assert a.grad is None, n
        else:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5, msg=n)


@pytest.mark.parametrize("train", [True, False])
def test_fused_node_gradcheck(train):
    # float64 convs are slow in channels_last: a tiny input and gradcheck's fast mode
    ld = _randomise(gald.LocalDistribution(2, final_act=False)).double().train(train)
    conv = ld.branch[0][0]
    rest = [m for i, stage in enumerate(ld.branch) for m in (stage[1:] if i == 0 else stage)]
    x = torch.randn(2, 2, 9, 8, dtype=torch.float64, requires_grad=True)
    with small_chunks(slab=100, chunk=20):
        assert torch.autograd.gradcheck(
            lambda x, w: ld_train_cpu(x, conv, rest, 1.0),
            (x, conv.weight),
            eps=1e-6,
            atol=1e-5,
            fast_mode=True,
        )


def test_fused_node_keeps_x_the_first_activation_and_the_logits():
    ld = gald.LocalDistribution(4, padding=0)
    x = torch.randn(2, 4, 31, 31, requires_grad=True)
    sizes: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        sizes[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ld(x)
    first, logits = 2 * 4 * 15 * 15 * 4, 2 * 4 * 3 * 3 * 4
    assert sizes.pop(x.untyped_storage().data_ptr()) == x.nbytes
    assert sorted(sizes.values()) == [logits, first]
    out.sum().backward()
    assert x.grad is not None


def test_forward_hooks_take_the_plain_path():
    ld = gald.LocalDistribution(3)
    seen = []
    handle = ld.branch[0][0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        ld(torch.randn(2, 3, 16, 16))
    finally:
        handle.remove()
    assert seen == [torch.Size([2, 3, 8, 8])]


def test_deterministic_training_step():
    ld = _randomise(gald.LocalDistribution(4))
    x, g = torch.randn(2, 4, 25, 23), torch.randn(2, 4, 25, 23)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = train_step(lambda m, t: m(t), ld, x, g)
        ld.zero_grad(set_to_none=True)
        second = train_step(lambda m, t: m(t), ld, x, g)
    finally:
        torch.use_deterministic_algorithms(was)
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1], second[1])
    for n in first[2]:
        assert torch.equal(first[2][n], second[2][n]), n


def test_autocast_takes_the_plain_path():
    ld = _randomise(gald.LocalDistribution(4)).eval()
    x = torch.randn(2, 4, 20, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ld(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ld(x), rtol=0.05, atol=0.05)


# --------------------------------------------------------------------------------------------
# GALD


def test_gald_channels_last_input_gives_the_same_values():
    block = _randomise(gald.GALD(8, "cgnl", ga_kwargs={"groups": 2}), 4)
    block_cl = copy.deepcopy(block)
    x, g = torch.randn(2, 8, 23, 19), torch.randn(2, 8, 23, 19)
    ref = train_step(lambda m, t: m(t), block, x, g)
    got = train_step(
        lambda m, t: m(t), block_cl, x.contiguous(memory_format=CL), g.contiguous(memory_format=CL)
    )
    assert_same_step(got, ref, rtol=1e-4, atol=1e-4)
    block.eval()
    block_cl.eval()
    with torch.no_grad():
        torch.testing.assert_close(block_cl(x.contiguous(memory_format=CL)), block(x))


# --------------------------------------------------------------------------------------------
# huge-page backed outputs


def test_large_outputs_keep_shape_and_layout():
    x = torch.empty(1, 8, 1100, 1000).contiguous(memory_format=CL)  # 35 MB, above MIN_BYTES
    out = _alloc.empty_like(x)
    assert out.shape == x.shape
    assert out.is_contiguous(memory_format=CL)
    out.fill_(2.0)
    assert float(out[0, 7, 1099, 999]) == 2.0


def test_hugepages_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("GALD_HUGEPAGES", "0")
    assert _alloc._load_madvise() is None
