"""Running a module in eval mode for a while without changing its own training flags, and
running compiled modules eagerly for a dry run."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module.eval()`` inside the block; afterwards the module and each of its submodules get
    their own training flag back (a frozen norm inside a module in training mode stays frozen),
    also when the block raises."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def eager() -> contextlib.AbstractContextManager[Any]:
    """Run code compiled with ``torch.compile`` eagerly inside the block: a dry run then neither
    compiles graphs nor records the sizes TorchDynamo uses to decide which dimensions of the
    user's first compile are dynamic, and hooks added after a compile are called. A process that
    has not imported ``torch._dynamo`` has compiled nothing (importing it costs about a second)."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.set_stance("force_eager")
    return contextlib.nullcontext()


@contextlib.contextmanager
def dry_run(module: nn.Module) -> Iterator[None]:
    """What gald runs a user's module under when it only observes it (the dry runs that read
    widths and sizes, gate statistics): eval mode (flags restored afterwards), no gradients,
    compiled code run eagerly."""
    with eval_mode(module), torch.no_grad(), eager():
        yield
