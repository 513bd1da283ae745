"""The Triton kernels of the fused LD op, run by Triton's interpreter on CPU tensors.

How the interpreter is switched on: ``@triton.jit`` reads ``TRITON_INTERPRET`` when it
*decorates* a kernel, i.e. when the module defining the kernel is imported, not when triton
itself is imported or when the kernel is launched. Setting the variable at the top of this file
is therefore not enough: another test module (or ``gald.ops``) may already have imported
``gald.ops._triton_ld`` with compiled-GPU kernels, and a ``conftest.py`` setting would leak
into every other module (on a CUDA runner it would silently turn the real kernels into slow
interpreted ones). Instead the ``kernels`` fixture sets the variable only while it executes a
*fresh copy* of ``_triton_ld.py`` under a private module name (inside the ``gald.ops`` package,
so its relative imports resolve); the copy's kernels are ``InterpretedFunction``s, whatever
was imported before, and the process environment is restored right after. The interpreter
does not read the variable again at launch time.

Every check compares against a slow reference written here with plain ops
(``F.interpolate`` + ``torch.sigmoid`` + autograd), at small shapes: the interpreter is slow.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from _helpers import require_triton_interpreter
from gald.ops import _modulate, _triton_ld, ld_modulate

KERNEL_FILE = Path(_triton_ld.__file__)

# (B, C, H, W, h, w): odd and non-square sizes, H or W equal to 1, logits of 1x1, logits larger
# than x (h > H: the interpolation then downsamples), several column tiles (W > 16).
SHAPES = [
    (1, 2, 5, 7, 2, 3),
    (1, 2, 1, 7, 2, 3),
    (1, 2, 5, 1, 3, 2),
    (2, 2, 5, 7, 1, 1),
    (1, 1, 3, 2, 20, 25),
    (1, 3, 3, 37, 2, 5),
]
LAYOUTS = ["nchw", "cl", "slice"]


@pytest.fixture(scope="module")
def kernels() -> ModuleType:
    require_triton_interpreter()
    spec = importlib.util.spec_from_file_location("gald.ops._triton_ld_interpreted", KERNEL_FILE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        spec.loader.exec_module(module)
    return module


def reference(x: torch.Tensor, logits: torch.Tensor, offset: float, align_corners: bool):
    mask = torch.sigmoid(
        F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=align_corners)
    )
    return x * (offset + mask)


def reference_grads(x, logits, g, offset, align_corners):
    xr = x.detach().clone().requires_grad_()
    lr = logits.detach().clone().requires_grad_()
    out = reference(xr, lr, offset, align_corners)
    gx, gl = torch.autograd.grad(out, (xr, lr), g)
    return out.detach(), gx, gl


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "cl":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "slice":  # a strided view: every other column of a wider tensor
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


def random_inputs(shape, dtype, seed=0, layout="nchw"):
    b, c, H, W, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, H, W, generator=gen, dtype=torch.float64).to(dtype)
    logits = (2 * torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)).to(dtype)
    g = torch.randn(b, c, H, W, generator=gen, dtype=torch.float64).to(dtype)
    return _layout(x, layout), _layout(logits, layout), _layout(g, layout)


def tol(dtype):
    if dtype == torch.float64:
        return {"rtol": 1e-12, "atol": 1e-12}
    return {"rtol": 1e-5, "atol": 1e-5}


def test_kernels_run_in_the_interpreter(kernels):
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(kernels._ld_fwd_kernel, InterpretedFunction)
    assert isinstance(kernels._ld_bwd_kernel, InterpretedFunction)
    assert kernels.TRITON_AVAILABLE


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_backward_match_reference(kernels, shape, layout):
    for seed, (offset, align_corners) in enumerate(((0.0, True), (2.0, False))):
        x, logits, g = random_inputs(shape, torch.float64, seed, layout)
        want, want_gx, want_gl = reference_grads(x, logits, g, offset, align_corners)

        out = kernels.ld_modulate_fwd_triton(x, logits, offset, align_corners)
        gx, gl = kernels.ld_modulate_bwd_triton(g, x, logits, offset, align_corners, True, True)

        assert out.dtype == gx.dtype == gl.dtype == torch.float64
        # outputs are empty_like of the inputs: dense inputs keep their strides
        if layout != "slice":
            assert out.stride() == x.stride()
            assert gx.stride() == x.stride()
            assert gl.stride() == logits.stride()
        torch.testing.assert_close(out, want, **tol(torch.float64))
        torch.testing.assert_close(gx, want_gx, **tol(torch.float64))
        torch.testing.assert_close(gl, want_gl, **tol(torch.float64))


@pytest.mark.parametrize(
    ("layout", "shape"), [("nchw", (1, 2, 17, 18, 3, 5)), ("cl", (1, 17, 3, 18, 2, 5))]
)
def test_many_tiles_per_axis(kernels, layout, shape, monkeypatch):
    # small tile limits, so a small tensor spans several tiles along every tiled axis (rows and
    # columns for NCHW, columns and channels for channels_last)
    monkeypatch.setattr(kernels, "_FWD_MAX_INNER", 8)
    monkeypatch.setattr(kernels, "_FWD_TILE_ELEMS", 64)
    monkeypatch.setattr(kernels, "_BWD_MAX_BLOCK", 16)
    monkeypatch.setattr(kernels, "_BWD_MAX_ROWS", 16)
    x, logits, g = random_inputs(shape, torch.float64, 5, layout)
    want, want_gx, want_gl = reference_grads(x, logits, g, 1.0, True)
    out = kernels.ld_modulate_fwd_triton(x, logits, 1.0, True)
    gx, gl = kernels.ld_modulate_bwd_triton(g, x, logits, 1.0, True, True, True)
    torch.testing.assert_close(out, want, **tol(torch.float64))
    torch.testing.assert_close(gx, want_gx, **tol(torch.float64))
    torch.testing.assert_close(gl, want_gl, **tol(torch.float64))


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_backward_flags_select_the_gradients(kernels, layout):
    x, logits, g = random_inputs((1, 2, 5, 7, 2, 3), torch.float64, layout=layout)
    both = kernels.ld_modulate_bwd_triton(g, x, logits, 1.0, True, True, True)
    only_x = kernels.ld_modulate_bwd_triton(g, x, logits, 1.0, True, True, False)
    only_l = kernels.ld_modulate_bwd_triton(g, x, logits, 1.0, True, False, True)
    assert only_x[1] is None
    assert only_l[0] is None
    assert kernels.ld_modulate_bwd_triton(g, x, logits, 1.0, True, False, False) == (None, None)
    # grad_x alone runs through the forward kernel applied to g; the same values either way
    torch.testing.assert_close(only_x[0], both[0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(only_l[1], both[1], rtol=0, atol=0)


def test_offset_is_exact_in_fp64(kernels):
    # an offset that fp32 cannot represent must not be rounded for fp64 inputs
    x, logits, g = random_inputs((1, 2, 5, 7, 2, 3), torch.float64)
    offset = 0.1
    want, want_gx, _ = reference_grads(x, logits, g, offset, True)
    out = kernels.ld_modulate_fwd_triton(x, logits, offset, True)
    gx, _ = kernels.ld_modulate_bwd_triton(g, x, logits, offset, True, True, False)
    torch.testing.assert_close(out, want, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(gx, want_gx, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_single_and_half_precision_compute_in_fp32(kernels, layout, dtype):
    # The kernel computes in fp32 and rounds once, so it lies within half an ulp of the fp32
    # reference evaluated on the same (already rounded) inputs. Triton's interpreter (3.x)
    # converts fp32 to bf16 by truncation where the GPU rounds to nearest: allow a full ulp there.
    # channels_last: 18 channels, more than the smallest channel block of the backward (16);
    # NCHW: each plane is its own program, three suffice
    shape = (1, 18, 6, 21, 2, 3) if layout == "cl" else (1, 3, 6, 21, 2, 3)
    x, logits, g = random_inputs(shape, dtype, layout=layout)
    want, want_gx, want_gl = reference_grads(x.double(), logits.double(), g.double(), 1.0, False)
    out = kernels.ld_modulate_fwd_triton(x, logits, 1.0, False)
    gx, gl = kernels.ld_modulate_bwd_triton(g, x, logits, 1.0, False, True, True)
    assert out.dtype == gx.dtype == gl.dtype == dtype
    rounding = torch.finfo(dtype).eps / (1 if dtype == torch.bfloat16 else 2)  # relative bound
    for got, ref in ((out, want), (gx, want_gx), (gl, want_gl)):
        err = (got.double() - ref).abs()
        assert bool((err <= rounding * ref.abs() * 1.01 + 1e-6 * ref.abs().max()).all())


@settings(max_examples=8, deadline=None)
@given(
    b=st.integers(1, 2),
    c=st.integers(1, 3),
    H=st.integers(1, 12),
    W=st.integers(1, 20),
    h=st.integers(1, 8),
    w=st.integers(1, 8),
    align_corners=st.booleans(),
    offset=st.sampled_from([0.0, 1.0, -0.5]),
    layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_reference(
    kernels, b, c, H, W, h, w, align_corners, offset, layout, seed
):
    x, logits, g = random_inputs((b, c, H, W, h, w), torch.float64, seed, layout)
    want, want_gx, want_gl = reference_grads(x, logits, g, offset, align_corners)
    out = kernels.ld_modulate_fwd_triton(x, logits, offset, align_corners)
    gx, gl = kernels.ld_modulate_bwd_triton(g, x, logits, offset, align_corners, True, True)
    torch.testing.assert_close(out, want, **tol(torch.float64))
    torch.testing.assert_close(gx, want_gx, **tol(torch.float64))
    torch.testing.assert_close(gl, want_gl, **tol(torch.float64))


def test_through_the_op_and_autograd(kernels, monkeypatch):
    # ld_modulate(impl="triton") with the interpreted kernels: a channels_last x end to end
    monkeypatch.setattr(_modulate, "_triton_module", kernels)
    x, logits, g = random_inputs((1, 3, 6, 5, 2, 2), torch.float64, layout="cl")
    xr, lr = x.clone().requires_grad_(), logits.clone().requires_grad_()
    out = ld_modulate(xr, lr, 1.0, impl="triton")
    gx, gl = torch.autograd.grad(out, (xr, lr), g)
    want, want_gx, want_gl = reference_grads(x, logits, g, 1.0, True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(gx, want_gx)
    torch.testing.assert_close(gl, want_gl)


# the interpreter's numpy exp overflows to inf for a saturated logit (1 / (1 + inf) = 0, the
# right sigmoid) and says so; the GPU does the same silently
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_infinite_logits_saturate_in_the_triton_kernels(kernels, monkeypatch):
    # a logit of +-inf gives what a very large finite one does, as in the torch kernel
    monkeypatch.setattr(_modulate, "_triton_module", kernels)
    x, logits, g = random_inputs((2, 2, 7, 6, 3, 3), torch.float64, seed=5)
    logits[0, 0, 0, 0], logits[1, 1, 2, 2], logits[0, 1, 1, 2] = math.inf, -math.inf, -math.inf
    xr, lr = x.clone().requires_grad_(), logits.clone().requires_grad_()
    out = ld_modulate(xr, lr, 2.0, impl="triton")
    gx, gl = torch.autograd.grad(out, (xr, lr), g)
    want, want_gx, want_gl = reference_grads(x, logits.clamp(-1e4, 1e4), g, 2.0, True)
    assert torch.isfinite(out).all() and torch.isfinite(gl).all()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(gx, want_gx)
    torch.testing.assert_close(gl, want_gl)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_and_opcheck_through_the_op(kernels, monkeypatch, layout):
    # the custom op's autograd formula and registration with the Triton kernels behind it
    monkeypatch.setattr(_modulate, "_triton_module", kernels)
    x, logits, _ = random_inputs((1, 2, 5, 4, 2, 3), torch.float64, seed=3, layout=layout)
    x.requires_grad_()
    logits.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, lg: ld_modulate(x, lg, 1.5, align_corners=False, impl="triton"),
        (x, logits),
        fast_mode=True,
    )
    torch.library.opcheck(
        torch.ops.gald.ld_modulate.default,
        (x, logits, 1.5, True, "triton"),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_launches_run_on_the_device_of_the_input(kernels, monkeypatch):
    # every launch happens inside _on_device(x), which makes x's CUDA device current (not the
    # current device); on CPU tensors (the interpreter) it is a no-op
    entered: list[torch.device] = []
    real = kernels._on_device

    def recording(x):
        entered.append(x.device)
        return real(x)

    monkeypatch.setattr(kernels, "_on_device", recording)
    x, logits, g = random_inputs((1, 2, 5, 4, 2, 3), torch.float32)
    kernels.ld_modulate_fwd_triton(x, logits, 1.0, True)
    n_fwd = len(entered)
    kernels.ld_modulate_bwd_triton(g, x, logits, 1.0, True, True, True)
    assert n_fwd >= 1
    assert len(entered) > n_fwd
    assert set(entered) == {x.device}

    made_current: list[object] = []

    class FakeGuard:
        def __init__(self, device):
            made_current.append(device)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeGuard)
    cuda1 = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    with real(cuda1):
        pass
    assert made_current == [torch.device("cuda", 1)]


def test_empty_batch(kernels):
    x, logits, g = random_inputs((0, 2, 5, 7, 2, 3), torch.float32)
    assert kernels.ld_modulate_fwd_triton(x, logits, 1.0, True).shape == x.shape
    gx, gl = kernels.ld_modulate_bwd_triton(g, x, logits, 1.0, True, True, True)
    assert gx.shape == x.shape
    assert gl.shape == logits.shape


# --- ahead-of-time compilation for a CUDA target (no GPU needed) -------------------------------


@pytest.mark.parametrize(
    ("dtype", "channels_inner"),
    [(torch.float32, False), (torch.bfloat16, True), (torch.float16, False), (torch.float64, True)],
    ids=["fp32-nchw", "bf16-cl", "fp16-nchw", "fp64-cl"],
)
def test_kernels_compile_for_cuda(dtype, channels_inner):
    # The interpreter does not lower anything; this runs the real pipeline (Triton IR -> PTX ->
    # ptxas cubin for sm_90) so GPU-only compile errors show up on CPU CI too.
    triton = pytest.importorskip("triton", reason="triton is not installed")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.runtime.jit import JITFunction
    except ImportError as exc:
        pytest.skip(f"this triton has no ahead-of-time compile API: {exc}")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton ships no ptxas")
    if not isinstance(_triton_ld._ld_fwd_kernel, JITFunction):
        pytest.skip("gald.ops._triton_ld was imported with TRITON_INTERPRET=1")
    refused = _triton_ld.unsupported_dtype(dtype)
    if refused is not None:  # the dispatcher and the entry points refuse it (test below)
        pytest.skip(f"the kernels refuse {dtype} on this triton: {refused}")

    ty = {
        torch.float32: "fp32",
        torch.bfloat16: "bf16",
        torch.float16: "fp16",
        torch.float64: "fp64",
    }
    data = "*" + ty[dtype]
    acc = "*fp64" if dtype == torch.float64 else "*fp32"
    cdt = _triton_ld._compute_dtype(dtype)
    block_a, block_j, win = _triton_ld._bwd_tiles(512, 97, 97, 11, True, channels_inner)
    cases = [
        (_triton_ld._ld_fwd_kernel, {"BLOCK_A": 16, "BLOCK_B": 128}),
        (
            _triton_ld._ld_bwd_kernel,
            {"NEED_X_GRAD": True, "BLOCK_A": block_a, "BLOCK_J": block_j, "WIN": win},
        ),
    ]
    for kernel, consts in cases:
        consts = {"ALIGN_CORNERS": True, "CDT": cdt, "CHANNELS_INNER": channels_inner, **consts}
        signature = {}
        for p in kernel.params:
            if p.is_constexpr:
                signature[p.name] = "constexpr"
            elif p.name.endswith("_ptr"):
                signature[p.name] = acc if p.name in ("off_ptr", "u_ptr") else data
            else:
                signature[p.name] = "i64" if p.name.startswith("s") else "i32"
        assert set(consts) == {n for n, t in signature.items() if t == "constexpr"}
        compiled = triton.compile(
            ASTSource(kernel, signature, consts),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": _triton_ld._NUM_WARPS, "enable_fp_fusion": True},
        )
        assert len(compiled.asm["cubin"]) > 0


# --- host-side index math (no kernel launch) -------------------------------------------------


def neighbours(in_size: int, out_size: int, align_corners: bool):
    """PyTorch's bilinear source neighbours, restated in fp32 as the kernel computes them."""
    d = torch.arange(out_size, dtype=torch.float32)
    if align_corners:
        scale = torch.tensor(in_size - 1, dtype=torch.float32) / max(out_size - 1, 1)
        src = scale * d
    else:
        scale = torch.tensor(in_size, dtype=torch.float32) / out_size
        src = (scale * (d + 0.5) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = i0 + (i0 < in_size - 1).long()
    lam = (src - i0).clamp(0, 1)
    return i0, i1, lam


@settings(max_examples=25, deadline=None)
@given(
    in_size=st.integers(1, 80),
    out_size=st.integers(1, 160),
    align_corners=st.booleans(),
)
def test_index_convention_is_pytorchs(in_size, out_size, align_corners):
    # The interpolation matrix built from the stated convention equals F.interpolate applied
    # to the one-hot basis of the input (a column of the matrix per basis vector).
    i0, i1, lam = neighbours(in_size, out_size, align_corners)
    rows = torch.arange(out_size)
    mat = torch.zeros(out_size, in_size)
    mat.index_put_((rows, i0), 1 - lam, accumulate=True)
    mat.index_put_((rows, i1), lam, accumulate=True)
    basis = torch.eye(in_size).reshape(1, in_size, in_size, 1)  # in_size maps of (in_size, 1)
    up = F.interpolate(basis, size=(out_size, 1), mode="bilinear", align_corners=align_corners)
    torch.testing.assert_close(mat, up[0, :, :, 0].T, rtol=1e-6, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    W=st.integers(1, 300),
    w=st.integers(1, 300),
    C=st.integers(1, 600),
    H=st.integers(1, 300),
    align_corners=st.booleans(),
    channels_inner=st.booleans(),
)
def test_backward_window_covers_every_tile(W, w, C, H, align_corners, channels_inner):
    # Each backward column tile adds into a window of WIN low-resolution columns starting at its
    # first column's lower neighbour; every neighbour of the tile must fall inside it.
    block_a, block_j, win = _triton_ld._bwd_tiles(C, H, W, w, align_corners, channels_inner)
    for n in (block_a, block_j, win):
        assert n >= 16 and n & (n - 1) == 0  # tl.dot needs powers of two >= 16
    i0, i1, _ = neighbours(w, W, align_corners)
    for start in range(0, W, block_j):
        lo = int(i0[start : start + block_j].min())
        hi = int(i1[start : start + block_j].max())
        assert hi - lo < win, (start, lo, hi, win)


# --- validation (no kernel launch) --------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(1, 2, 5, 7)
    logits = torch.randn(1, 2, 2, 3)
    fwd, bwd = _triton_ld.ld_modulate_fwd_triton, _triton_ld.ld_modulate_bwd_triton
    with pytest.raises(TypeError, match="logits must have the dtype of x"):
        fwd(x, logits.double(), 1.0, True)
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        fwd(x.long(), logits, 1.0, True)
    with pytest.raises(ValueError, match=r"logits must be \(B, C, h, w\) with the \(B, C\) of x"):
        fwd(x, torch.randn(1, 3, 2, 3), 1.0, True)
    with pytest.raises(ValueError, match="x must be 4-D"):
        fwd(x[0], logits, 1.0, True)
    with pytest.raises(TypeError, match=r"logits must be a torch\.Tensor, got list"):
        fwd(x, [1.0], 1.0, True)
    with pytest.raises(ValueError, match=r"grad_out must have the shape of x \(1, 2, 5, 7\)"):
        bwd(torch.randn(1, 2, 5, 6), x, logits, 1.0, True, True, True)
    with pytest.raises(TypeError, match="grad_out must have the dtype of x"):
        bwd(torch.randn(1, 2, 5, 7).double(), x, logits, 1.0, True, True, True)


def test_cpu_tensors_without_the_interpreter_raise_a_clear_error():
    pytest.importorskip("triton", reason="triton is not installed")
    if _triton_ld._interpreted():
        pytest.skip("gald.ops._triton_ld was imported with TRITON_INTERPRET=1")
    x, logits, g = random_inputs((1, 2, 5, 7, 2, 3), torch.float32)
    with pytest.raises(RuntimeError, match=r"run on CUDA tensors .* got a tensor on cpu"):
        _triton_ld.ld_modulate_fwd_triton(x, logits, 1.0, True)
    with pytest.raises(RuntimeError, match=r"run on CUDA tensors .* got a tensor on cpu"):
        _triton_ld.ld_modulate_bwd_triton(g, x, logits, 1.0, True, True, True)


def test_float64_needs_triton_3_5(monkeypatch):
    # tl.dot of float64 compiles from triton 3.5 on: before, "auto" takes the torch kernel for
    # float64 CUDA tensors and the Triton entry points refuse it, naming the version
    pytest.importorskip("triton", reason="triton is not installed")
    cuda64 = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float64)
    cuda32 = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float32)
    assert _triton_ld.unsupported_dtype(torch.float64) is None or _triton_ld._triton_version() < (
        3,
        5,
    )
    monkeypatch.setattr(_triton_ld, "_triton_version", lambda: (3, 4))
    monkeypatch.setattr(_modulate, "_triton_launches", lambda *args: True)  # no CUDA here
    assert "triton >= 3.5" in str(_triton_ld.unsupported_dtype(torch.float64))
    assert _triton_ld.unsupported_dtype(torch.float32) is None
    assert _modulate.resolve_impl(cuda64, "auto") == "torch"  # type: ignore[arg-type]
    assert _modulate.resolve_impl(cuda32, "auto") == "triton"  # type: ignore[arg-type]
    x, logits, g = random_inputs((1, 2, 5, 7, 2, 3), torch.float64)
    with pytest.raises(RuntimeError, match=r"float64 needs triton >= 3.5 .* use impl='torch'"):
        _triton_ld.ld_modulate_fwd_triton(x, logits, 1.0, True)
    with pytest.raises(RuntimeError, match=r"float64 needs triton >= 3.5 .* use impl='torch'"):
        _triton_ld.ld_modulate_bwd_triton(g, x, logits, 1.0, True, True, True)
    monkeypatch.setattr(_triton_ld, "_triton_version", lambda: (3, 5))
    assert _triton_ld.unsupported_dtype(torch.float64) is None
    assert _modulate.resolve_impl(cuda64, "auto") == "triton"  # type: ignore[arg-type]


