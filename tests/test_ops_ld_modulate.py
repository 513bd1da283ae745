"""gald.ops.ld_modulate: every implementation against a slow per-pixel reference written here.

The reference computes the bilinear weights of every output pixel with Python scalars (the
PyTorch convention, see ``_source``) and gathers the four neighbours; autograd through it gives
the reference gradients. The chunked torch kernel is run with tiny chunk bounds as well, so
that small inputs cross many chunk boundaries.
"""

from __future__ import annotations

import copy
import itertools
import math
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import gald
import gald.testing
from gald.ops import _ld_torch, _modulate, ld_modulate, ld_modulate_reference

# --------------------------------------------------------------------------------------------
# the slow reference


def _source(d: int, n_out: int, n_in: int, align_corners: bool) -> tuple[int, int, float]:
    if align_corners:
        src = d * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    else:
        src = max((d + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = min(math.floor(src), n_in - 1)
    i1 = min(i0 + 1, n_in - 1)
    return i0, i1, src - i0


def slow_upsample(logits: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    """Bilinear upsampling, one output pixel at a time."""
    hh, ww = size
    h, w = logits.shape[-2:]
    rows = []
    for i in range(hh):
        y0, y1, ly = _source(i, hh, h, align_corners)
        cols = []
        for j in range(ww):
            x0, x1, lx = _source(j, ww, w, align_corners)
            top = (1 - lx) * logits[:, :, y0, x0] + lx * logits[:, :, y0, x1]
            bottom = (1 - lx) * logits[:, :, y1, x0] + lx * logits[:, :, y1, x1]
            cols.append((1 - ly) * top + ly * bottom)
        rows.append(torch.stack(cols, dim=-1))
    return torch.stack(rows, dim=-2)


def slow_grads(x, logits, g, offset, align_corners):
    xr = x.detach().double().requires_grad_()
    lr = logits.detach().double().requires_grad_()
    out = xr * (offset + torch.sigmoid(slow_upsample(lr, tuple(x.shape[-2:]), align_corners)))
    gx, gl = torch.autograd.grad(out, (xr, lr), g.double())
    return out.detach(), gx, gl


def make_x(b, c, hh, ww, layout, dtype=torch.float64, gen=None):
    if layout == "slice":  # non-contiguous: every other column of a wider tensor
        return torch.randn(b, c, hh, 2 * ww, dtype=dtype, generator=gen)[..., ::2]
    if layout == "permuted":  # dense but neither NCHW nor channels_last: H and W swapped
        return torch.randn(b, c, ww, hh, dtype=dtype, generator=gen).transpose(2, 3)
    x = torch.randn(b, c, hh, ww, dtype=dtype, generator=gen)
    return x.contiguous(memory_format=torch.channels_last) if layout == "cl" else x


def test_slow_reference_is_f_interpolate():
    logits = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    for size in [(7, 9), (1, 3), (4, 5), (3, 2), (1, 1)]:
        for ac in (True, False):
            want = F.interpolate(logits, size=size, mode="bilinear", align_corners=ac)
            torch.testing.assert_close(slow_upsample(logits, size, ac), want)


# --------------------------------------------------------------------------------------------
# every implementation equals the reference, forward and backward


@settings(max_examples=20, deadline=None)
@given(
    b=st.integers(1, 2),
    c=st.integers(1, 3),
    hh=st.integers(1, 9),
    ww=st.integers(1, 9),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    align_corners=st.booleans(),
    offset=st.sampled_from([0.0, 1.0, 2.0, -0.5]),
    layout=st.sampled_from(["nchw", "cl", "slice", "permuted"]),
    impl=st.sampled_from(["reference", "torch", "auto"]),
    chunk_bytes=st.sampled_from([1, 100, _ld_torch.CPU_CHUNK_BYTES]),
    seed=st.integers(0, 2**16),
)
def test_every_impl_matches_slow_reference(
    b, c, hh, ww, h, w, align_corners, offset, layout, impl, chunk_bytes, seed
):
    gen = torch.Generator().manual_seed(seed)
    x = make_x(b, c, hh, ww, layout, gen=gen)
    logits = 2 * torch.randn(b, c, h, w, dtype=torch.float64, generator=gen)
    if seed % 2:
        logits = logits.contiguous(memory_format=torch.channels_last)
    g = torch.randn(b, c, hh, ww, dtype=torch.float64, generator=gen)
    want, want_gx, want_gl = slow_grads(x, logits, g, offset, align_corners)

    xr, lr = x.clone().requires_grad_(), logits.clone().requires_grad_()
    with pytest.MonkeyPatch.context() as mp:
        set_chunk_bytes(mp, chunk_bytes)
        out = ld_modulate(xr, lr, offset, align_corners=align_corners, impl=impl)
        gx, gl = torch.autograd.grad(out, (xr, lr), g)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, want_gx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gl, want_gl, rtol=1e-12, atol=1e-12)
    if layout == "cl" and impl != "reference":
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert gx.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_float32_matches_reference_to_rounding(layout):
    gen = torch.Generator().manual_seed(1)
    x = make_x(2, 5, 23, 19, layout, dtype=torch.float32, gen=gen)
    logits = torch.randn(2, 5, 4, 3, generator=gen)
    g = torch.randn(2, 5, 23, 19, generator=gen)
    want, want_gx, want_gl = slow_grads(x, logits, g, 1.0, True)
    xr, lr = x.clone().requires_grad_(), logits.clone().requires_grad_()
    out = ld_modulate(xr, lr, impl="torch")
    gx, gl = torch.autograd.grad(out, (xr, lr), g)
    assert out.dtype == gx.dtype == gl.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx.double(), want_gx, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gl.double(), want_gl, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_half_types_compute_in_float32(dtype, layout):
    gen = torch.Generator().manual_seed(2)
    x = make_x(1, 3, 17, 13, layout, dtype=torch.float32, gen=gen).to(dtype)
    logits = (3 * torch.randn(1, 3, 3, 2, generator=gen)).to(dtype)
    g = torch.randn(1, 3, 17, 13, generator=gen).to(dtype)
    # the reference on the same (rounded) inputs in float64, rounded once at the end
    want, want_gx, want_gl = slow_grads(x, logits, g, 1.0, True)
    xr, lr = x.clone().requires_grad_(), logits.clone().requires_grad_()
    # an enclosing autocast region must not lower the kernels' float32 arithmetic
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ld_modulate(xr, lr, impl="torch")
    gx, gl = torch.autograd.grad(out, (xr, lr), g)
    assert out.dtype == gx.dtype == gl.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), want, rtol=eps, atol=eps)
    torch.testing.assert_close(gx.double(), want_gx, rtol=eps, atol=eps)
    # grad_logits sums many terms: accumulated in float32, one rounding at the end
    torch.testing.assert_close(
        gl.double(), want_gl, rtol=eps, atol=eps * want_gl.abs().max().item()
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "cl", "slice", "permuted"])
@pytest.mark.parametrize("offset", [0.0, 2.0, -0.5])
def test_half_types_in_many_chunks(dtype, layout, offset, monkeypatch):
    # the path of the CUDA fallback: half-precision x split into many chunks (a bound of 300
    # bytes holds a few rows or planes), each chunk's mask and reduction computed in float32
    set_chunk_bytes(monkeypatch, 300)
    gen = torch.Generator().manual_seed(5)
    x = make_x(2, 3, 15, 11, layout, dtype=torch.float32, gen=gen).to(dtype)
    logits = (3 * torch.randn(2, 3, 4, 3, generator=gen)).to(dtype)
    g = torch.randn(2, 3, 15, 11, generator=gen).to(dtype)
    want, want_gx, want_gl = slow_grads(x, logits, g, offset, True)
    xr, lr = x.clone().requires_grad_(), logits.clone().requires_grad_()
    out = ld_modulate(xr, lr, offset, impl="torch")
    gx, gl = torch.autograd.grad(out, (xr, lr), g)
    assert out.dtype == gx.dtype == gl.dtype == dtype
    eps = torch.finfo(dtype).eps
    scale = max(1.0, abs(offset) + 1)
    torch.testing.assert_close(out.double(), want, rtol=eps, atol=eps * scale)
    torch.testing.assert_close(gx.double(), want_gx, rtol=eps, atol=eps * scale)
    torch.testing.assert_close(
        gl.double(), want_gl, rtol=eps, atol=eps * want_gl.abs().max().item()
    )


