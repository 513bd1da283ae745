"""Depthwise convolution of an NCHW input computed in channels_last, one channel slab at a time.

On CPU a depthwise conv is several times faster on a channels_last input than on NCHW (oneDNN
reorders an NCHW input into a fresh full-size buffer first). Converting the whole input costs a
full-resolution copy, and autograd would then keep that copy alive for backward. A depthwise
conv treats every channel on its own, so here the input is cut into slabs of a few channels
that fit in cache; each slab is converted to channels_last, convolved, and written into a
channels_last output. Backward does the same per slab. Autograd saves only the original input
(which the LD modulation saves anyway) and the weight.

Shape: input (B, C, H, W) contiguous NCHW, weight (C, 1, kh, kw), output (B, C, H', W') in
channels_last. Time as the plain conv, memory O(B * slab * H * W) of extra workspace.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from . import _alloc

# Elements of x per slab (about 1 MiB of float32; see _slab for the rounding).
SLAB_ELEMS = 1 << 18


def _slab(x: torch.Tensor) -> int:
    """Channels per slab: about ``SLAB_ELEMS`` elements, a multiple of 8 channels when that
    is at least 8 (oneDNN's channels_last depthwise kernels vectorise over channels)."""
    b, c, h, w = x.shape
    target = SLAB_ELEMS / max(1, b * h * w)
    n = 8 * round(target / 8) if target >= 8 else int(target)
    return max(1, min(c, n))


def conv_config(conv: nn.Conv2d) -> tuple[list[int], list[int], list[int]]:
    """(stride, padding, dilation) of ``conv`` as lists."""
    if isinstance(conv.padding, str):
        raise ValueError(f"conv.padding must be numeric here, got {conv.padding!r}")
    return list(conv.stride), [int(p) for p in conv.padding], list(conv.dilation)


def is_depthwise(conv: nn.Module) -> bool:
    """A zero-padded ``nn.Conv2d`` with ``groups == in_channels == out_channels``."""
    return (
        type(conv) is nn.Conv2d
        and conv.groups == conv.in_channels == conv.out_channels
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


def slab_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> torch.Tensor:
    """The depthwise conv of an NCHW ``x``, slab by slab; the output is channels_last."""
    b, c = x.shape[:2]
    step = _slab(x)
    out: torch.Tensor | None = None
    for c0 in range(0, c, step):
        c1 = min(c0 + step, c)
        xs = x[:, c0:c1].contiguous(memory_format=torch.channels_last)
        bs = bias[c0:c1] if bias is not None else None
        ys = F.conv2d(xs, weight[c0:c1], bs, stride, padding, dilation, c1 - c0)
        if out is None:
            out = torch.empty(
                (b, c, ys.shape[-2], ys.shape[-1]),
                dtype=ys.dtype,
                device=ys.device,
                memory_format=torch.channels_last,
            )
        out[:, c0:c1].copy_(ys)
    assert out is not None
    return out


def _backward_cl(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    need: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``convolution_backward`` of a depthwise conv, run in channels_last; ``need[2]`` asks for
    the bias gradient."""
    n = weight.shape[0]
    return torch.ops.aten.convolution_backward(
        grad.contiguous(memory_format=torch.channels_last),
        x.contiguous(memory_format=torch.channels_last),
        weight,
        [n] if need[2] else None,
        stride,
        padding,
        dilation,
        False,
        [0, 0],
        n,
        list(need),
    )


def slab_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    has_bias: bool,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    need: tuple[bool, bool, bool],
    grad_x_into: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`slab_forward` w.r.t. (x, weight, bias), ``None`` where not needed.

    With ``grad_x_into`` (a tensor shaped like ``x``) the input gradient is added into it and
    returned, instead of being written into a new tensor.
    """
    need_x, need_w, need_b = need[0], need[1], need[2] and has_bias
    gx = None
    if need_x:
        gx = grad_x_into if grad_x_into is not None else _alloc.empty_like(x)
    gw = torch.empty_like(weight) if need_w else None
    gb = weight.new_empty(weight.shape[0]) if need_b else None
    if not (need_x or need_w or need_b):
        return gx, gw, gb
    step = _slab(x)
    for c0 in range(0, x.shape[1], step):
        c1 = min(c0 + step, x.shape[1])
        rx, rw, rb = _backward_cl(
            grad[:, c0:c1],
            x[:, c0:c1],
            weight[c0:c1],
            stride,
            padding,
            dilation,
            (need_x, need_w, need_b),
        )
        if gx is not None:
            if grad_x_into is not None:
                gx[:, c0:c1].add_(rx)
            else:
                gx[:, c0:c1].copy_(rx)
        if gw is not None:
            gw[c0:c1].copy_(rw)
        if gb is not None:
            gb[c0:c1].copy_(rb)
    return gx, gw, gb


class _SlabDepthwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, bias is not None)
        return slab_forward(x, weight, bias, stride, padding, dilation)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        stride, padding, dilation, has_bias = ctx.conf
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        gx, gw, gb = slab_backward(grad, x, weight, has_bias, stride, padding, dilation, need)
        return gx, gw, gb, None, None, None


def is_nchw(x: torch.Tensor) -> bool:
    """Contiguous NCHW and not also channels_last (the layout the slab path is for)."""
    return x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)


def depthwise_forward(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(x)`` computed in channels_last without an autograd node of its own: slab by slab
    for an NCHW-contiguous ``x``, as a whole otherwise. The output is channels_last."""
    stride, padding, dilation = conv_config(conv)
    if is_nchw(x):
        return slab_forward(x, conv.weight, conv.bias, stride, padding, dilation)
    xc = x.contiguous(memory_format=torch.channels_last)
    return F.conv2d(xc, conv.weight, conv.bias, stride, padding, dilation, conv.groups)


def depthwise_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    conv: nn.Conv2d,
    need: tuple[bool, bool, bool],
    grad_x_into: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`depthwise_forward` w.r.t. (x, weight, bias), ``None`` where not
    needed; with ``grad_x_into`` the input gradient is added into it and returned."""
    stride, padding, dilation = conv_config(conv)
    has_bias = conv.bias is not None
    if is_nchw(x):
        return slab_backward(
            grad, x, conv.weight, has_bias, stride, padding, dilation, need, grad_x_into
        )
    need = (need[0], need[1], need[2] and has_bias)
    rx, rw, rb = _backward_cl(grad, x, conv.weight, stride, padding, dilation, need)
    if need[0] and grad_x_into is not None:
        grad_x_into.add_(rx)
        rx = grad_x_into
    return (rx if need[0] else None), (rw if need[1] else None), (rb if need[2] else None)


def depthwise_conv_cl(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(x)`` for a depthwise ``conv``, computed in channels_last; the output is channels_last.

    An NCHW-contiguous ``x`` goes slab by slab (see the module docstring); any other ``x`` is
    converted as a whole (a no-op when it is channels_last already).
    """
    if is_nchw(x):
        stride, padding, dilation = conv_config(conv)
        return _SlabDepthwise.apply(x, conv.weight, conv.bias, stride, padding, dilation)
    return depthwise_forward(x, conv)
