"""Running a module in eval mode for a while without changing its own training flags."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