def test_autocast_keeps_float32_exact():
    x = torch.randn(1, 3, 11, 9)
    logits = torch.randn(1, 3, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ld_modulate(x, logits)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ld_modulate(x, logits), rtol=0, atol=0)


def set_chunk_bytes(mp: pytest.MonkeyPatch, n: int) -> None:
    """Chunks of at most ``n`` bytes on every device."""
    mp.setattr(_ld_torch, "CPU_CHUNK_BYTES", n)
    mp.setattr(_ld_torch, "CHUNK_BYTES", n)


def test_chunk_bound_is_a_cache_tile_on_cpu_and_a_memory_bound_elsewhere():
    assert _ld_torch.chunk_bytes(torch.device("cpu")) == _ld_torch.CPU_CHUNK_BYTES
    assert _ld_torch.chunk_bytes(torch.device("meta")) == _ld_torch.CHUNK_BYTES
    assert _ld_torch.CPU_CHUNK_BYTES < _ld_torch.CHUNK_BYTES


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 4),
    c=st.integers(1, 600),
    hh=st.integers(1, 300),
    ww=st.integers(1, 300),
    cl=st.booleans(),
    dtype=st.sampled_from([torch.float16, torch.float32, torch.float64]),
    bound=st.sampled_from([1000, 4 << 20, 32 << 20]),
)
def test_chunks_cover_the_tensor_within_the_memory_bound(b, c, hh, ww, cl, dtype, bound):
    x = torch.empty(b, c, hh, ww, dtype=dtype, device="meta")
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    logits = torch.empty(b, c, 3, 3, dtype=dtype, device="meta")
    with pytest.MonkeyPatch.context() as mp:
        set_chunk_bytes(mp, bound)
        plan = _ld_torch._Plan(x, logits, True)
        buf = plan.buffer()
    itemsize = 8 if dtype == torch.float64 else 4  # half types compute in float32
    # NCHW chunks are planes of the (B*C, H, W) view, channels_last chunks image rows of the
    # (B*H, W, C) view (a tensor that is both NCHW- and channels_last-contiguous is NCHW)
    cl_only = cl and not x.is_contiguous()
    assert plan.channels_last == cl_only
    unit, total = (ww * c, b * hh) if cl_only else (hh * ww, b * c)
    spans = plan.spans
    assert spans[0][0] == 0 and spans[-1][1] == total
    assert all(a[1] == n[0] for a, n in itertools.pairwise(spans))
    for s0, s1 in spans:
        # never more than the bound, unless a single unit is larger than it
        assert (s1 - s0) * unit * itemsize <= max(bound, unit * itemsize)
    sizes = [s1 - s0 for s0, s1 in spans]
    assert max(sizes) - min(sizes) <= 1  # balanced
    per_chunk = max(1, bound // (unit * itemsize))
    assert len(spans) == math.ceil(total / per_chunk)  # as few chunks as the bound allows
    assert buf.numel() * buf.element_size() <= max(bound, unit * itemsize)
    units = plan.units_of(x)  # a view: chunks of it are dense, like those of the buffer
    assert units.data_ptr() == x.data_ptr() and units.shape[0] == total
    for s0, s1 in spans:
        assert units[s0:s1].shape == buf[: s1 - s0].shape
        assert units[s0:s1].is_contiguous()


# --------------------------------------------------------------------------------------------
# gradcheck of the custom autograd (float64)

GRADCHECK_CASES = [
    # (B, C, H, W, h, w, layout)
    (1, 2, 1, 6, 1, 3, "nchw"),  # H == 1
    (2, 1, 4, 5, 1, 1, "nchw"),  # 1x1 logits
    (1, 1, 3, 4, 6, 9, "nchw"),  # h > H: downsampling
    (1, 2, 5, 6, 2, 3, "slice"),  # non-contiguous x
    (2, 3, 5, 4, 2, 3, "cl"),  # channels_last x
    (2, 2, 5, 4, 2, 3, "permuted"),  # dense x in neither format: computed in a copy
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: "x".join(map(str, c)))
def test_gradcheck(case, monkeypatch):
    b, c, hh, ww, h, w, layout = case
    set_chunk_bytes(monkeypatch, 40)
    x = make_x(b, c, hh, ww, layout).requires_grad_()
    logits = torch.randn(b, c, h, w, dtype=torch.float64, requires_grad=True)
    for ac, offset in ((True, 1.0), (False, 2.0)):
        assert torch.autograd.gradcheck(
            lambda x, lg, ac=ac, o=offset: ld_modulate(x, lg, o, align_corners=ac, impl="torch"),
            (x, logits),
            fast_mode=True,
        )


def test_backward_computes_only_the_needed_gradients():
    x = torch.randn(1, 2, 6, 5, dtype=torch.float64)
    logits = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    g = torch.randn(1, 2, 6, 5, dtype=torch.float64)
    both = torch.ops.gald.ld_modulate_backward(g, x, logits, 1.0, True, "torch", True, True)
    only_x = torch.ops.gald.ld_modulate_backward(g, x, logits, 1.0, True, "torch", True, False)
    only_l = torch.ops.gald.ld_modulate_backward(g, x, logits, 1.0, True, "torch", False, True)
    assert only_x[1].numel() == 0
    assert only_l[0].numel() == 0
    torch.testing.assert_close(only_x[0], both[0], rtol=0, atol=0)
    torch.testing.assert_close(only_l[1], both[1], rtol=0, atol=0)
    # through autograd: a frozen x gets no gradient and the logits still do
    lr = logits.clone().requires_grad_()
    (gl,) = torch.autograd.grad(ld_modulate(x, lr), (lr,), g)
    torch.testing.assert_close(gl, both[1])


# --------------------------------------------------------------------------------------------
# operator registration: fake kernel, opcheck, compile, export (ONNX: test_deploy.py)


def test_meta_tensors_give_shape_and_layout():
    x = torch.empty(2, 4, 20, 18, device="meta").contiguous(memory_format=torch.channels_last)
    out = ld_modulate(x, torch.empty(2, 4, 3, 3, device="meta"))
    assert out.device.type == "meta"
    assert out.shape == x.shape
    assert out.stride() == x.stride()


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_infinite_logits_saturate_like_large_ones(layout):
    # the interpolation matmuls would multiply an inf by zero weights (nan); an infinite
    # logit must give what a very large finite one gives: a saturated sigmoid
    x = make_x(2, 3, 16, 13, layout, dtype=torch.float64).requires_grad_()
    logits = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    logits[0, 0, 0, 0], logits[1, 2, 3, 4], logits[0, 1, 2, 2] = math.inf, -math.inf, math.inf
    finite = logits.clamp(-1e4, 1e4).requires_grad_()
    logits.requires_grad_()
    g = torch.randn_like(x)
    out = ld_modulate(x, logits, 2.0, impl="torch")
    ref = ld_modulate_reference(x, finite, 2.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref)
    gx, gl = torch.autograd.grad(out, (x, logits), g)
    rx, rl = torch.autograd.grad(ref, (x, finite), g)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gl, rl)


