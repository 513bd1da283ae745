"""Whether the benchmarked models run at the requested input, checked before anything is timed.

Every model is dry-run in train mode (where BatchNorm needs more than one value per channel) on
the ``meta`` device: shapes only, no memory and no compute, so the requested shape itself is
checked at any size. When a model fails there, the same dry runs find the smallest square input
that works (a bisection: the models' constraints, strided convs and BatchNorm, only loosen as
the side grows), so the message can name it. A failure that no size explains (an op without a
meta implementation, say) is left to the real run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .._validate import first_line

Factories = Mapping[str, Callable[[], nn.Module]]
"""What a part of the run measures: a label per model (``"the authors' LD branch"``) and how
to build it."""


def _build(factories: Factories) -> tuple[dict[str, nn.Module] | None, str | None]:
    """The models on the meta device, or ``None`` and why one of them cannot be built at all.

    A model that the meta device cannot build (a constructor that reads tensor values, say) is
    built for real, on the CPU, to tell such a limit from a configuration that no device can
    build (a GA that refuses the channel count, or one too large to allocate)."""
    try:
        with torch.device("meta"):
            return {label: make().train() for label, make in factories.items()}, None
    except Exception:
        pass
    for label, make in factories.items():
        try:
            make()
        except Exception as exc:  # reported to the user, with its type
            return None, f"{label} cannot be built: {type(exc).__name__}: {first_line(exc)}"
    return None, None  # builds on the CPU only: the real run reports any later failure


def input_problem(
    shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device
) -> str | None:
    """Why an input of ``shape`` cannot be allocated on ``device`` (``None`` when it can): a
    size beyond what a tensor can index, or an allocation the device refuses."""
    numel = 1
    for n in shape:
        numel *= n
    size = numel * dtype.itemsize
    gib = f"{size / 2**30:,.0f} GiB" if size >= 10 * 2**30 else f"{size / 2**30:.3g} GiB"
    if numel >= 2**63:
        return f"it has {numel:,} elements, more than a tensor can index"
    try:
        torch.empty(shape, dtype=dtype, device=device)
    except (RuntimeError, MemoryError) as exc:
        return f"the input alone needs {gib}, which {device} refuses ({first_line(exc)})"
    return None


def _failure(models: Mapping[str, nn.Module], shape: tuple[int, ...]) -> tuple[str, str] | None:
    """The label of the first model that cannot run at ``shape`` and the first line of why."""
    x = torch.empty(shape, device="meta")
    for label, model in models.items():
        try:
            with torch.no_grad():
                model(x)
        except (ValueError, RuntimeError) as exc:
            return label, first_line(exc)
    return None


def smallest_side(
    models: Mapping[str, nn.Module],
    batch: int,
    channels: int,
    *,
    fails_at: int = 0,
    runs_at: int | None = None,
    limit: int = 1 << 12,
) -> int | None:
    """The smallest ``s`` at which every model runs on a ``(batch, channels, s, s)`` input;
    ``None`` when none up to ``limit`` does (the failure is not about the size).

    ``fails_at`` is a side already known to fail and ``runs_at`` one expected to run (checked
    once): each narrows the search, so a failing shape costs a handful of dry runs."""

    def runs(side: int) -> bool:
        return _failure(models, (batch, channels, side, side)) is None

    low = fails_at  # fails (0: nothing known)
    if runs_at is not None and runs_at > low and runs(runs_at):
        high = runs_at
    else:
        high = max(1, 2 * low)
        while not runs(high):
            if high >= limit:
                return None
            low, high = high, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        if runs(mid):
            high = mid
        else:
            low = mid
    return high


def too_small(parts: Mapping[str, Factories], shape: tuple[int, int, int, int]) -> str | None:
    """``None`` when every model of every part (keyed by the option that asks for it, e.g.
    ``"--ga cgnl"``) runs at ``shape``; else a message naming each part that does not, the sides
    it needs and the smallest input that runs them all.

    The search leans on the models' constraints loosening as the input grows (in its side and
    in its batch): a part that fails at ``H x W`` fails at the square of side ``min(H, W)``, and
    a side that runs at batch ``B`` runs at batch 2 too."""
    b, c, h, w = shape
    built = {option: _build(factories) for option, factories in parts.items()}
    unbuildable = [f"  {option}: {why}" for option, (_, why) in built.items() if why is not None]
    if unbuildable:
        return "\n".join(
            [
                f"--shape {b},{c},{h},{w}: what it is asked to run cannot be built for "
                f"C = {c} input channels:",
                *unbuildable,
            ]
        )
    models = {option: m for option, (m, _) in built.items() if m is not None}
    lines, sides, sides2 = [], [], []
    passing = []
    for option, ms in models.items():
        failed = _failure(ms, shape)
        if failed is None:
            passing.append(ms)
            continue
        label, why = failed
        if _failure(ms, (b, c, min(h, w), min(h, w))) is None:
            continue  # runs at a smaller square: not a matter of size (the real run reports it)
        side = smallest_side(ms, b, c, fails_at=min(h, w))
        if side is None:
            continue  # not a matter of size: the real run reports it
        sides.append(side)
        line = f"  {option}: {label} needs H, W >= {side} at batch size {b}"
        if b == 1:
            side2 = smallest_side(ms, 2, c, runs_at=side)
            sides2.append(side2 or side)
            if side2 is not None and side2 < side:
                line += f" (>= {side2} at batch size 2)"
        lines.append(f"{line}; at {h}x{w} it fails with: {why}")
    if not lines:
        return None
    need = _raise_to_fit(passing, b, c, max(sides))
    smallest = f"--shape {b},{c},{need},{need}"
    if b == 1:
        need2 = _raise_to_fit(passing, 2, c, max(sides2))
        if need2 < need:
            smallest += f" (or, with a batch of 2, --shape 2,{c},{need2},{need2})"
    return "\n".join(
        [
            f"--shape {b},{c},{h},{w} is too small for what it is asked to run:",
            *lines,
            f"the smallest square input that runs all of it: {smallest}",
        ]
    )


def _raise_to_fit(
    parts: Sequence[Mapping[str, nn.Module]], batch: int, channels: int, side: int
) -> int:
    """``side``, or the larger side some of ``parts`` (which ran at the requested shape) need."""
    for ms in parts:
        if _failure(ms, (batch, channels, side, side)) is not None:
            side = smallest_side(ms, batch, channels, fails_at=side) or side
    return side
