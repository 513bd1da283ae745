"""Deployment, tested per layer: torch.export with dynamic shapes for every GA and for GALD,
ONNX for every GA inside GALD, torch.compile and determinism on the head (the dynamo ONNX
exporter on the head runs as the recipe of docs/deploy.md, in tests/test_docs_snippets.py).

Every GA is exported to ONNX inside ``GALD`` (which contains it, so one case covers the GA and
the block). ``torch.export``, whose tracing costs seconds per model, runs once on ``GALD`` and
on each GA alone. ``torch.compile(fullgraph=True)`` of each GA alone is part of
``gald.testing.check_ga`` (the contract suite). ``torch.compile`` is tested with the ``eager``
backend: it checks that dynamo captures the whole graph (the part a layer library controls);
inductor's code generation takes minutes on a small CPU and belongs to the benchmark
(``--ld --compile on``). A layer that cannot take a path would get an ``xfail`` here with the
reason; today every layer takes every path.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gald
import gald.testing
from gald import deploy
from gald.testing import randomize_

C = 16
SHAPE = (2, C, 33, 35)  # odd, non-square; every map inside the GA keeps a side > 1
SHAPE2 = (3, C, 41, 29)  # a second shape for dynamic graphs
RTOL = 1e-4  # ONNX Runtime and traced programs against eager fp32


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _input(shape: tuple[int, ...], seed: int = 2) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _block(ga: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_(gald.GALD(C, ga), seed=1).eval()


def _head() -> nn.Module:
    torch.manual_seed(0)
    return randomize_(gald.GALDHead(C, 5, channels=C), seed=1)


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = float(expected.abs().max().clamp_min(1e-12))
    torch.testing.assert_close(
        actual.float(), expected.float(), rtol=RTOL, atol=RTOL * scale, msg=lambda m: f"{what}: {m}"
    )


def _autocast_nodes(graph: torch.fx.Graph) -> list[str]:
    return [
        str(n.target)
        for n in graph.nodes
        if n.op == "call_function" and "autocast" in str(n.target)
    ]


def _export_and_compare(model: nn.Module, shapes: tuple[tuple[int, ...], ...], what: str) -> None:
    dyn = torch.export.Dim.DYNAMIC
    x = _input(shapes[0])
    program = torch.export.export(model, (x,), dynamic_shapes=({0: dyn, 2: dyn, 3: dyn},))
    # the float32 regions of the layers go through gald._amp.autocast_off, which leaves no
    # autocast node in the graph when autocast is off (their accuracy under autocast is part of
    # gald.testing.check_ga)
    assert not _autocast_nodes(program.graph), f"export {what}: {_autocast_nodes(program.graph)}"
    exported = program.module()
    with torch.no_grad():
        for i, shape in enumerate(shapes):
            inp = _input(shape, seed=2 + i)
            _close(exported(inp), model(inp), f"export {what} {shape}")


def test_the_autocast_check_can_fail() -> None:
    """``torch.autocast(enabled=False)`` itself would leave such a node."""

    class Plain(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", enabled=False):
                return torch.softmax(x, dim=-1)

    assert _autocast_nodes(torch.export.export(Plain(), (torch.randn(2, 3),)).graph)


def test_torch_export_dynamic_shapes_gald() -> None:
    # GALD's own parts (downsample, upsample, the LD branch and the fused op) around the
    # default GA; each GA's export with dynamic shapes is the test below
    _export_and_compare(_block("cgnl"), (SHAPE, SHAPE2), "GALD(cgnl)")


@pytest.mark.parametrize("ga", gald.list_ga())
def test_torch_export_dynamic_shapes(ga: str) -> None:
    # the GA alone, at the sizes GALD runs it (half of SHAPE and SHAPE2, rounded up): exporting
    # GALD around every GA would re-trace GALD's own parts ten times, about 1.3 s each
    torch.manual_seed(0)
    model = randomize_(gald.create_ga(ga, C), seed=1).eval()
    half = tuple(s if i < 2 else (s + 1) // 2 for i, s in enumerate(SHAPE))
    half2 = tuple(s if i < 2 else (s + 1) // 2 for i, s in enumerate(SHAPE2))
    _export_and_compare(model, (half, half2), ga)


@pytest.mark.parametrize("ga", gald.list_ga())
def test_onnx_standard_ops_and_runtime_parity(ga: str, tmp_path: Path) -> None:
    model = _block(ga)
    path = deploy.export_onnx(model, _input(SHAPE), tmp_path / f"{ga}.onnx", dynamo=False)
    assert deploy.onnx_custom_domains(onnx.load(str(path))) == set()
    err = deploy.verify_onnx(model, path, _input(SHAPE), _input(SHAPE2, seed=3))
    assert err <= RTOL, f"GALD({ga}): onnxruntime differs from eager by {err:.2e} (relative)"


# torch's default (dynamo) exporter on GALDHead with dynamic batch, H and W, checked against
# onnxruntime at a second shape, runs as the ONNX recipe of docs/deploy.md
# (tests/test_docs_snippets.py); repeating it here would double the slowest export.


def test_export_onnx_refuses_bad_arguments(tmp_path: Path) -> None:
    head = _head()
    with pytest.raises(ValueError, match="eval mode"):
        deploy.export_onnx(head.train(), _input(SHAPE), tmp_path / "a.onnx")
    head.eval()
    with pytest.raises(ValueError, match="batch >= 2"):
        deploy.export_onnx(head, _input((1, C, 9, 9)), tmp_path / "b.onnx")
    with pytest.raises(ValueError, match="opset must be >= 17, got 13"):
        deploy.export_onnx(head, _input(SHAPE), tmp_path / "c.onnx", opset=13)
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        deploy.export_onnx("head", _input(SHAPE), tmp_path / "d.onnx")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dynamic_batch must be a bool, got str 'no'"):
        deploy.export_onnx(head, _input(SHAPE), tmp_path / "e.onnx", dynamic_batch="no")  # type: ignore[arg-type]


def test_adaptive_pooling_to_a_grid_is_refused_with_dynamic_sizes(tmp_path: Path) -> None:
    """The exporters bake adaptive pooling's windows for the example's size: at another size
    onnxruntime returns wrong values without an error. With dynamic_hw=True such a module is
    refused; a 1x1 grid (global pooling) exports for any size, and dynamic_hw=False exports
    the fixed size, which is then exact."""
    fixed_grid = nn.Sequential(nn.Conv2d(C, C, 1), nn.AdaptiveAvgPool2d(3)).eval()
    x = _input((2, C, 12, 12))
    with pytest.raises(
        ValueError,
        match=r"1 \(AdaptiveAvgPool2d\) calls adaptive_avg_pool2d to a 3x3 grid \(on an input "
        r"of shape \(2, 16, 12, 12\)\); .* dynamic_hw=False",
    ):
        deploy.export_onnx(fixed_grid, x, tmp_path / "grid.onnx")
    path = deploy.export_onnx(fixed_grid, x, tmp_path / "grid.onnx", dynamic_hw=False)
    assert deploy.verify_onnx(fixed_grid, path, x) < 1e-5
    pooled = nn.Sequential(nn.Conv2d(C, C, 1), nn.AdaptiveMaxPool2d((1, 1))).eval()
    path = deploy.export_onnx(pooled, x, tmp_path / "global.onnx")
    assert deploy.verify_onnx(pooled, path, x, _input((2, C, 20, 16))) < 1e-5


class _FunctionalPooling(nn.Module):
    """Pools with a function call, as many hand-written PSP and context modules do."""

    def __init__(self, pool: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 4, 1)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        return y + F.interpolate(self.pool(y), size=y.shape[-2:], mode="nearest")


@pytest.mark.parametrize(
    ("pool", "grid"),
    [
        (lambda y: F.adaptive_avg_pool2d(y, 3), "3x3"),
        (lambda y: F.adaptive_avg_pool2d(y, (None, 2)), "12x2"),
        (lambda y: F.adaptive_max_pool2d(y, [2, 1]), "2x1"),
        (lambda y: F.adaptive_max_pool2d(y, 4, return_indices=True)[0], "4x4"),
        (lambda y: F.adaptive_avg_pool1d(y.flatten(2), 5).unflatten(2, (5, 1)), "5"),
    ],
)
def test_export_refuses_adaptive_pooling_called_as_a_function(tmp_path, pool, grid):
    """Pooling called as a function is seen as well as a pooling module: the grid is read from
    what the example forward computes, and the message names the submodule it ran in."""
    model = nn.Sequential(nn.Identity(), _FunctionalPooling(pool)).eval()
    x = torch.randn(2, 3, 12, 12)
    with pytest.raises(
        ValueError,
        match=rf"^export_onnx: 1 \(_FunctionalPooling\) calls adaptive_\w+ to a {grid} grid",
    ):
        deploy.export_onnx(model, x, tmp_path / "f.onnx")
    # the watch leaves no hook behind, and a global pooling written as a function exports
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    pooled = nn.Sequential(nn.Identity(), _FunctionalPooling(lambda y: F.adaptive_avg_pool2d(y, 1)))
    path = deploy.export_onnx(pooled.eval(), x, tmp_path / "g.onnx")
    assert deploy.verify_onnx(pooled, path, x, torch.randn(2, 3, 17, 9)) < 1e-5


def test_paths_and_models_of_the_wrong_kind_are_named(tmp_path: Path) -> None:
    model = _block("gc")
    x = _input(SHAPE)
    with pytest.raises(TypeError, match=r"export_onnx: path must be a str or os.PathLike, got int"):
        deploy.export_onnx(model, x, 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"export_onnx: path .* in a folder that does not exist"):
        deploy.export_onnx(model, x, tmp_path / "missing" / "m.onnx")
    with pytest.raises(TypeError, match=r"verify_onnx: path must be a str or os.PathLike"):
        deploy.verify_onnx(model, 5, x)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match=r"verify_onnx: path .*m\.onnx' is not a file"):
        deploy.verify_onnx(model, tmp_path / "m.onnx", x)
    with pytest.raises(TypeError, match=r"model must be an onnx.ModelProto .* got str 'm.onnx'"):
        deploy.onnx_custom_domains("m.onnx")


def test_cgnl_scale_stays_symbolic_in_export() -> None:
    # the 1/sqrt(N) of use_scale=True must follow the input size, not the example's
    torch.manual_seed(0)
    model = randomize_(gald.ga.CGNL(C, use_scale=True), seed=1).eval()
    _export_and_compare(model, (SHAPE, SHAPE2), "CGNL(use_scale=True)")


def _train_step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_compile_fullgraph_train_step_matches_eager() -> None:
    head = _head().train()
    compiled = torch.compile(head, fullgraph=True, backend="eager")
    x = _input(SHAPE)
    out_c, grads_c = _train_step(compiled, x)
    head2 = _head().train()
    out_e, grads_e = _train_step(head2, x)
    _close(out_c, out_e, "compiled forward")
    assert len(grads_c) == len(grads_e) == len(list(head.parameters()))
    for i, (gc, ge) in enumerate(zip(grads_c, grads_e)):
        _close(gc, ge, f"compiled grad {i}")


def test_deterministic_mode_repeats_bit_for_bit() -> None:
    torch.use_deterministic_algorithms(True)
    try:
        x = _input(SHAPE)
        first = _train_step(_head().train(), x)
        second = _train_step(_head().train(), x)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


class _DictOutput(nn.Module):
    """A torchvision-style segmentation model: ``{"out": ..., "aux": ...}``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = gald.GALD(C, "gc")
        self.aux = nn.Conv2d(C, 3, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.body(x), "aux": self.aux(x)}


