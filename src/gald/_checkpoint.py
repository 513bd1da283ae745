"""Gradient checkpointing of a module that updates its buffers once per step.

``torch.utils.checkpoint`` runs a module's forward a second time in backward; a BatchNorm in
training mode would update its running statistics (and ``num_batches_tracked``) again there.
:func:`checkpoint_once` restores the buffers around the recomputation, so a checkpointed step
leaves them as an ordinary step does. Used by the LD branch and the ResNet blocks.

The recomputation runs the whole module (``set_checkpoint_early_stop(False)``): with early
stopping, PyTorch ends it as soon as every saved tensor has been produced, which leaves a tensor
that an op saves first and fills afterwards unfilled (``nn.RReLU``'s noise when it is the
module's last op: its gradients were wrong by orders of magnitude).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop


class _BuffersKept:
    """Leave every buffer of ``module`` as it was on entry (BatchNorm running statistics and
    ``num_batches_tracked``): the recomputation of a checkpointed branch must not update them a
    second time. Re-enterable: each backward through the same graph (``retain_graph=True``)
    recomputes the branch again, inside the same object."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.saved: list[dict[str, torch.Tensor]] = []

    def __enter__(self) -> None:
        self.saved.append({name: b.clone() for name, b in self.module.named_buffers()})

    def __exit__(self, *exc: object) -> None:
        saved = self.saved.pop()
        with torch.no_grad():
            for name, b in self.module.named_buffers():
                if name in saved:
                    b.copy_(saved[name])


def checkpoint_once(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` under non-reentrant ``torch.utils.checkpoint``, buffers updated once."""
    if torch.compiler.is_compiling():
        # dynamo traces checkpointing as one region; with an AOT backend (inductor, aot_eager)
        # the compiler plans the recomputation and applies buffer updates once. It accepts no
        # context_fn.
        return checkpoint(module, x, use_reentrant=False)
    with set_checkpoint_early_stop(False):
        return checkpoint(
            module,
            x,
            use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), _BuffersKept(module)),
        )
