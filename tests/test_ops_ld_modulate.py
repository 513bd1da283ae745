"""gald.ops.ld_modulate: every implementation against a slow per-pixel reference written here.

The reference computes the bilinear weights of every output pixel with Python scalars (the
PyTorch convention, see ``_source``) and gathers the four neighbours; autograd through it gives
the reference gradients. The chunked CPU path is exercised with tiny chunk sizes so that even
small inputs cross many chunk boundaries.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import gald
from gald.ops import _ld_torch, ld_modulate, ld_modulate_reference

# ``gald.ops.ld_modulate`` is the function; the module of the same name holds the dispatch
LD_MOD = importlib.import_module("gald.ops.ld_modulate")


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


def slow_ld(x: torch.Tensor, logits: torch.Tensor, offset: float, align_corners: bool):
    mask = torch.sigmoid(slow_upsample(logits, tuple(x.shape[-2:]), align_corners))
    return x * (offset + mask)


def slow_grads(x, logits, g, offset, align_corners):
    xr = x.detach().double().requires_grad_()
    lr = logits.detach().double().requires_grad_()
    out = slow_ld(xr, lr, offset, align_corners)
    gx, gl = torch.autograd.grad(out, (xr, lr), g.double())
    return out.detach(), gx, gl


@contextmanager
def chunk_elems(n: int) -> Iterator[None]:
    old = _ld_torch.CPU_CHUNK_ELEMS
    _ld_torch.CPU_CHUNK_ELEMS = n
    try:
        yield
    finally:
        _ld_torch.CPU_CHUNK_ELEMS = old


def make_x(b, c, hh, ww, layout, dtype=torch.float64, gen=None):
    if layout == "slice":  # non-contiguous: every other column of a wider tensor
        return torch.randn(b, c, hh, 2 * ww, dtype=dtype, generator=gen)[..., ::2]
    x = torch.randn(b, c, hh, ww, dtype=dtype, generator=gen)
    if layout == "cl":
        return x.contiguous(memory_format=torch.channels_last)
    return x


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
    layout=st.sampled_from(["nchw", "cl", "slice"]),
    impl=st.sampled_from(["reference", "torch", None]),
    chunk=st.sampled_from([1, 7, 64, 1 << 18]),
    seed=st.integers(0, 2**16),
)
def test_every_impl_matches_slow_reference(
    b, c, hh, ww, h, w, align_corners, offset, layout, impl, chunk, seed
):
    gen = torch.Generator().manual_seed(seed)
    x = make_x(b, c, hh, ww, layout, gen=gen)
    logits = 2 * torch.randn(b, c, h, w, dtype=torch.float64, generator=gen)
    g = torch.randn(b, c, hh, ww, dtype=torch.float64, generator=gen)
    want, want_gx, want_gl = slow_grads(x, logits, g, offset, align_corners)

    xr, lr = x.clone().requires_grad_(), logits.clone().requires_grad_()
    with chunk_elems(chunk):
        out = ld_modulate(xr, lr, offset, align_corners=align_corners, impl=impl)
        gx, gl = torch.autograd.grad(out, (xr, lr), g)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, want_gx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gl, want_gl, rtol=1e-12, atol=1e-12)
    if layout == "cl" and impl != "reference":
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_float32_matches_reference_to_rounding(layout):
    gen = torch.Generator().manual_seed(1)
    x = make_x(2, 5, 23, 19, layout, dtype=torch.float32, gen=gen)
    logits = torch.randn(2, 5, 4, 3, generator=gen)
    g = torch.randn(2, 5, 23, 19, generator=gen)
    want, want_gx, want_gl = slow_grads(x, logits, g, 1.0, True)
    xr, lr = x.clone().requires_grad_(), logits.clone().requires_grad_()
    with chunk_elems(100):
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
    out = ld_modulate(xr, lr, impl="torch")
    gx, gl = torch.autograd.grad(out, (xr, lr), g)
    assert out.dtype == gx.dtype == gl.dtype == dtype
    eps = torch.finfo(dtype).eps
    # one rounding of the result (and of the half-precision upstream gradient product)
    torch.testing.assert_close(out.double(), want, rtol=eps, atol=eps)
    torch.testing.assert_close(gx.double(), want_gx, rtol=eps, atol=eps)
    # grad_logits sums many terms: accumulated in float32, one rounding at the end
    torch.testing.assert_close(
        gl.double(), want_gl, rtol=eps, atol=eps * want_gl.abs().max().item()
    )


# --------------------------------------------------------------------------------------------
# gradcheck of the custom autograd (float64)

GRADCHECK_CASES = [
    # (B, C, H, W, h, w, layout)
    (1, 2, 1, 6, 1, 3, "nchw"),  # H == 1
    (1, 2, 5, 1, 2, 1, "nchw"),  # W == 1
    (2, 1, 4, 5, 1, 1, "nchw"),  # 1x1 logits
    (1, 2, 5, 7, 3, 2, "nchw"),  # non-square, odd
    (1, 1, 3, 4, 6, 9, "nchw"),  # h > H: downsampling
    (1, 2, 5, 6, 2, 3, "slice"),  # non-contiguous x
    (2, 3, 5, 4, 2, 3, "cl"),  # channels_last x
]


@pytest.mark.parametrize("offset", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: "x".join(map(str, c)))
def test_gradcheck(case, offset):
    b, c, hh, ww, h, w, layout = case
    x = make_x(b, c, hh, ww, layout).requires_grad_()
    logits = torch.randn(b, c, h, w, dtype=torch.float64, requires_grad=True)
    for ac in (True, False):
        with chunk_elems(5):
            assert torch.autograd.gradcheck(
                lambda x, lg, ac=ac: ld_modulate(x, lg, offset, align_corners=ac, impl="torch"),
                (x, logits),
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
# custom op registration, compile, export, ONNX


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_opcheck(layout):
    x = make_x(2, 3, 7, 6, layout, dtype=torch.float32).requires_grad_()
    logits = torch.randn(2, 3, 3, 2, requires_grad=True)
    torch.library.opcheck(torch.ops.gald.ld_modulate.default, (x, logits, 1.5, True, "torch"))
    g = torch.randn_like(x)
    for need in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(
            torch.ops.gald.ld_modulate_backward.default,
            (g, x.detach(), logits.detach(), 1.5, False, "torch", *need),
        )


def test_compile_fullgraph_gald_matches_eager():
    torch._dynamo.reset()
    model = gald.GALD(8, "cgnl", ga_kwargs={"groups": 2})
    x = torch.randn(2, 8, 17, 15)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    model.train()
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn_like(x)
    compiled(xc).backward(g)
    model(xe).backward(g)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-4, atol=1e-4)


def test_compile_inductor_op_matches_eager():
    torch._dynamo.reset()

    def fn(x, logits):
        return ld_modulate(x, logits, 2.0) * 2

    x = torch.randn(2, 3, 9, 7)
    logits = torch.randn(2, 3, 2, 3)
    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(x, logits), fn(x, logits))


def test_torch_export_local_distribution_runs():
    ld = gald.LocalDistribution(4).eval()
    x = torch.randn(2, 4, 20, 18)
    ep = torch.export.export(ld, (x,))
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert torch.ops.gald.ld_modulate.default in targets  # the fused op, not its decomposition
    torch.testing.assert_close(ep.module()(x), ld(x))


def test_onnx_export_uses_standard_ops_and_matches_eager():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    ld = gald.LocalDistribution(4).eval()
    with torch.no_grad():
        for m in ld.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 4, 20, 18)
    program = torch.onnx.export(ld, (x,), dynamo=True, verbose=False)
    model = program.model_proto
    onnx.checker.check_model(model)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert "Sigmoid" in {n.op_type for n in model.graph.node}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), ld(x).detach(), rtol=1e-4, atol=1e-5)


def test_exporting_and_tracing_take_the_reference(monkeypatch):
    x = torch.randn(1, 2, 5, 5)
    assert LD_MOD.resolve_impl(x, None) == "torch"
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert LD_MOD.resolve_impl(x, None) == "reference"
    assert LD_MOD.resolve_impl(x, "torch") == "torch"  # an explicit choice is kept


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
    assert x.grad is not None
    assert logits.grad is not None


def test_deterministic_mode():
    x = torch.randn(2, 3, 19, 17, requires_grad=True)
    logits = torch.randn(2, 3, 5, 4, requires_grad=True)
    g = torch.randn(2, 3, 19, 17)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            with chunk_elems(50):
                out = ld_modulate(x, logits)
                runs.append((out, *torch.autograd.grad(out, (x, logits), g)))
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_gradient_memory_format_follows_x():
    x = make_x(1, 4, 6, 5, "cl", dtype=torch.float32).requires_grad_()
    logits = torch.randn(1, 4, 2, 2, requires_grad=True)
    out = ld_modulate(x, logits)
    out.backward(torch.randn_like(out))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert x.grad is not None
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


def test_empty_batch():
    x = torch.randn(0, 3, 5, 5, requires_grad=True)
    logits = torch.randn(0, 3, 2, 2, requires_grad=True)
    out = ld_modulate(x, logits)
    assert out.shape == x.shape
    out.sum().backward()
    assert logits.grad is not None
    assert logits.grad.shape == logits.shape


def test_reference_is_plain_formula():
    x = torch.randn(1, 2, 6, 7)
    logits = torch.randn(1, 2, 3, 3)
    want = x * (1.5 + torch.sigmoid(F.interpolate(logits, size=(6, 7), mode="bilinear")))
    torch.testing.assert_close(ld_modulate_reference(x, logits, 1.5, align_corners=False), want)


# --------------------------------------------------------------------------------------------
# the Triton route


def _fake_triton(calls: list[str]) -> SimpleNamespace:
    def fwd(x, logits, offset, align_corners):
        assert x.is_contiguous()
        assert logits.is_contiguous()
        calls.append("fwd")
        return ld_modulate_reference(x, logits, offset, align_corners=align_corners)

    def bwd(g, x, logits, offset, align_corners, need_x, need_logits):
        assert g.is_contiguous()
        assert x.is_contiguous()
        calls.append(f"bwd{int(need_x)}{int(need_logits)}")
        # a custom op's kernel runs below autograd: stand in with the torch path's backward
        return _ld_torch.backward(g, x, logits, offset, align_corners, need_x, need_logits)

    return SimpleNamespace(
        TRITON_AVAILABLE=True, ld_modulate_fwd_triton=fwd, ld_modulate_bwd_triton=bwd
    )


def test_impl_triton_routes_to_the_kernels(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(LD_MOD, "_triton_module", _fake_triton(calls))
    x = make_x(1, 2, 6, 5, "cl", dtype=torch.float64).requires_grad_()
    logits = torch.randn(1, 2, 2, 3, dtype=torch.float64)
    out = ld_modulate(x, logits, 2.0, impl="triton")
    assert calls == ["fwd"]
    assert out.is_contiguous(memory_format=torch.channels_last)  # the layout of x is kept
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, (x,), g)
    assert calls == ["fwd", "bwd10"]
    want, want_gx, _ = slow_grads(x, logits, g, 2.0, True)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(gx, want_gx)
    # CPU tensors with impl=None never take the kernel
    ld_modulate(x, logits)
    assert calls == ["fwd", "bwd10"]


def test_impl_triton_unavailable_raises(monkeypatch):
    monkeypatch.setattr(LD_MOD, "_triton_module", None)
    monkeypatch.setattr(LD_MOD, "_triton_error", "ImportError: no triton here")
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(RuntimeError, match=r"impl='triton' needs triton.*no triton here"):
        ld_modulate(x, torch.randn(1, 1, 2, 2), impl="triton")
    # the automatic choice falls back to the torch path without an error
    assert LD_MOD.resolve_impl(x, None) == "torch"


def _interpreted_kernels() -> ModuleType:
    pytest.importorskip("triton")
    path = Path(LD_MOD.__file__).with_name("_triton_ld.py")
    if not path.exists():
        pytest.skip("the Triton kernels are not in this checkout")
    spec = importlib.util.spec_from_file_location("gald.ops._triton_ld_interp_ops_test", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        spec.loader.exec_module(module)
    return module


def test_impl_triton_interpreted_kernel_matches_reference(monkeypatch):
    kernels = _interpreted_kernels()
    monkeypatch.setattr(LD_MOD, "_triton_module", kernels)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 5, 7, dtype=torch.float64, generator=gen).requires_grad_()
    logits = torch.randn(1, 2, 2, 3, dtype=torch.float64, generator=gen).requires_grad_()
    g = torch.randn(1, 2, 5, 7, dtype=torch.float64, generator=gen)
    out = ld_modulate(x, logits, 1.0, impl="triton")
    gx, gl = torch.autograd.grad(out, (x, logits), g)
    want, want_gx, want_gl = slow_grads(x, logits, g, 1.0, True)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(gx, want_gx)
    torch.testing.assert_close(gl, want_gl)


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
        ((x, lg.double()), {}, TypeError, r"logits must have the dtype of x \(torch.float32\)"),
        ((x, torch.randn(2, 3, 0, 2)), {}, ValueError, r"logits must have h, w >= 1"),
        ((x, lg, "1"), {}, TypeError, r"offset must be a float, got str"),
        ((x, lg), {"align_corners": 1}, TypeError, r"align_corners must be a bool, got int"),
        ((x, lg), {"impl": "cuda"}, ValueError, r"impl must be None or one of .*got 'cuda'"),
    ]


@pytest.mark.parametrize(("args", "kwargs", "exc", "pattern"), _bad_inputs())
def test_bad_inputs_raise_clear_errors(args, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        ld_modulate(*args, **kwargs)


def test_op_rejects_unknown_impl():
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match=r"impl must be 'torch' or 'triton', got 'reference'"):
        torch.ops.gald.ld_modulate(x, torch.randn(1, 1, 2, 2), 1.0, True, "reference")


# --------------------------------------------------------------------------------------------
# the benchmark's comparison runs and the library equals the authors' formulation


def test_ld_benchmark_tiny():
    from gald.bench import ld as bench_ld

    res = bench_ld.run((2, 8, 19, 17), 1)
    assert res["checks"]["train_out_rel_diff"] < 1e-5
    assert res["checks"]["train_grad_x_rel_diff"] < 1e-4
    assert res["checks"]["eval_out_rel_diff"] < 1e-5
    assert 0 < res["memory_ratio"] < 1
    assert res["train_ms"]["library"] > 0
    assert "train step" in bench_ld.render(res)
