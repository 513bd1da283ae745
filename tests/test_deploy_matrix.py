"""The deployment capability matrix over every public layer (issue 5).

Each path is compared with eager fp32 on the same random inputs and the same (randomised) weights:
``torch.compile(fullgraph=True)`` (eager backend for every layer, inductor for GALD and GALDHead),
``torch.export``, ONNX + onnxruntime (dynamo and TorchScript exporters), autocast bf16, a
channels_last input, a non-contiguous input and deterministic mode. A layer that declares a path
unsupported must make :mod:`gald.deploy` refuse it with a clear ``NotImplementedError``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gald
from _deploy_cases import (
    CASE_IDS,
    CASES,
    NUM_CLASSES,
    SHAPE,
    SHAPE2,
    C,
    Case,
    assert_close,
    batch_for,
    build,
    grads,
    randomise,
    twin,
)
from gald import deploy
from gald._capabilities import CAPABILITY_FIELDS, combine_capabilities
from gald.ga.cgnl import CGNL

# compile / export tolerance: a layer may dispatch to another, equivalent implementation while
# traced (the LD's eager-CPU training node against its custom op), so gradients agree to
# rounding only (measured up to 3e-5 of the largest input gradient).
TRACE_RTOL = 1e-4
# channels_last / strided inputs may pick other conv kernels (other summation orders).
LAYOUT_RTOL = 1e-4
# ONNX Runtime against eager fp32 (the bar).
ONNX_RTOL = 1e-4
# autocast bf16 against fp32, relative to max|y_fp32|: bf16 keeps 8 mantissa bits (relative
# rounding 2**-9 ~ 2e-3 per op); the worst layer measured about 1e-2 at these sizes. See
# docs/deploy.md, "AMP notes".
BF16_RTOL = 5e-2


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    # every case compiles the same forward code objects: start from an empty cache so the
    # recompile limit never turns a fullgraph compile into a silent eager fallback
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _input(shape: tuple[int, ...], seed: int = 2) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _flag(module: nn.Module, path: str) -> bool:
    return bool(getattr(module, deploy.PATHS[path]))


def _expect_refused(module: nn.Module, path: str, call: Callable[[], Any]) -> None:
    with pytest.raises(NotImplementedError, match=path) as info:
        call()
    assert type(module).__name__ in str(info.value)


def _train_step(
    module: nn.Module | Callable, x: torch.Tensor, seed: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward in the current mode, then backward through a random projection of the output
    (a plain sum would give zero gradients through a BatchNorm)."""
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout masks on both sides
    y = module(x)
    proj = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    (y * proj).sum().backward()
    assert x.grad is not None
    return y, x.grad


def _compare_train(
    ref: nn.Module,
    other: nn.Module,
    run_other: Callable,
    x_ref: torch.Tensor,
    x_other: torch.Tensor,
    *,
    rtol: float,
    what: str,
) -> None:
    y_ref, gx_ref = _train_step(ref, x_ref)
    y, gx = _train_step(run_other, x_other)
    assert_close(y, y_ref, rtol=rtol, what=f"{what}: output")
    assert_close(gx, gx_ref, rtol=rtol, what=f"{what}: input gradient")
    g_ref, g = grads(ref), grads(other)
    assert g.keys() == g_ref.keys(), f"{what}: parameters with gradients differ"
    assert g_ref, f"{what}: no parameter received a gradient"
    # one scale for all parameter gradients: some are zero up to rounding (a conv bias before a
    # train-mode BatchNorm), so each tensor's own maximum would measure noise against noise
    scale = max(float(t.abs().max()) for t in g_ref.values())
    assert scale > 0, f"{what}: every parameter gradient is zero"
    for name in g_ref:
        assert_close(g[name], g_ref[name], rtol=rtol, scale=scale, what=f"{what}: grad of {name}")
    buffers = dict(other.named_buffers())
    for name, buf in ref.named_buffers():
        if buf.is_floating_point():
            assert_close(buffers[name], buf, rtol=rtol, what=f"{what}: buffer {name}")


