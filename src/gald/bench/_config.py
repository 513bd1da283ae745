"""What every benchmark table is run with: device, dtype, memory format, threads, timing budget."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

from ._timing import Progress

M = TypeVar("M", bound=nn.Module)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Config:
    shape: tuple[int, int, int, int]
    device: torch.device
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    threads: int = 1
    min_time: float = 2.0
    rounds: int = 5
    compile: bool = False
    quiet: bool = False
    progress: Progress = field(default_factory=lambda: Progress(1.0, enabled=False))
    say: Callable[[str], None] = print

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def autocast(self) -> AbstractContextManager[object]:
        """Autocast to ``dtype`` on the device (nothing for float32)."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def tensor(self, *shape: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """A float32 standard-normal tensor on the device in the memory format."""
        t = torch.randn(*shape, generator=generator).to(self.device)
        if t.dim() == 4:
            t = t.contiguous(memory_format=self.memory_format)
        return t

    def module(self, m: M) -> M:
        """``m`` moved to the device (and converted to channels_last when asked), in place."""
        m.to(self.device)
        if self.channels_last:
            m.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return m

    def describe(self, *, kernels: bool = False) -> str:
        """The run's device, dtype, memory format and threads; with ``kernels``, the device and
        threads only (the kernel checks cover every dtype and format, each named in its row)."""
        fmt = "channels_last" if self.channels_last else "NCHW"
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        if kernels:
            return f"{self.device.type}, {threads}; dtype and memory format per row"
        return (
            f"{self.device.type}, {self.dtype_name}"
            f"{' (autocast)' if self.dtype != torch.float32 else ''}, {fmt}, {threads}"
        )