def test_missing_triton_raises_a_clear_error(monkeypatch):
    monkeypatch.setattr(_triton_ld, "TRITON_AVAILABLE", False)
    x, logits, g = random_inputs((1, 2, 5, 7, 2, 3), torch.float32)
    with pytest.raises(RuntimeError, match=r"ld_modulate_fwd_triton: triton is not installed"):
        _triton_ld.ld_modulate_fwd_triton(x, logits, 1.0, True)
    with pytest.raises(RuntimeError, match=r"ld_modulate_bwd_triton: triton is not installed"):
        _triton_ld.ld_modulate_bwd_triton(g, x, logits, 1.0, True, True, True)


def test_logits_too_wide_for_the_backward_window_run_the_torch_backward(kernels, monkeypatch):
    # logits 100x wider than x: the Triton backward's window would outgrow shared memory on a
    # GPU; the op takes the torch backward, the direct kernel call says why it refuses
    monkeypatch.setattr(_modulate, "_triton_module", kernels)
    x, logits, g = random_inputs((1, 2, 3, 3, 2, 300), torch.float64)
    assert not kernels.bwd_window_fits(3, 300, True) and kernels.bwd_window_fits(3, 24, True)
    xr, lr = x.clone().requires_grad_(), logits.clone().requires_grad_()
    out = ld_modulate(xr, lr, 2.0, impl="triton")
    gx, gl = torch.autograd.grad(out, (xr, lr), g)
    want, want_gx, want_gl = reference_grads(x, logits, g, 2.0, True)
    torch.testing.assert_close(out, want, **tol(torch.float64))
    torch.testing.assert_close(gx, want_gx, **tol(torch.float64))
    torch.testing.assert_close(gl, want_gl, **tol(torch.float64))
    with pytest.raises(ValueError, match=r"300 columns wide for an x 3 wide need a backward"):
        kernels.ld_modulate_bwd_triton(g, x, logits, 2.0, True, True, True)