# ---------------------------------------------------------------------------------------------
# the declaration itself


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_capabilities_declared(case: Case) -> None:
    module = case.build()
    flags = gald.capabilities_of(module)
    assert set(flags) == set(CAPABILITY_FIELDS)
    for field, value in flags.items():
        expected_type = int if field == "min_train_batch" else bool
        assert type(value) is expected_type, f"{case.id}.{field} = {value!r}"
    assert flags["min_train_batch"] >= 1


@pytest.mark.parametrize("name", gald.list_ga())
def test_gald_derives_flags_from_its_ga(name: str) -> None:
    block = gald.GALD(C, name)
    head = gald.GALDHead(C, NUM_CLASSES, channels=C, ga_module=name)
    expected, _ = combine_capabilities(gald.GALD, block.ga, block.ld)
    assert gald.capabilities_of(block) == expected
    assert gald.capabilities_of(head) == combine_capabilities(gald.GALDHead, block)[0]
    # the table row documents exactly these defaults
    rows = {label: flags for label, flags, _ in deploy.capability_rows()}
    assert rows[f"`GALD` / `GALDHead` with `{name}`"] == gald.capabilities_of(head)


# ---------------------------------------------------------------------------------------------
# torch.compile and torch.export


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_compile_eager_fullgraph(case: Case, train: bool) -> None:
    module = build(case, train=train)
    if not _flag(module, "compile"):
        _expect_refused(module, "compile", lambda: deploy.compile_module(module))
        return
    ref, other = module, twin(module)
    compiled = deploy.compile_module(other, backend="eager")
    x = _input(batch_for(module))
    if train:
        _compare_train(ref, other, compiled, x, x, rtol=TRACE_RTOL, what=f"{case.id} compile")
    else:
        with torch.no_grad():
            assert_close(compiled(x), ref(x), rtol=TRACE_RTOL, what=f"{case.id} compile")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_torch_export(case: Case, train: bool) -> None:
    module = build(case, train=train)
    x = _input(batch_for(module))
    if not _flag(module, "export"):
        _expect_refused(module, "export", lambda: deploy.export_program(module, (x,)))
        return
    program = deploy.export_program(twin(module), (x,))
    runner = program.module()
    torch.manual_seed(3)
    y = runner(x)
    torch.manual_seed(3)
    with torch.no_grad():
        y_ref = module(x)
    assert_close(
        y, y_ref, rtol=TRACE_RTOL, what=f"{case.id} export ({'train' if train else 'eval'})"
    )


# ---------------------------------------------------------------------------------------------
# ONNX + onnxruntime


def _check_onnx_file(path: Path, opset: int | None = None) -> onnx.ModelProto:
    model = onnx.load(str(path))
    domains = {node.domain for node in model.graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard ONNX domains {domains}"
    assert not model.functions, "the graph calls local functions"
    opsets = {entry.domain: entry.version for entry in model.opset_import}
    version = max(opsets.get("", 0), opsets.get("ai.onnx", 0))
    assert version >= 17, opsets
    if opset is not None:
        assert version == opset, opsets
    return model


# the TorchScript exporter warns about every Python-level shape check it freezes (the checks
# only raise on bad input, so freezing them is harmless; the second ONNX shape proves it)
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_onnx_runtime_parity(case: Case, exporter: str, tmp_path: Path) -> None:
    module = build(case, train=False)
    x = _input(SHAPE)
    path = tmp_path / "model.onnx"
    dynamo = exporter == "dynamo"
    if not _flag(module, "onnx"):
        _expect_refused(module, "onnx", lambda: deploy.export_onnx(module, x, path))
        assert not path.exists()
        return
    dyn_b, dyn_hw = _flag(module, "onnx_dynamic_batch"), _flag(module, "onnx_dynamic_hw")
    if not dyn_hw:
        _expect_refused(
            module,
            "onnx_dynamic_hw",
            lambda: deploy.export_onnx(module, x, path, dynamic_hw=True, dynamo=dynamo),
        )
    # the dynamo exporter at its own opset 18, the TorchScript one at the minimum, 17
    opset = deploy.DEFAULT_OPSET if dynamo else deploy.MIN_OPSET
    deploy.export_onnx(
        module, x, path, dynamic_batch=dyn_b, dynamic_hw=dyn_hw, dynamo=dynamo, opset=opset
    )
    model = _check_onnx_file(path, opset)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].HasField("dim_param") == dyn_b
    assert dims[2].HasField("dim_param") == dims[3].HasField("dim_param") == dyn_hw
    second = (SHAPE2[0] if dyn_b else SHAPE[0], C, *(SHAPE2[2:] if dyn_hw else SHAPE[2:]))
    assert second != SHAPE or not (dyn_b or dyn_hw)
    err = deploy.verify_onnx(module, path, x, _input(second, seed=5))
    assert err <= ONNX_RTOL, f"{case.id} ({exporter}): onnxruntime relative error {err:.2e}"