def test_onnx_dict_outputs_are_named_and_verified(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = randomize_(_DictOutput(), seed=1).eval()
    path = deploy.export_onnx(model, _input(SHAPE), tmp_path / "dict.onnx", dynamo=False)
    names = [o.name for o in onnx.load(str(path)).graph.output]
    assert names == ["out", "aux"]
    err = deploy.verify_onnx(model, path, _input(SHAPE), _input(SHAPE2, seed=3))
    assert err <= RTOL, f"dict outputs: onnxruntime differs from eager by {err:.2e}"
    with pytest.raises(TypeError, match="the module returned str; expected a tensor"):
        deploy.verify_onnx(_Returns("no").eval(), path, _input(SHAPE))


class _Returns(nn.Module):
    def __init__(self, value: object) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> object:
        return self.value


def test_the_onnx_checks_detect_what_they_check(tmp_path: Path) -> None:
    # verify_onnx measures a real difference: the same file against a changed module
    torch.manual_seed(0)
    model = randomize_(_DictOutput(), seed=1).eval()
    path = deploy.export_onnx(model, _input(SHAPE), tmp_path / "m.onnx", dynamo=False)
    assert deploy.verify_onnx(model, path, _input(SHAPE)) <= RTOL
    changed = copy.deepcopy(model)
    with torch.no_grad():
        for p in changed.aux.parameters():
            p.add_(0.5)
    assert deploy.verify_onnx(changed, path, _input(SHAPE)) > 1e-2
    with torch.no_grad():  # a NaN is no match (Python's max(0.0, nan) would say 0.0)
        next(changed.aux.parameters()).fill_(float("nan"))
    assert deploy.verify_onnx(changed, path, _input(SHAPE)) == float("inf")
    # onnx_custom_domains names a non-standard operator, also inside a nested graph
    helper = onnx.helper
    inp = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    out = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    custom = helper.make_node("Mine", ["x"], ["y"], domain="com.example")
    inner = helper.make_graph([custom], "inner", [], [out])
    branch = helper.make_node("If", ["c"], ["y"], then_branch=inner, else_branch=inner, domain="")
    cond = helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])
    flat = helper.make_model(helper.make_graph([custom], "g", [inp], [out]))
    nested = helper.make_model(helper.make_graph([branch], "g", [cond], [out]))
    assert deploy.onnx_custom_domains(flat) == {"com.example"}
    assert deploy.onnx_custom_domains(nested) == {"com.example"}
    standard = helper.make_model(
        helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [inp], [out])
    )
    assert deploy.onnx_custom_domains(standard) == set()