def test_double_backward_raises_instead_of_giving_zero():
    x = torch.randn(1, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(1, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(
        ld_modulate(x, logits, impl="torch").square().sum(), x, create_graph=True
    )
    with pytest.raises(RuntimeError, match="no second derivative.*ld_modulate_reference"):
        gx.square().sum().backward()
    # the reference differentiates twice (what the message points to)
    (rx,) = torch.autograd.grad(
        ld_modulate_reference(x, logits).square().sum(), x, create_graph=True
    )
    rx.square().sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_opcheck():
    x = make_x(2, 3, 7, 6, "cl", dtype=torch.float32).requires_grad_()
    logits = torch.randn(2, 3, 3, 2, requires_grad=True)
    torch.library.opcheck(torch.ops.gald.ld_modulate.default, (x, logits, 1.5, True, "torch"))
    g = torch.randn_like(x)
    torch.library.opcheck(
        torch.ops.gald.ld_modulate_backward.default,
        (g, x.detach(), logits.detach(), 1.5, False, "torch", True, True),
    )


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    ld = gald.LocalDistribution(4, offset=2.0)
    x = torch.randn(2, 4, 13, 11)
    compiled = torch.compile(ld, fullgraph=True, backend="aot_eager")
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn_like(x)
    oc, oe = compiled(xc), ld(xe)
    torch.testing.assert_close(oc, oe)
    oc.backward(g)
    oe.backward(g)
    torch.testing.assert_close(xc.grad, xe.grad)


def test_compiled_checkpointing_matches_eager_checkpointing():
    # the compiled path hands the recomputation to the compiler (no context_fn): outputs,
    # gradients and BatchNorm statistics (updated once) must match the eager path's
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = gald.LocalDistribution(4, num_stages=1, offset=2.0)
    eager.set_grad_checkpointing()
    compiled_ld = copy.deepcopy(eager)
    compiled = torch.compile(compiled_ld, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 13, 11)
    g = torch.randn_like(x)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    oe, oc = eager(xe), compiled(xc)
    torch.testing.assert_close(oc, oe)
    oe.backward(g)
    oc.backward(g)
    torch.testing.assert_close(xc.grad, xe.grad)
    for (name, pe), pc in zip(eager.named_parameters(), compiled_ld.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, msg=lambda m, n=name: f"{n}: {m}")
    for (name, be), bc in zip(eager.named_buffers(), compiled_ld.buffers()):
        torch.testing.assert_close(bc, be, msg=lambda m, n=name: f"{n}: {m}")
    assert int(eager.branch[0][1].num_batches_tracked) == 1  # one update, not two


def test_torch_export_keeps_the_op():
    ld = gald.LocalDistribution(4).eval()
    x = torch.randn(2, 4, 20, 18)
    ep = torch.export.export(ld, (x,))
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert torch.ops.gald.ld_modulate.default in targets  # the fused op, not its decomposition
    torch.testing.assert_close(ep.module()(x), ld(x))


def test_exporting_takes_the_reference(monkeypatch):
    x = torch.randn(1, 2, 5, 5)
    assert _modulate.resolve_impl(x, "auto") == "torch"
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert _modulate.resolve_impl(x, "auto") == "reference"
    # an explicit kernel choice concerns the PyTorch runtime: the exported graph is standard ops
    assert _modulate.resolve_impl(x, "torch") == "reference"
    assert _modulate.resolve_impl(x, "triton") == "reference"
    with pytest.raises(ValueError, match="impl"):  # still validated
        _modulate.resolve_impl(x, "cuda")


# That an eager first call never imports torch._dynamo is checked in a fresh process by
# tests/test_bench_docs.py::test_first_call_measures_a_fresh_process.


# --------------------------------------------------------------------------------------------
# memory, determinism, layouts, empty inputs


def test_backward_keeps_only_x_and_logits():
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    saved: list[int] = []

    def pack(t):
        saved.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ld_modulate(x, logits)
    assert set(saved) == {x.untyped_storage().data_ptr(), logits.untyped_storage().data_ptr()}
    out.sum().backward()
    assert x.grad is not None and logits.grad is not None


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_bitwise_reproducible_on_cpu(layout, monkeypatch):
    set_chunk_bytes(monkeypatch, 500)
    x = make_x(2, 3, 19, 17, layout, dtype=torch.float32).requires_grad_()
    logits = torch.randn(2, 3, 5, 4, requires_grad=True)
    g = torch.randn(2, 3, 19, 17)
    runs = []
    for _ in range(2):
        out = ld_modulate(x, logits)
        runs.append((out, *torch.autograd.grad(out, (x, logits), g)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_empty_batch():
    x = torch.randn(0, 3, 5, 5, requires_grad=True)
    logits = torch.randn(0, 3, 2, 2, requires_grad=True)
    out = ld_modulate(x, logits)
    assert out.shape == x.shape
    out.sum().backward()
    assert logits.grad is not None and logits.grad.shape == logits.shape


def test_reference_is_plain_formula():
    x = torch.randn(1, 2, 6, 7)
    logits = torch.randn(1, 2, 3, 3)
    want = x * (1.5 + torch.sigmoid(F.interpolate(logits, size=(6, 7), mode="bilinear")))
    torch.testing.assert_close(ld_modulate_reference(x, logits, 1.5, align_corners=False), want)


# --------------------------------------------------------------------------------------------
# the Triton route (the kernels themselves are tested in test_triton_ld.py)


def _recording_kernels(calls: list[tuple]) -> SimpleNamespace:
    def fwd(x, logits, offset, align_corners):
        calls.append(("fwd", x.stride()))
        return _ld_torch.forward(x, logits, offset, align_corners)

    def bwd(g, x, logits, offset, align_corners, need_x, need_logits):
        calls.append(("bwd", x.stride(), need_x, need_logits))
        return _ld_torch.backward(g, x, logits, offset, align_corners, need_x, need_logits)

    return SimpleNamespace(ld_modulate_fwd_triton=fwd, ld_modulate_bwd_triton=bwd)


def test_impl_triton_routes_to_the_kernels_without_copies(monkeypatch):
    calls: list[tuple] = []
    monkeypatch.setattr(_modulate, "_triton_module", _recording_kernels(calls))
    x = make_x(1, 2, 6, 5, "cl").requires_grad_()
    logits = torch.randn(1, 2, 2, 3, dtype=torch.float64)
    out = ld_modulate(x, logits, 2.0, impl="triton")
    assert calls == [("fwd", x.stride())]  # the channels_last strides reach the kernel
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, (x,), g)
    assert calls[1] == ("bwd", x.stride(), True, False)
    want, want_gx, _ = slow_grads(x, logits, g, 2.0, True)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(gx, want_gx)
    ld_modulate(x, logits)  # CPU tensors with impl="auto" never take the kernel
    assert len(calls) == 2


def test_impl_triton_unavailable_raises(monkeypatch):
    monkeypatch.setattr(_modulate, "_triton_module", None)
    monkeypatch.setattr(_modulate, "_triton_error", "ImportError: no triton here")
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(RuntimeError, match=r"impl='triton' needs triton.*no triton here"):
        ld_modulate(x, torch.randn(1, 1, 2, 2), impl="triton")
    assert _modulate.resolve_impl(x, "auto") == "torch"  # the automatic choice falls back


# --------------------------------------------------------------------------------------------
# input validation


def _bad_inputs():
    x = torch.randn(2, 3, 8, 8)
    lg = torch.randn(2, 3, 2, 2)
    return [
        (("x", lg), {}, TypeError, r"x must be a torch.Tensor, got str"),
        ((x[0], lg), {}, ValueError, r"x must be 4-D \(B, C, H, W\), got 3-D"),
        ((x, lg[0]), {}, ValueError, r"logits must be 4-D \(B, C, H, W\), got 3-D"),
        ((x.long(), lg), {}, TypeError, r"x must have a floating dtype, got torch.int64"),
        ((x, torch.randn(2, 4, 2, 2)), {}, ValueError, r"batch and channels of x.*\(2, 4, 2, 2\)"),
        ((x, torch.randn(1, 3, 2, 2)), {}, ValueError, r"batch and channels of x.*\(1, 3, 2, 2\)"),
        ((x, lg, float("nan")), {}, ValueError, r"offset must be a finite number, got nan"),
        ((x, lg.double()), {}, TypeError, r"logits must have the dtype of x \(torch.float32\)"),
        ((x, torch.randn(2, 3, 0, 2)), {}, ValueError, r"logits has an empty side: height and"),
        ((torch.randn(2, 3, 5, 0), x[..., :2, :2]), {}, ValueError, r"x has an empty side"),
        ((x, lg, "1"), {}, TypeError, r"offset must be a float, got str"),
        ((x, lg), {"align_corners": 1}, TypeError, r"align_corners must be a bool, got int"),
        ((x, lg), {"impl": "cuda"}, ValueError, r"impl must be one of .*got 'cuda'"),
    ]


@pytest.mark.parametrize(("args", "kwargs", "exc", "pattern"), _bad_inputs())
def test_bad_inputs_raise_clear_errors(args, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        ld_modulate(*args, **kwargs)
    if "impl" not in kwargs:  # the reference formula checks the same (no silent broadcasting)
        with pytest.raises(exc, match=pattern):
            ld_modulate_reference(*args, **kwargs)


def test_op_rejects_unknown_impl():
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(
        ValueError, match=r"impl must be 'auto', 'torch' or 'triton', got 'reference'"
    ):
        torch.ops.gald.ld_modulate(x, torch.randn(1, 1, 2, 2), 1.0, True, "reference")


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap's per-sample fallback
def test_jacrev_matches_the_reference():
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64)
    logits = torch.randn(1, 2, 2, 3, dtype=torch.float64)
    for wrt in (0, 1):
        fused = torch.func.jacrev(lambda a, b: ld_modulate(a, b, impl="torch"), argnums=wrt)
        ref = torch.func.jacrev(lambda a, b: ld_modulate_reference(a, b), argnums=wrt)
        torch.testing.assert_close(fused(x, logits), ref(x, logits))


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap's per-sample fallback
def test_vmap_and_per_sample_gradients_match_the_reference():
    x = torch.randn(3, 2, 5, 4, dtype=torch.float64)
    logits = torch.randn(3, 2, 2, 3, dtype=torch.float64)
    one = lambda a, b: ld_modulate(a[None], b[None], impl="torch")[0]  # noqa: E731
    torch.testing.assert_close(torch.func.vmap(one)(x, logits), ld_modulate_reference(x, logits))
    loss = lambda a, b: one(a, b).square().sum()  # noqa: E731
    per_sample = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)))(x, logits)
    xr, lr = x.clone().requires_grad_(), logits.clone().requires_grad_()
    ld_modulate_reference(xr, lr).square().sum().backward()  # samples are independent
    torch.testing.assert_close(per_sample[0], xr.grad)
    torch.testing.assert_close(per_sample[1], lr.grad)
    with pytest.raises(NotImplementedError, match="jvp"):  # no forward-mode formula
        torch.func.jacfwd(lambda t: ld_modulate(x, t, impl="torch"))(logits)


