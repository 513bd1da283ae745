"""The whole Local Distribution as one autograd node, for eager training on CPU.

``out = x * (offset + sigmoid(Up(rest(conv1(x)))))``, where ``conv1`` is the first depthwise
conv of the LD branch and ``rest`` every later layer of it. Forward runs the branch without
autograd (``conv1`` in channels_last, slab by slab for an NCHW ``x``; the BatchNorms update their
running statistics once) and the modulation with the chunked kernels of
:mod:`gald.ops._ld_torch`. It keeps ``x``, the first conv's output and the logits.

Backward, in one node:

1. the modulation's gradients: ``grad_x`` (written into the single new full-resolution tensor of
   the backward) and ``grad_logits``;
2. ``rest`` is replayed from the first conv's output (:mod:`gald.ops._replay`) and
   differentiated, giving ``grad_z`` and the gradients of its parameters;
3. the first conv's backward, slab by slab, **adds** its input gradient into ``grad_x``.

Compared with the same computation as separate autograd nodes this saves one full-resolution
allocation and one full-resolution addition in backward (on CPU a fresh 37 MB tensor costs about
as much as a pass of arithmetic over it, in page faults), and the branch's activations after the
first conv.

Shape: ``x`` (B, C, H, W); the output has its memory format. Memory kept for backward:
``x`` + (B, C, H', W') (the first conv's output, H' ~ H/2) + the logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import _ld_torch
from ._depthwise_cl import depthwise_backward, depthwise_forward
from ._replay import chain_parameters, replay_backward, run_chain


def _like_param(g: torch.Tensor | None, param: torch.Tensor) -> torch.Tensor | None:
    if g is None or g.stride() == param.stride():
        return g
    return torch.empty_like(param).copy_(g)


class _LDTrainCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, offset, conv, rest, n_conv_params, *params):  # type: ignore[override]
        z = depthwise_forward(x, conv)
        logits = run_chain(rest, z, owns_input=False)
        out = _ld_torch.forward(x, logits, offset, True)
        ctx.save_for_backward(x, z, logits)
        ctx.offset = offset
        ctx.conv = conv
        ctx.rest = rest
        ctx.n_conv_params = n_conv_params
        ctx.params = params
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        x, z, logits = ctx.saved_tensors
        k = ctx.n_conv_params
        need_x = ctx.needs_input_grad[0]
        need_params = ctx.needs_input_grad[5:]
        need_conv = tuple(need_params[:k]) + (False,) * (2 - k)
        need_rest = need_params[k:]
        need_z = need_x or any(need_conv)
        gx, gl = _ld_torch.backward(
            grad, x, logits, ctx.offset, True, need_x, need_z or any(need_rest)
        )
        gz: torch.Tensor | None = None
        g_rest: list[torch.Tensor | None] = [None] * len(need_rest)
        if gl is not None:
            gz, g_rest = replay_backward(z, ctx.rest, ctx.params[k:], gl, need_z, need_rest)
        gw = gb = None
        if gz is not None:
            gx, gw, gb = depthwise_backward(
                gz, x, ctx.conv, (need_x, need_conv[0], need_conv[1]), gx
            )
        g_conv = [gw, gb][:k]
        # Convs replayed on channels_last activations give weight gradients with channels_last
        # strides; return every gradient in its parameter's layout (DDP's gradient buckets
        # expect it and warn otherwise).
        grads = [_like_param(g, q) for g, q in zip([*g_conv, *g_rest], ctx.params)]
        return (gx, None, None, None, None, *grads)


def ld_train_cpu(
    x: torch.Tensor, conv: nn.Conv2d, rest: Sequence[nn.Module], offset: float
) -> torch.Tensor:
    """``x * (offset + sigmoid(Up(rest(conv(x)))))`` as one autograd node (module docstring)."""
    conv_params = [conv.weight] + ([conv.bias] if conv.bias is not None else [])
    rest_params = [p for p in chain_parameters(rest) if all(p is not q for q in conv_params)]
    return _LDTrainCPU.apply(
        x, float(offset), conv, tuple(rest), len(conv_params), *conv_params, *rest_params
    )