@pytest.mark.parametrize("external_data", [False, True])
def test_onnx_weights_in_the_file_or_beside_it(external_data: bool, tmp_path: Path) -> None:
    """The dynamo exporter writes one self-contained file by default; ``external_data=True``
    puts the weights in ``<path>.data`` beside it, and onnxruntime reads both."""
    model = _block("gc")
    path = deploy.export_onnx(
        model, _input(SHAPE), tmp_path / "m.onnx", external_data=external_data
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        ["m.onnx", "m.onnx.data"] if external_data else ["m.onnx"]
    )
    err = deploy.verify_onnx(model, path, _input(SHAPE), _input(SHAPE2, seed=3))
    assert err <= RTOL, f"onnxruntime differs from eager by {err:.2e} (relative)"


def test_external_data_needs_the_dynamo_exporter(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="external_data=True needs dynamo=True"):
        deploy.export_onnx(
            _block("gc"), _input(SHAPE), tmp_path / "m.onnx", dynamo=False, external_data=True
        )
    with pytest.raises(TypeError, match="external_data"):
        deploy.export_onnx(_block("gc"), _input(SHAPE), tmp_path / "m.onnx", external_data="no")


@pytest.mark.parametrize(
    ("example_side", "runs", "refused"), [(9, (9, 40), 8), (8, (5, 8), 9), (8, (5, 8), 4)]
)
def test_export_specialises_on_a_one_pixel_ld_map(
    example_side: int, runs: tuple[int, ...], refused: int
) -> None:
    """What docs/deploy.md says about the example's size: the LD branch halves the map three
    times, and torch.export specialises a program on whether a convolution's output is 1x1
    (sides up to 8 at the block) or not. The ONNX file of the same block is not affected."""
    model = _block("gc")
    dyn = torch.export.Dim.DYNAMIC
    example = _input((2, C, example_side, example_side))
    exported = torch.export.export(model, (example,), dynamic_shapes=({2: dyn, 3: dyn},)).module()
    with torch.no_grad():
        for side in runs:
            x = _input((2, C, side, side), seed=side)
            _close(exported(x), model(x), f"export at {example_side}, run at {side}")
        with pytest.raises(Exception, match="Guard failed"):
            exported(_input((2, C, refused, refused)))