def test_the_raw_ops_check_their_inputs_too() -> None:
    # torch.ops.gald.* called directly, eagerly and under torch.compile: no silent scrambling
    x, swapped = torch.randn(2, 3, 8, 8), torch.randn(3, 2, 2, 2)
    with pytest.raises(ValueError, match=r"logits must have the batch and channels of x"):
        torch.ops.gald.ld_modulate(x, swapped, 1.0, True, "torch")
    with pytest.raises(TypeError, match=r"logits must have the dtype of x"):
        torch.ops.gald.ld_modulate(
            x, torch.randn(2, 3, 2, 2, dtype=torch.float64), 1.0, True, "torch"
        )
    with pytest.raises(ValueError, match=r"grad must have the shape and dtype of x"):
        torch.ops.gald.ld_modulate_backward(
            torch.randn(2, 3, 8, 7), x, torch.randn(2, 3, 2, 2), 1.0, True, "torch", True, True
        )
    compiled = torch.compile(
        lambda a, b: torch.ops.gald.ld_modulate(a, b, 1.0, True, "torch"), backend="eager"
    )
    with pytest.raises(Exception, match=r"logits must have the batch and channels of x"):
        compiled(x, swapped)
    float8 = getattr(torch, "float8_e5m2", None)
    if float8 is not None:
        with pytest.raises(TypeError, match=r"x must be float16, bfloat16, float32 or float64"):
            gald.ops.ld_modulate(x.to(float8), torch.randn(2, 3, 2, 2).to(float8))