def test_auto_tries_a_launch_once_and_falls_back_with_a_warning(monkeypatch, kernels):
    """``impl="auto"`` takes the Triton kernels only where a trial launch works (a CUDA image
    without a C compiler imports triton but cannot build its launcher); the result is kept per
    device and dtype, and a failure warns once, naming the cause."""
    monkeypatch.setattr(_modulate, "_launches", {})
    cpu = torch.device("cpu")
    # the interpreted kernels launch on CPU tensors: the trial passes
    assert _modulate._triton_launches(cpu, torch.float32, kernels) is True

    calls = []

    def broken(*args):
        calls.append(args)
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable")

    stub = SimpleNamespace(ld_modulate_fwd_triton=broken, ld_modulate_bwd_triton=broken)
    with pytest.warns(
        RuntimeWarning,
        match=r"do not run on cpu in torch.float16 \(RuntimeError: "
        r"Failed to find C compiler.*impl='auto' uses the torch kernel",
    ):
        assert _modulate._triton_launches(cpu, torch.float16, stub) is False
    assert _modulate._triton_launches(cpu, torch.float16, stub) is False  # remembered: no retry
    assert len(calls) == 1
    assert _modulate._triton_launches(cpu, torch.float32, stub) is True  # another dtype's record

    # resolved at run time by the op: a CUDA tensor whose trial failed gets the torch kernel
    fake_cuda = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float32)
    monkeypatch.setattr(_modulate, "_triton", lambda: stub)
    monkeypatch.setattr(stub, "unsupported_dtype", lambda dtype: None, raising=False)
    _modulate._launches[(torch.device("cuda", 0), torch.float32)] = False
    assert _modulate.resolve_impl(fake_cuda, "auto") == "torch"  # type: ignore[arg-type]
    _modulate._launches[(torch.device("cuda", 0), torch.float32)] = True
    assert _modulate.resolve_impl(fake_cuda, "auto") == "triton"  # type: ignore[arg-type]