@pytest.mark.parametrize("dynamo", [True, False])
def test_onnx_export_with_an_explicit_kernel_choice(dynamo: bool, tmp_path: Path) -> None:
    """``impl="torch"`` (the way around a misbehaving kernel) concerns the PyTorch runtime: the
    exported graph computes the reference formula with standard ops, as under ``impl="auto"``."""
    torch.manual_seed(0)
    model = randomize_(gald.GALD(C, "gc", impl="torch"), seed=1).eval()
    path = deploy.export_onnx(model, _input(SHAPE), tmp_path / "m.onnx", dynamo=dynamo)
    assert deploy.onnx_custom_domains(onnx.load(str(path))) == set()
    err = deploy.verify_onnx(model, path, _input(SHAPE), _input(SHAPE2, seed=3))
    assert err <= RTOL, f"onnxruntime differs from eager by {err:.2e} (relative)"


def test_onnx_is_not_specialised_on_a_one_pixel_ld_map(tmp_path: Path) -> None:
    model = _block("gc")
    path = deploy.export_onnx(model, _input((2, C, 8, 8)), tmp_path / "small.onnx")
    err = deploy.verify_onnx(model, path, _input((1, C, 3, 5)), _input((2, C, 33, 40), seed=3))
    assert err <= RTOL, f"onnxruntime differs from eager by {err:.2e} (relative)"


