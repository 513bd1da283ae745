"""ONNX export of gald layers to standard ops only, and a parity check with onnxruntime.

Needs the ``[onnx]`` extra (``pip install gald[onnx]``: onnx, onnxruntime, onnxscript).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .._validate import check_bool, check_feature, check_positive_int, first_line

__all__ = [
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "STANDARD_DOMAINS",
    "export_onnx",
    "onnx_custom_domains",
    "verify_onnx",
]

MIN_OPSET = 17
"""Lowest ONNX opset accepted (LayerNormalization is an opset-17 operator)."""

DEFAULT_OPSET = 18
"""The opset the dynamo exporter builds natively; asking it for 17 adds a version conversion
(about 4 s per export on a 2-core machine, which torch warns may fail)."""

STANDARD_DOMAINS = frozenset({"", "ai.onnx"})
"""Operator domains of the standard ONNX operator set; anything else is a custom op."""

_AXIS_NAMES = {0: "batch", 2: "height", 3: "width"}


def _check_module(module: object, who: str) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{who}: module must be a torch.nn.Module, got {type(module).__name__}")
    return module


def _import(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError as err:  # pragma: no cover - the extra is installed in CI
        raise ImportError(
            f"{name} is needed for ONNX export and checks: pip install 'gald[onnx]'"
        ) from err


def _check_path(path: object, who: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{who}: path must be a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


def onnx_custom_domains(model: Any) -> set[str]:
    """Operator domains outside the standard ONNX set used anywhere in ``model`` (an
    ``onnx.ModelProto``): graph nodes, nested graphs (``If``/``Loop`` bodies) and local functions.
    A call to a local function counts as non-standard too, so a clean result means every node
    is a standard ONNX operator."""
    if not (hasattr(model, "graph") and hasattr(model, "functions")):
        raise TypeError(
            "onnx_custom_domains: model must be an onnx.ModelProto (onnx.load(path)), got "
            f"{type(model).__name__} {model!r:.80}"
        )
    found: set[str] = set()

    def walk(nodes: Iterable[Any]) -> None:
        for node in nodes:
            if node.domain not in STANDARD_DOMAINS:
                found.add(node.domain)
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g.node)
                for graph in attr.graphs:
                    walk(graph.node)

    walk(model.graph.node)
    for function in model.functions:
        walk(function.node)
    return found


def _opset(model: Any) -> int:
    for entry in model.opset_import:
        if entry.domain in STANDARD_DOMAINS:
            return int(entry.version)
    return 0


def _check_exported(onnx: Any, path: Path, dynamic: dict[int, bool]) -> None:
    """The written file: a valid model for the ONNX checker (with shape inference, which is
    what onnxruntime runs when it loads a file), standard domains, the opset, dynamic axes."""
    try:  # by path: a model above protobuf's 2 GB limit is checked with its external data
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise RuntimeError(
            f"export_onnx: the file written to {path} is not a valid ONNX model, and onnxruntime "
            f"would refuse to load it: {first_line(exc)}. The exporter produced it from this "
            "module; try the other exporter (dynamo=True/False) or report it to PyTorch"
        ) from exc
    model = onnx.load(str(path), load_external_data=False)
    custom = onnx_custom_domains(model)
    if custom:
        raise RuntimeError(
            f"export_onnx: the graph written to {path} uses non-standard ONNX operator domains "
            f"{sorted(custom)}; a plain onnxruntime cannot run it. Please report this as a bug."
        )
    opset = _opset(model)
    if opset < MIN_OPSET:
        raise RuntimeError(f"export_onnx: the graph uses opset {opset}, expected >= {MIN_OPSET}")
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for axis, want_dynamic in dynamic.items():
        is_dynamic = not dims[axis].HasField("dim_value")
        if want_dynamic and not is_dynamic:
            raise RuntimeError(
                f"export_onnx: the {_AXIS_NAMES[axis]} axis of the input was specialised to "
                f"{dims[axis].dim_value} although a dynamic one was requested"
            )


def export_onnx(
    module: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    dynamic_batch: bool = True,
    dynamic_hw: bool = True,
    opset: int = DEFAULT_OPSET,
    dynamo: bool = True,
    external_data: bool = False,
) -> Path:
    """Export ``module`` (in eval mode) to an ONNX file of standard operators only.

    With ``dynamic_hw=True`` a module whose example forward runs an adaptive pooling to a grid
    other than 1x1 (``nn.AdaptiveAvgPool2d(6)`` as in many PSP modules, or
    ``F.adaptive_avg_pool2d(x, 6)``) is refused with a ``ValueError`` naming the submodule: the
    exporters bake its windows for the example's size, and the file would silently compute
    wrong values at other sizes. A TorchScript (scripted or traced) model is judged from its
    graph; it exports with ``dynamo=False`` only, and an eager model holding a TorchScript part
    is refused (``ValueError``), as neither exporter takes it. After export the file is checked:
    a valid model for the ONNX checker with shape inference (what onnxruntime runs on loading),
    standard operator domains only, opset >= 17 and the requested axes dynamic; otherwise
    ``RuntimeError``. Whether onnxruntime computes what eager PyTorch does is
    :func:`verify_onnx`'s check, a separate call.

    Args:
        module: the model; must be in eval mode (``module.eval()``). It may return a tensor
            (ONNX output ``"output"``), a dict of tensors (outputs named by its keys, e.g. a
            torchvision segmentation model's ``"out"`` and ``"aux"``), or a list or tuple
            (``"output_0"``, ``"output_1"``, ...).
        example_input: a (B, C, H, W) floating tensor; ``B >= 2`` when ``dynamic_batch`` and
            ``H, W >= 2`` when ``dynamic_hw`` (torch.export specialises axes of size 1).
        path: the ``.onnx`` file to write.
        dynamic_batch: export the batch axis as dynamic.
        dynamic_hw: export the height and width axes as dynamic.
        opset: target ONNX opset, at least 17 (default 18, the dynamo exporter's own; 17 is
            reached by a version conversion).
        dynamo: use the ``torch.export``-based exporter (torch's default); ``False`` uses the
            TorchScript-based exporter.
        external_data: write the weights to a second file, ``<path>.data``, beside the graph
            (needed above protobuf's 2 GB limit; ship both files together). ``False`` (the
            default) writes one self-contained file. Dynamo exporter only.

    Returns:
        The path written.

    Example:
        >>> import torch, gald
        >>> head = gald.GALDHead(64, 19, channels=64).eval()
        >>> gald.deploy.export_onnx(head, torch.randn(2, 64, 33, 33), "head.onnx")  # doctest: +SKIP
    """
    _check_module(module, "export_onnx")
    check_feature(example_input, None, name="example_input", who="export_onnx")
    opset = check_positive_int(opset, "opset", minimum=MIN_OPSET)
    external_data = check_bool(external_data, "external_data")
    dynamic_batch = check_bool(dynamic_batch, "dynamic_batch")
    dynamic_hw = check_bool(dynamic_hw, "dynamic_hw")
    dynamo = check_bool(dynamo, "dynamo")
    if external_data and not dynamo:
        raise ValueError(
            "export_onnx: external_data=True needs dynamo=True (the TorchScript exporter writes "
            "the weights into the file)"
        )
    if module.training:
        raise ValueError(
            "export_onnx: module must be in eval mode (call module.eval() first); ONNX graphs are "
            "exported for inference, with BatchNorm running statistics"
        )
    b, _, h, w = example_input.shape
    if dynamic_batch and b < 2:
        raise ValueError(
            "export_onnx: example_input must have batch >= 2 with dynamic_batch=True "
            f"(torch.export specialises size-1 axes), got shape {tuple(example_input.shape)}"
        )
    if dynamic_hw and (h < 2 or w < 2):
        raise ValueError(
            "export_onnx: example_input must have height and width >= 2 with "
            f"dynamic_hw=True, got shape {tuple(example_input.shape)}"
        )
    path = _check_path(path, "export_onnx")
    if not path.parent.is_dir():
        raise ValueError(
            f"export_onnx: path {str(path)!r} is in a folder that does not exist "
            f"({str(path.parent)!r}); create it first"
        )
    _refuse_torchscript(module, dynamo)
    onnx = _import("onnx")
    dynamic = {0: bool(dynamic_batch), 2: bool(dynamic_hw), 3: bool(dynamic_hw)}
    with torch.no_grad():
        if dynamic_hw:
            example_out = _run_watching_pooling(module, example_input)
        else:
            example_out = module(example_input)
    flat = _flat_outputs(example_out, "export_onnx")
    if isinstance(example_out, Mapping) and len(flat) == len(example_out):
        output_names = [str(k) for k in example_out]  # e.g. "out", "aux"
    elif len(flat) == 1:
        output_names = ["output"]
    else:
        output_names = [f"output_{i}" for i in range(len(flat))]
    if dynamo:
        _import("onnxscript")
        spec = {axis: torch.export.Dim.DYNAMIC for axis, on in dynamic.items() if on}
        torch.onnx.export(
            module,
            (example_input,),
            str(path),
            dynamo=True,
            external_data=external_data,
            opset_version=opset,
            dynamic_shapes=(spec,) if spec else None,
            verbose=False,
            input_names=["input"],
            output_names=output_names,
        )
    else:
        axes = {axis: _AXIS_NAMES[axis] for axis, on in dynamic.items() if on}
        dynamic_axes = {"input": axes}
        for name, t in zip(output_names, flat):  # the batch axis always; H and W of 4-D maps
            dynamic_axes[name] = {a: n for a, n in axes.items() if t.dim() == 4 or a == 0}
        torch.onnx.export(
            module,
            (example_input,),
            str(path),
            dynamo=False,
            opset_version=opset,
            dynamic_axes=dynamic_axes if axes else None,
            input_names=["input"],
            output_names=output_names,
        )
    _check_exported(onnx, path, dynamic)
    return path


def _is_adaptive_pooling(name: str) -> bool:
    """Whether a function or TorchScript op of this name pools adaptively (1, 2 or 3-d,
    average or max, public or underscored)."""
    return "adaptive_" in name and "_pool" in name


def _fixed_grid_refused(
    where: str, op: str, grid: str, *, input_shape: tuple[int, ...] | None = None, remedy: str = ""
) -> ValueError:
    """The refusal of an adaptive pooling to a grid other than 1x1 with dynamic sizes."""
    on = "" if input_shape is None else f" (on an input of shape {input_shape})"
    return ValueError(
        f"export_onnx: {where} calls {op} to a {grid} grid{on}; the exporters bake its windows "
        "for the example's size, so with dynamic_hw=True the file would compute wrong values at "
        f"other sizes. Export at the size you deploy with dynamic_hw=False{remedy}"
    )


class _AdaptivePoolingWatch(TorchFunctionMode):
    """Notes the first adaptive pooling to a grid other than 1x1 that runs, whatever called it
    (a module or a function such as ``F.adaptive_avg_pool2d``, in 1, 2 or 3 dimensions), and in
    which submodule. The grid is read from the result, so every way of writing the output size
    (an int, a list, ``None`` for the input's size) is judged alike."""

    def __init__(self) -> None:
        super().__init__()
        self.where: list[str] = []
        self.found: tuple[str, str, tuple[int, ...], tuple[int, ...]] | None = None

    def leave(self, *_: object) -> None:
        """A forward hook: the submodule has returned (a hook must return None)."""
        self.where.pop()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if self.found is None and _is_adaptive_pooling(name):
            dims = 3 if "3d" in name else 1 if "1d" in name else 2
            result = out[0] if isinstance(out, tuple) else out  # max pooling may add indices
            grid = tuple(int(s) for s in result.shape[-dims:])
            if any(s != 1 for s in grid):
                where = self.where[-1] if self.where else "the module"
                self.found = (where, name.lstrip("_"), grid, tuple(args[0].shape))
        return out


def _run_watching_pooling(module: nn.Module, x: torch.Tensor) -> Any:
    """``module(x)``, refused afterwards (``ValueError``) when an adaptive pooling to a grid other
    than 1x1 ran inside it: the exporters bake its windows (or index tables) for the example's
    size, and at another size onnxruntime gives wrong values, or fails only at some sizes."""
    if isinstance(module, torch.jit.ScriptModule):  # its code runs outside Python, unseen
        _refuse_scripted_pooling(module)  # by the watch and without hooks: read its graph
        return module(x)
    watch = _AdaptivePoolingWatch()
    handles = []
    for name, sub in module.named_modules():  # no TorchScript part: _refuse_torchscript
        label = f"{name or 'the module'} ({type(sub).__name__})"
        handles.append(sub.register_forward_pre_hook(lambda *_, n=label: watch.where.append(n)))
        handles.append(sub.register_forward_hook(watch.leave, always_call=True))
    try:
        with watch:
            out = module(x)
    finally:
        for handle in handles:
            handle.remove()
    if watch.found is not None:
        where, op, size, shape = watch.found
        raise _fixed_grid_refused(
            where,
            op,
            "x".join(map(str, size)),
            input_shape=shape,
            remedy=" (or use gald.ga.PyramidPooling, whose exact averaging exports for any size)",
        )
    return out


def _refuse_torchscript(module: nn.Module, dynamo: bool) -> None:
    """TorchScript and torch's exporters: a scripted or traced model exports with the
    TorchScript-based exporter only (``torch.export`` takes no ScriptModule), and a model that
    holds a TorchScript part with neither; say so before either fails with its own traceback."""
    if isinstance(module, torch.jit.ScriptModule):
        if dynamo:
            raise ValueError(
                f"export_onnx: the module is a TorchScript {type(module).__name__} "
                f"({getattr(module, 'original_name', '?')}); torch.export, which dynamo=True "
                "uses, does not take ScriptModules: pass dynamo=False (or export the eager "
                "module)"
            )
        return
    for name, sub in module.named_modules():
        if isinstance(sub, torch.jit.ScriptModule):
            raise ValueError(
                f"export_onnx: {name} is a TorchScript {type(sub).__name__} "
                f"({getattr(sub, 'original_name', '?')}) inside an eager model; neither of "
                "torch's ONNX exporters takes such a mix: export the eager module, or script or "
                "trace the whole model and pass dynamo=False"
            )


def _constant_ints(value: Any) -> list[int | None]:
    """The ints of a TorchScript graph value that is a constant int or list of ints, or a list
    built from such constants (``None`` for an element computed at run time)."""
    producer = value.node()
    if producer.kind() == "prim::Constant":
        constant = value.toIValue()
        return list(constant) if isinstance(constant, (list, tuple)) else [constant]
    if producer.kind() == "prim::ListConstruct":
        return [
            v.toIValue() if v.node().kind() == "prim::Constant" else None for v in producer.inputs()
        ]
    return [None]


def _scripted_pooling(graph: Any) -> tuple[str, tuple[int | None, ...]] | None:
    """The first adaptive pooling to a grid other than 1x1 in a TorchScript graph (nested blocks
    included), as the op's name and its constant output size; sizes computed at run time are not
    judged."""
    for node in graph.nodes():
        kind = node.kind()
        if kind.startswith("aten::") and _is_adaptive_pooling(kind):
            sizes = _constant_ints(list(node.inputs())[1])
            if any(s is not None and s != 1 for s in sizes):
                return kind.removeprefix("aten::").lstrip("_"), tuple(sizes)
        for block in node.blocks():
            found = _scripted_pooling(block)
            if found is not None:
                return found
    return None


def _refuse_scripted_pooling(script: torch.jit.ScriptModule) -> None:
    """A scripted or traced model whose graph pools adaptively to a grid other than 1x1,
    refused as the watch refuses such a pooling run in Python."""
    found = _scripted_pooling(script.inlined_graph)
    if found is not None:
        op, sizes = found
        grid = "x".join("?" if s is None else str(s) for s in sizes)
        raise _fixed_grid_refused("the module (TorchScript)", op, grid)


def _flat_outputs(out: Any, who: str) -> list[torch.Tensor]:
    """The tensors of a module's output in the order ONNX lists them: a tensor, or the values of
    a dict (in insertion order), list or tuple, recursively."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flat_outputs(v, who)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flat_outputs(v, who)]
    raise TypeError(
        f"{who}: the module returned {type(out).__name__}; expected a tensor, or a dict, list or "
        "tuple of tensors"
    )


@torch.no_grad()
def verify_onnx(module: nn.Module, path: str | os.PathLike[str], *inputs: torch.Tensor) -> float:
    """Run the ONNX file with onnxruntime (CPU) on each input and compare with ``module``.

    A module may return a tensor or a dict, list or tuple of tensors (a torchvision-style
    ``{"out": ..., "aux": ...}``); every output is compared, in the order ONNX lists them.

    Returns:
        The worst relative error ``max|onnx - eager| / max|eager|`` over the inputs and outputs
        (the library exports within 1e-4); ``inf`` when either side has a NaN or an infinity.
    """
    _check_module(module, "verify_onnx")
    if module.training:
        raise ValueError("verify_onnx: module must be in eval mode (call module.eval() first)")
    if not inputs:
        raise ValueError("verify_onnx: give at least one input tensor")
    path = _check_path(path, "verify_onnx")
    if not path.is_file():
        raise FileNotFoundError(f"verify_onnx: path {str(path)!r} is not a file")
    ort = _import("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    worst = 0.0
    for i, x in enumerate(inputs):
        check_feature(x, None, name=f"inputs[{i}]", who="verify_onnx")
        refs = _flat_outputs(module(x), "verify_onnx")
        outs = session.run(None, {input_name: x.detach().cpu().numpy()})
        if len(outs) != len(refs):
            raise ValueError(
                f"verify_onnx: onnxruntime returned {len(outs)} outputs for inputs[{i}], eager "
                f"returned {len(refs)}"
            )
        for j, (got, want) in enumerate(zip(outs, refs)):
            out, ref = torch.from_numpy(got), want.detach().float().cpu()
            if tuple(out.shape) != tuple(ref.shape):
                raise ValueError(
                    f"verify_onnx: onnxruntime returned shape {tuple(out.shape)} for output {j} "
                    f"of inputs[{i}] (shape {tuple(x.shape)}), eager returned {tuple(ref.shape)}"
                )
            if ref.numel() == 0:  # an empty output (batch 0) matches in shape, which is all
                continue
            if not (torch.isfinite(out).all() and torch.isfinite(ref).all()):
                return math.inf  # a nan or inf on either side is no match, whatever max() says
            scale = ref.abs().max().clamp_min(torch.finfo(ref.dtype).tiny)
            worst = max(worst, float((out.float() - ref).abs().max() / scale))
    return worst
