"""Helpers shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


def randomise(layer: nn.Module, seed: int = 0) -> nn.Module:
    """Random non-zero weights everywhere (zero-initialised gates and norms included) and random
    BatchNorm statistics, so that comparisons with a reference are not vacuous."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        for name, buf in layer.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=gen) + 0.5)
    return layer


def bn_reference(bn: nn.Module, y: torch.Tensor, training: bool) -> torch.Tensor:
    """Batch norm written out: batch statistics (biased variance) in training, running ones in
    eval, then the affine map."""
    if training:
        mean = y.mean(dim=(0, 2, 3))
        var = y.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    shape = (1, -1, 1, 1)
    normed = (y - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + bn.eps)
    return normed * bn.weight.reshape(shape) + bn.bias.reshape(shape)


def assert_close(
    got: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-6, atol: float = 1e-6
) -> None:
    """Elementwise |got - expected| <= atol + rtol * |expected|, same shape and dtype."""
    assert got.shape == expected.shape and got.dtype == expected.dtype, (got.shape, expected.shape)
    bound = atol + rtol * expected.abs()
    err = (got - expected).abs()
    assert bool((err <= bound).all()), f"max abs error {err.max().item():.3e}"


def require_triton_interpreter() -> None:
    """Skip unless triton is installed and its interpreter can run the LD kernels (triton 3.7 or
    newer: older interpreters turn a runtime loop bound into a one-element NumPy array, which
    ``int()`` refuses under NumPy 2, and their ``tl.dot`` has no float64). The real GPU
    compilation is tested on every triton version (``test_kernels_compile_for_cuda``)."""
    import pytest

    triton = pytest.importorskip("triton", reason="triton is not installed: the kernels cannot run")
    from gald.ops import _triton_ld

    if _triton_ld._triton_version() < (3, 7):
        pytest.skip(
            f"Triton's interpreter before 3.7 cannot run the kernels (triton {triton.__version__})"
        )


def assert_finite_under_fp16_autocast(module: nn.Module, x: torch.Tensor) -> None:
    """Eval-mode ``module(x)`` under CPU float16 autocast: finite, and within 1 % of the
    largest float32 output."""
    with torch.no_grad():
        ref = module(x)
        with torch.autocast("cpu", dtype=torch.float16):
            out = module(x)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() <= 1e-2 * ref.abs().max()