def test_fx_symbolic_trace_names_the_leaf_module_remedy() -> None:
    # the traceable form is a leaf module (docs/deploy.md runs it); tracing into a layer says so
    import torch.fx

    for module in (gald.GALD(16, "gc"), gald.create_ga("psp", 16), gald.LocalDistribution(16)):
        with pytest.raises(TypeError, match=r"is a torch.fx Proxy: .*leaf_modules"):
            torch.fx.symbolic_trace(module)


@pytest.mark.parametrize(
    "pool", [nn.AdaptiveAvgPool2d((1, 6)), nn.AdaptiveAvgPool2d((6, 1)), nn.AdaptiveMaxPool2d(6)]
)
def test_export_refuses_any_fixed_grid_pooling_with_dynamic_sizes(tmp_path, pool):
    """A strip grid (1x6, 6x1) and max pooling bake their windows for the example's size just
    the same, so they are refused with dynamic sizes too; a 1x1 grid written as a list is
    global pooling and exports."""
    from gald.deploy import export_onnx

    model = nn.Sequential(nn.Conv2d(3, 4, 1), pool).eval()
    with pytest.raises(ValueError, match=r"1 \(Adaptive(Avg|Max)Pool2d\) calls .*dynamic_hw=True"):
        export_onnx(model, torch.randn(2, 3, 12, 12), tmp_path / "m.onnx", dynamic_hw=True)
    # global pooling written as a list (as a YAML config gives it) exports for any size
    listed = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d([1, 1])).eval()
    path = export_onnx(listed, torch.randn(2, 3, 12, 12), tmp_path / "g.onnx")
    assert deploy.verify_onnx(listed, path, torch.randn(2, 3, 13, 21)) < 1e-5


# --------------------------------------------------------------------------- the pooling watch