_HEAD_EXPORT: dict[str, Any] = {}


@pytest.fixture(scope="module")
def exported_head(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    head = randomise(gald.GALDHead(C, NUM_CLASSES, channels=C)).eval()
    path = tmp_path_factory.mktemp("onnx") / "head.onnx"
    deploy.export_onnx(head, _input(SHAPE), path)
    return head, path


@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(3, 21), w=st.integers(3, 21), seed=st.integers(0, 99))
def test_onnx_dynamic_head_any_size(
    exported_head: tuple[nn.Module, Path], b: int, h: int, w: int, seed: int
) -> None:
    head, path = exported_head
    err = deploy.verify_onnx(head, path, _input((b, C, h, w), seed=seed))
    assert err <= ONNX_RTOL, f"shape {(b, C, h, w)}: relative error {err:.2e}"


@pytest.fixture(scope="module")
def exported_psp(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    if "psp" not in gald.list_ga():
        pytest.skip("no 'psp' layer registered")
    torch.manual_seed(0)
    psp = randomise(gald.create_ga("psp", C)).eval()
    if not psp.onnx_dynamic_hw:
        pytest.skip("PSP declares onnx_dynamic_hw=False (tested by test_onnx_runtime_parity)")
    path = tmp_path_factory.mktemp("onnx") / "psp.onnx"
    deploy.export_onnx(psp, _input(SHAPE), path)
    return psp, path


@settings(max_examples=12, deadline=None)
@given(h=st.integers(2, 25), w=st.integers(2, 25), seed=st.integers(0, 99))
def test_onnx_dynamic_psp_bins_that_do_not_divide(
    exported_psp: tuple[nn.Module, Path], h: int, w: int, seed: int
) -> None:
    """The known hard case: adaptive pooling bins (1, 2, 3, 6) that do not divide the input,
    in one dynamic graph exported at another size."""
    psp, path = exported_psp
    err = deploy.verify_onnx(psp, path, _input((2, C, h, w), seed=seed))
    assert err <= ONNX_RTOL, f"PSP at {h}x{w}: relative error {err:.2e}"


# ---------------------------------------------------------------------------------------------
# AMP, memory layouts, determinism


class _SoftmaxDtypes(TorchDispatchMode):
    """Records the input dtype of every softmax kernel that runs."""

    OPS = ("_softmax", "_log_softmax", "_safe_softmax")

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.namespace == "aten" and func.overloadpacket.__name__ in self.OPS:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_autocast_bf16_cpu(case: Case) -> None:
    module = build(case, train=False)
    x = _input(batch_for(module)) * 4.0  # well above unit scale, to stress the softmaxes
    if not _flag(module, "autocast"):
        pytest.skip(f"{case.id} declares supports_autocast=False")
    with torch.no_grad():
        y32 = module(x)
        with torch.autocast("cpu", dtype=torch.bfloat16), _SoftmaxDtypes() as softmaxes:
            y16 = module(x)
    assert torch.isfinite(y16).all(), f"{case.id}: non-finite output under autocast"
    assert all(d == torch.float32 for d in softmaxes.dtypes), (
        f"{case.id}: softmax ran in {softmaxes.dtypes} under autocast (attention logits and "
        "softmax must stay in fp32)"
    )
    err = float((y16.float() - y32).abs().max() / y32.abs().max())
    assert err <= BF16_RTOL, f"{case.id}: bf16 relative error {err:.3e} > {BF16_RTOL}"
    # train mode: finite outputs and gradients
    train = build(case, train=True)
    xr = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = train(xr)
    out.float().square().mean().backward()
    assert xr.grad is not None
    assert torch.isfinite(xr.grad).all()
    assert all(torch.isfinite(g).all() for g in grads(train).values())


@pytest.mark.parametrize("model_too", [False, True], ids=["input", "input+model"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_channels_last(case: Case, model_too: bool) -> None:
    module = build(case, train=True)
    if not _flag(module, "channels_last"):
        pytest.skip(f"{case.id} declares supports_channels_last=False")
    other = twin(module)
    if model_too:
        other = other.to(memory_format=torch.channels_last)
    x = _input(batch_for(module))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert not x_cl.is_contiguous()
    _compare_train(module, other, other, x, x_cl, rtol=LAYOUT_RTOL, what=f"{case.id} cl")
    module.eval()
    other.eval()
    with torch.no_grad():
        assert_close(other(x_cl), module(x), rtol=LAYOUT_RTOL, what=f"{case.id} cl eval")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_non_contiguous_input(case: Case) -> None:
    module = build(case, train=True)
    b, c, h, w = batch_for(module)
    x_t = _input((b, c, w, h)).transpose(2, 3)  # a (B, C, H, W) view with swapped strides
    assert not x_t.is_contiguous()
    other = twin(module)
    _compare_train(module, other, other, x_t.contiguous(), x_t, rtol=LAYOUT_RTOL, what=case.id)
    module.eval()
    other.eval()
    with torch.no_grad():
        assert_close(other(x_t), module(x_t.contiguous()), rtol=LAYOUT_RTOL, what=case.id)


@pytest.fixture
def deterministic_mode() -> Iterator[None]:
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_deterministic(case: Case, deterministic_mode: None) -> None:
    module = build(case, train=True)
    if not _flag(module, "deterministic"):
        pytest.skip(f"{case.id} declares deterministic=False")
    x = _input(batch_for(module))
    runs = []
    for _ in range(2):
        model = twin(module)
        y, gx = _train_step(model, x)
        runs.append((y.detach(), gx, grads(model)))
    (y1, gx1, g1), (y2, gx2, g2) = runs
    assert torch.equal(y1, y2), f"{case.id}: outputs differ between two runs"
    assert torch.equal(gx1, gx2), f"{case.id}: input gradients differ"
    assert g1.keys() == g2.keys()
    assert g1
    for name in g1:
        assert torch.equal(g1[name], g2[name]), f"{case.id}: grad of {name} differs"


# ---------------------------------------------------------------------------------------------
# inductor (the expensive part: one small shape, two layers)


@pytest.mark.slow
def test_inductor_gald_head_train() -> None:
    torch.manual_seed(0)
    head = randomise(gald.GALDHead(C, NUM_CLASSES, channels=C)).train()
    other = twin(head)
    compiled = deploy.compile_module(other)  # default backend: inductor
    x = _input(SHAPE)
    _compare_train(head, other, compiled, x, x, rtol=LAYOUT_RTOL, what="GALDHead inductor")


@pytest.mark.slow
def test_inductor_gald_eval() -> None:
    torch.manual_seed(0)
    block = randomise(gald.GALD(C)).eval()
    compiled = deploy.compile_module(twin(block))
    x = _input(SHAPE)
    with torch.no_grad():
        assert_close(compiled(x), block(x), rtol=LAYOUT_RTOL, what="GALD inductor")


# ---------------------------------------------------------------------------------------------
# refusing unsupported paths, and the helpers' input checks


class _NoDeployCGNL(CGNL):
    """A CGNL that declares every path unsupported (the shape of a future layer's declaration)."""

    supports_compile = False
    supports_export = False
    supports_onnx = False
    onnx_dynamic_hw = False
    capability_notes: ClassVar[Mapping[str, str]] = {
        "supports_compile": "data-dependent control flow",
        "supports_export": "data-dependent control flow",
        "supports_onnx": "uses an op without an ONNX symbolic",
        "onnx_dynamic_hw": "bins must divide the input",
    }


class _StaticHWCGNL(CGNL):
    onnx_dynamic_hw = False
    capability_notes: ClassVar[Mapping[str, str]] = {
        "onnx_dynamic_hw": "bins must divide the input"
    }


def test_unsupported_paths_raise_clear_errors(tmp_path: Path) -> None:
    head = gald.GALDHead(C, NUM_CLASSES, channels=C, ga_module=_NoDeployCGNL).eval()
    assert not head.supports_onnx
    assert not head.gald.supports_compile
    x = _input(SHAPE)
    path = tmp_path / "m.onnx"
    calls: dict[str, Callable[[], Any]] = {
        "compile": lambda: deploy.compile_module(head, backend="eager"),
        "export": lambda: deploy.export_program(head, (x,)),
        "onnx": lambda: deploy.export_onnx(head, x, path),
    }
    for path_name, call in calls.items():
        with pytest.raises(NotImplementedError) as info:
            call()
        message = str(info.value)
        assert repr(path_name) in message
        assert "GALDHead" in message  # the outermost layer that declares it
        assert "_NoDeployCGNL" in message  # the part it comes from
        assert "data-dependent" in message or "ONNX symbolic" in message  # the reason
    assert not path.exists()
    # a user model that merely contains the layer is refused too, naming where it sits
    wrapper = nn.Sequential(nn.Identity(), nn.Sequential(head)).eval()
    with pytest.raises(NotImplementedError, match=r"at '1\.0'"):
        deploy.check_supported(wrapper, "onnx")


def test_static_hw_layer_exports_only_without_dynamic_hw(tmp_path: Path) -> None:
    torch.manual_seed(0)
    block = randomise(gald.GALD(C, _StaticHWCGNL, ga_kwargs={"groups": 4})).eval()
    x = _input(SHAPE)
    with pytest.raises(NotImplementedError, match="bins must divide"):
        deploy.export_onnx(block, x, tmp_path / "dyn.onnx", dynamic_hw=True)
    path = deploy.export_onnx(block, x, tmp_path / "static.onnx", dynamic_hw=False)
    dims = _check_onnx_file(path).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].HasField("dim_param")
    assert (dims[2].dim_value, dims[3].dim_value) == SHAPE[2:]
    assert deploy.verify_onnx(block, path, x, _input((3, *SHAPE[1:]), seed=4)) <= ONNX_RTOL


def test_deploy_helpers_validate_arguments(tmp_path: Path) -> None:
    block = gald.GALD(C).eval()
    x = _input(SHAPE)
    path = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match="unknown deployment path 'tensorrt'"):
        deploy.check_supported(block, "tensorrt")
    with pytest.raises(TypeError, match=r"module must be a torch\.nn\.Module, got str"):
        deploy.check_supported("GALD", "onnx")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"example_input must be a torch\.Tensor"):
        deploy.export_onnx(block, x.numpy(), path)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"4-D \(B, C, H, W\), got 3-D"):
        deploy.export_onnx(block, x[0], path)
    with pytest.raises(ValueError, match="batch >= 2 with dynamic_batch=True"):
        deploy.export_onnx(block, x[:1], path)
    with pytest.raises(ValueError, match="opset must be >= 17, got 13"):
        deploy.export_onnx(block, x, path, opset=13)
    with pytest.raises(ValueError, match="eval mode"):
        deploy.export_onnx(twin(block).train(), x, path)
    with pytest.raises(TypeError, match="args must be a tuple"):
        deploy.export_program(block, x)  # type: ignore[arg-type]
    assert not path.exists()


def test_onnx_custom_domain_detection() -> None:
    from onnx import helper

    node = helper.make_node("LDModulate", ["x"], ["y"], domain="gald")
    inner = helper.make_graph([node], "inner", [], [])
    if_node = helper.make_node("If", ["c"], ["z"], then_branch=inner, else_branch=inner)
    std = helper.make_node("Relu", ["x"], ["r"])
    graph = helper.make_graph([std, if_node], "g", [], [])
    assert deploy.onnx_custom_domains(helper.make_model(graph)) == {"gald"}
    clean = helper.make_model(helper.make_graph([std], "g", [], []))
    assert deploy.onnx_custom_domains(clean) == set()


def test_capability_table_lists_every_layer(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import runpy

    table = deploy.capability_table()
    lines = table.splitlines()
    assert len(lines) == 2 + 2 + 2 * len(gald.list_ga())
    for name in gald.list_ga():
        assert f"(`{name}`) |" in table
        assert f"with `{name}` |" in table
    monkeypatch.setattr("sys.argv", ["python -m gald.deploy"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("gald.deploy", run_name="__main__")
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == table