def test_an_eager_call_does_not_import_the_exporters() -> None:
    # torch.onnx is imported lazily; asking it whether an export runs would import it (a
    # noticeable share of the first call). A fresh process: this one may have imported it.
    script = (
        "import sys, torch, gald\n"
        "gald.GALD(16)(torch.randn(1, 16, 9, 9))\n"
        "print('torch.onnx' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_the_reference_formula_is_chosen_while_onnx_exports(monkeypatch) -> None:
    import torch.onnx

    assert _modulate._exporting() is False
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert _modulate._exporting() is True


def test_a_call_without_gradients_skips_the_function_but_not_forward_mode(monkeypatch) -> None:
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    logits = torch.randn(2, 3, 3, 2, dtype=torch.float64)
    calls: list[int] = []
    real = _modulate._LDModulate.apply
    monkeypatch.setattr(
        _modulate._LDModulate, "apply", lambda *args: (calls.append(1), real(*args))[1]
    )
    with torch.no_grad():
        out = ld_modulate(x, logits, 2.0, impl="torch")
    torch.testing.assert_close(out, ld_modulate_reference(x, logits, 2.0))
    assert calls == []  # the bare op: nothing to differentiate
    # a forward-mode tangent is differentiation too, with or without grad mode: refused by name
    # (the bare op would drop the tangent and give a zero derivative)
    for grad_mode in (torch.no_grad, torch.enable_grad):
        with grad_mode(), torch.autograd.forward_ad.dual_level():
            dual = torch.autograd.forward_ad.make_dual(logits, torch.ones_like(logits))
            with pytest.raises(NotImplementedError, match="jvp"):
                ld_modulate(x, dual, 2.0, impl="torch")
    assert len(calls) == 2
    out = ld_modulate(x.requires_grad_(), logits, 2.0, impl="torch")
    assert len(calls) == 3 and out.grad_fn is not None


def test_the_raw_op_refuses_forward_mode_tangents_instead_of_dropping_them() -> None:
    x, logits = torch.randn(1, 2, 5, 5), torch.randn(1, 2, 2, 2)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        with pytest.raises(NotImplementedError, match=r"gald::ld_modulate has no forward-mode"):
            torch.ops.gald.ld_modulate(dual, logits, 2.0, True, "torch")
        with pytest.raises(NotImplementedError, match=r"ld_modulate_backward has no forward"):
            torch.ops.gald.ld_modulate_backward(dual, x, logits, 2.0, True, "torch", True, True)
    # outside forward mode both run
    assert torch.ops.gald.ld_modulate(x, logits, 2.0, True, "torch").shape == x.shape


def test_logits_on_another_device_are_refused() -> None:
    with pytest.raises(ValueError, match=r"logits must be on the device of x \(cpu\), got meta"):
        ld_modulate(torch.randn(1, 2, 8, 8), torch.randn(1, 2, 3, 3, device="meta"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_reference_rounds_once(dtype) -> None:
    """The reference (what ONNX export and tracing compute) interpolates half logits in float32
    and rounds the product once: bit for bit the float64 result rounded to the half type."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 37, 41, generator=gen).to(dtype)
    logits = (3 * torch.randn(2, 8, 5, 6, generator=gen)).to(dtype)
    exact = ld_modulate_reference(x.double(), logits.double(), 1.0).to(dtype)
    assert torch.equal(ld_modulate_reference(x, logits, 1.0), exact)


def _triton_stub(calls: list[str]) -> SimpleNamespace:
    """Triton "kernels" that record their calls and compute with the torch kernel."""

    def fwd(x, logits, offset, align_corners):
        calls.append("fwd")
        return _ld_torch.forward(x, logits, offset, align_corners)

    def bwd(grad, x, logits, offset, align_corners, need_x, need_logits):
        calls.append("bwd")
        return _ld_torch.backward(grad, x, logits, offset, align_corners, need_x, need_logits)

    return SimpleNamespace(
        ld_modulate_fwd_triton=fwd,
        ld_modulate_bwd_triton=bwd,
        bwd_window_fits=lambda *a: True,
        unsupported_dtype=lambda dtype: None,
    )


@pytest.mark.parametrize("impl", ["auto", None])
def test_auto_runs_the_kernel_auto_resolves_to_in_forward_and_backward(monkeypatch, impl):
    """On a machine where 'auto' means Triton (a CUDA GPU with a working Triton), the default
    call (impl="auto" or None) runs the Triton forward and backward: the op resolves the
    choice in both."""
    calls: list[str] = []
    stub = _triton_stub(calls)
    monkeypatch.setattr(_modulate, "_auto_impl", lambda x: "triton")
    monkeypatch.setattr(_modulate, "_require_triton", lambda: stub)
    x = torch.randn(2, 3, 6, 7, requires_grad=True)
    logits = torch.randn(2, 3, 2, 3, requires_grad=True)
    out = ld_modulate(x, logits, impl=impl)
    out.sum().backward()
    assert calls == ["fwd", "bwd"]
    # and without autograd (the bare op)
    calls.clear()
    with torch.no_grad():
        ld_modulate(x, logits, impl=impl)
    assert calls == ["fwd"]


def test_no_trial_launch_inside_a_cuda_graph_capture(monkeypatch):
    """A trial launch (allocations, a sync on failure) must not run while a CUDA graph is
    being captured; the capture would be invalidated or the choice wrongly remembered."""
    monkeypatch.setattr(_modulate, "_launches", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    launched = []

    def boom(*args):
        launched.append(args)
        raise RuntimeError("launch during capture")

    stub = SimpleNamespace(ld_modulate_fwd_triton=boom, ld_modulate_bwd_triton=boom)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _modulate._triton_launches(torch.device("cuda", 0), torch.float32, stub) is True
    assert launched == [] and _modulate._launches == {}