def _no_hooks(model: nn.Module) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class _Pool3d(nn.Module):
    """A 3-d adaptive pooling over (channels, H, W) to a 2x1x1 grid."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        z = F.adaptive_avg_pool3d(y.unsqueeze(1), (2, 1, 1))  # (B, 1, 2, 1, 1)
        return y + z.mean(dim=(1, 2), keepdim=True).squeeze(1)


@pytest.mark.parametrize("dynamo", [True, False])
def test_a_3d_pooling_grid_is_read_over_three_dims(tmp_path, dynamo) -> None:
    """The TorchScript exporter would write this file without complaint, wrong at other sizes."""
    model = nn.Sequential(nn.Identity(), _Pool3d()).eval()
    with pytest.raises(
        ValueError, match=r"1 \(_Pool3d\) calls adaptive_avg_pool3d to a 2x1x1 grid"
    ):
        deploy.export_onnx(model, torch.randn(2, 3, 12, 12), tmp_path / "m.onnx", dynamo=dynamo)


class _TwoGrids(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        a = F.interpolate(F.adaptive_avg_pool2d(x, 2), size=size)
        b = F.interpolate(torch._adaptive_avg_pool2d(x, [6, 6]), size=size)
        return x + a + b


def test_the_first_fixed_grid_is_named_without_a_private_prefix(tmp_path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _TwoGrids()).eval()
    with pytest.raises(ValueError, match=r"calls adaptive_avg_pool2d to a 2x2 grid"):
        deploy.export_onnx(model, torch.randn(2, 3, 12, 12), tmp_path / "m.onnx")
    second = nn.Sequential(nn.Conv2d(3, 4, 1), _Private()).eval()
    with pytest.raises(ValueError, match=r"1 \(_Private\) calls adaptive_avg_pool2d to a 6x6 grid"):
        deploy.export_onnx(second, torch.randn(2, 3, 12, 12), tmp_path / "m.onnx")


class _Private(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.interpolate(torch._adaptive_avg_pool2d(x, [6, 6]), size=x.shape[-2:])


class _Raises(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this path is not available")


class _Fallback(nn.Module):
    """Tries a path that raises, then pools (as modules with an optional kernel do)."""

    def __init__(self) -> None:
        super().__init__()
        self.fast = _Raises()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.fast(x)
        except RuntimeError:
            pass
        return x + F.interpolate(F.adaptive_avg_pool2d(x, 3), size=x.shape[-2:])


def test_the_submodule_stack_survives_a_raising_submodule(tmp_path) -> None:
    """A submodule that raised leaves the stack (its parent is named), and a forward that
    raises leaves no hook on the user's model."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _Fallback()).eval()
    with pytest.raises(
        ValueError, match=r"^export_onnx: 1 \(_Fallback\) calls adaptive_avg_pool2d"
    ):
        deploy.export_onnx(model, torch.randn(2, 3, 12, 12), tmp_path / "m.onnx")
    assert _no_hooks(model)
    broken = nn.Sequential(nn.Conv2d(3, 4, 1), _Raises()).eval()
    with pytest.raises(RuntimeError, match="not available"):
        deploy.export_onnx(broken, torch.randn(2, 3, 12, 12), tmp_path / "m.onnx")
    assert _no_hooks(broken)
    assert not (tmp_path / "m.onnx").exists()


def test_pooling_modules_are_named_by_their_full_path(tmp_path) -> None:
    x = torch.randn(2, 3, 12, 12)
    with pytest.raises(ValueError, match=r"^export_onnx: the module \(AdaptiveAvgPool2d\) calls"):
        deploy.export_onnx(nn.AdaptiveAvgPool2d(3).eval(), x, tmp_path / "m.onnx")
    nested = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.Sequential(nn.AdaptiveAvgPool2d(3), nn.Conv2d(4, 4, 1))
    ).eval()
    with pytest.raises(ValueError, match=r"^export_onnx: 1\.0 \(AdaptiveAvgPool2d\) calls"):
        deploy.export_onnx(nested, x, tmp_path / "m.onnx")


