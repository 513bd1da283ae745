"""Large CPU output tensors backed by transparent huge pages where Linux offers them.

A fresh CPU tensor of tens of MB is a new ``mmap`` region; its first write takes one page fault
per 4 KiB page, which on the CI machine costs about as much as a pass of arithmetic over the
tensor (about 15 ms for 37 MB). Asking the kernel for transparent huge pages on the region
(``madvise(MADV_HUGEPAGE)``) before the first write makes that one fault per 2 MiB. PyTorch can do
this for every allocation (``THP_MEM_ALLOC_ENABLE=1``, read once at start-up); here it is done
only for the large outputs of the LD kernels.

The advice only changes how the kernel backs the pages, never their contents. It is applied to
tensors of at least ``MIN_BYTES`` (above glibc's largest ``mmap`` threshold, so the region is the
tensor's own mapping and goes away with it), on Linux only, and is a no-op where transparent
huge pages are disabled. Set ``GALD_HUGEPAGES=0`` in the environment to turn it off.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable

import torch

MIN_BYTES = 32 << 20
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


def _load_madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux") or os.environ.get("GALD_HUGEPAGES", "1") == "0":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _load_madvise()


def hugepages_enabled() -> bool:
    """Whether large outputs get the huge-page advice in this process."""
    return _madvise is not None


def _advise(t: torch.Tensor) -> None:
    storage = t.untyped_storage()
    ptr, size = storage.data_ptr(), storage.nbytes()
    start = (ptr + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
    end = (ptr + size) & ~(_HUGE_PAGE - 1)
    if _madvise is not None and end > start:
        _madvise(start, end - start, _MADV_HUGEPAGE)  # advisory: failure changes nothing


def empty_like(
    t: torch.Tensor, *, memory_format: torch.memory_format = torch.preserve_format
) -> torch.Tensor:
    """``torch.empty_like(t, memory_format=...)``; large CPU results get the huge-page advice."""
    out = torch.empty_like(t, memory_format=memory_format)
    if _madvise is not None and out.device.type == "cpu" and out.nbytes >= MIN_BYTES:
        _advise(out)
    return out