class _FunctionalGrid(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > 0:  # a branch: its pooling sits in a nested block of the graph
            x = x + F.interpolate(F.adaptive_max_pool2d(x, [2, 1]), size=x.shape[-2:])
        return x


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_models_are_read_from_their_graph(tmp_path, how) -> None:
    """Scripted and traced code runs outside Python and takes no hooks: their graphs are read
    instead. A global pooling exports; a pooling to a grid, as a module or a function call, is
    refused; dynamic_hw=False exports it."""
    x = torch.randn(2, 3, 12, 12)

    def convert(model: nn.Module) -> torch.jit.ScriptModule:
        model = model.eval()
        return torch.jit.script(model) if how == "script" else torch.jit.trace(model, x)

    pooled = convert(nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1)))
    path = deploy.export_onnx(pooled, x, tmp_path / "g.onnx", dynamo=False)
    assert deploy.verify_onnx(pooled, path, torch.randn(2, 3, 17, 9)) < 1e-5
    grid = convert(nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(3)))
    with pytest.raises(
        ValueError,
        match=r"^export_onnx: the module \(TorchScript\) calls adaptive_avg_pool2d to a 3x3 grid",
    ):
        deploy.export_onnx(grid, x, tmp_path / "m.onnx", dynamo=False)
    path = deploy.export_onnx(grid, x, tmp_path / "m.onnx", dynamo=False, dynamic_hw=False)
    assert deploy.verify_onnx(grid, path, x) < 1e-5
    # a function call, in a branch when scripted (a nested block of the graph)
    branchy = convert(nn.Sequential(nn.Conv2d(3, 4, 1), _FunctionalGrid()))
    with pytest.raises(
        ValueError,
        match=r"^export_onnx: the module \(TorchScript\) calls adaptive_max_pool2d to a 2x1 grid",
    ):
        deploy.export_onnx(branchy, x, tmp_path / "m.onnx", dynamo=False)


def test_torchscript_and_the_exporters_are_refused_by_name(tmp_path) -> None:
    """torch.export takes no ScriptModule (dynamo=True), and neither exporter takes an eager
    model holding a TorchScript part: named before either fails with its own traceback."""
    x = torch.randn(2, 3, 12, 12)
    plain = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()).eval()
    with pytest.raises(ValueError, match=r"TorchScript RecursiveScriptModule .* pass dynamo=False"):
        deploy.export_onnx(torch.jit.script(plain), x, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=r"TorchScript TopLevelTracedModule .* pass dynamo=False"):
        deploy.export_onnx(torch.jit.trace(plain, x), x, tmp_path / "m.onnx")
    mixed = nn.Sequential(torch.jit.script(plain), nn.Conv2d(4, 4, 1)).eval()
    for dynamo in (True, False):
        with pytest.raises(
            ValueError, match=r"^export_onnx: 0 is a TorchScript .* inside an eager"
        ):
            deploy.export_onnx(mixed, x, tmp_path / "m.onnx", dynamo=dynamo)
    assert not (tmp_path / "m.onnx").exists()


class _GlobalContext(nn.Module):
    """x plus its global average, upsampled: a graph the TorchScript exporter writes invalid
    when the module is scripted (a Concat of ranks 1 and 2 feeding Resize's sizes)."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return x + F.interpolate(self.pool(x), size=size, mode="bilinear", align_corners=False)


def test_an_invalid_file_is_reported_not_returned(tmp_path) -> None:
    """The file is run through the ONNX checker with shape inference (what onnxruntime does on
    loading): an exporter's invalid graph is a RuntimeError, not a path to a file that fails
    at deployment."""
    script = torch.jit.script(_GlobalContext().eval())
    x = torch.randn(2, 8, 24, 24)
    with pytest.raises(RuntimeError, match=r"is not a valid ONNX model.*ShapeInferenceError"):
        deploy.export_onnx(script, x, tmp_path / "m.onnx", dynamo=False)
    eager = _GlobalContext().eval()  # the same module, exported from eager code, is valid
    path = deploy.export_onnx(eager, x, tmp_path / "e.onnx")
    assert deploy.verify_onnx(eager, path, x, torch.randn(2, 8, 17, 31)) < 1e-5
