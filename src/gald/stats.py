"""Gate statistics of every Local Distribution in a model: is the LD doing anything?

The LD multiplies its input by the gate ``offset + M`` with ``M = sigmoid(Up(branch(x)))``
(Li et al., "Global Aggregation then Local Distribution in Fully Convolutional Networks",
BMVC 2019). A gate that is (nearly) the same at every position and in every sample is a
constant per-channel scale, which the conv and norm that follow absorb: the LD then costs time
and changes nothing. :func:`ld_statistics` measures how far a trained model's gates are from
that case, on the user's own data.

Only running sums are kept (float64, merged with Chan's parallel form of Welford's update), so
the memory used does not grow with the number of batches.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ._modes import dry_run
from ._validate import check_positive_int
from .ld import LocalDistribution

__all__ = ["GateStats", "LDStatistics", "ld_statistics"]

#: relative distance from the channel mean above which a position counts as "off the mean"
FAR_THRESHOLD = 0.05


@dataclass(frozen=True)
class GateStats:
    """Statistics of one LD's gate ``offset + M`` over every element seen.

    Attributes:
        mean: the gate's mean over all samples, channels and positions.
        std: its population standard deviation over the same.
        min: its smallest value.
        max: its largest value.
        spatial_cv: mean over (sample, channel) of the coefficient of variation (std / mean)
            of the gate over positions. ``0`` means the gate is flat over space.
        channel_cv: coefficient of variation across channels of the per-channel mean gate.
        sample_cv: mean over channels of the coefficient of variation across samples of the
            per-sample spatial mean gate. ``0`` means every sample gets the same gate; ``nan``
            (printed ``-``) with fewer than two samples, where it says nothing.
        far_fraction: fraction of positions whose gate differs from the mean of its
            (sample, channel) map by more than 5 % of that mean.
        low: the lower end of the range the gate can take under this LD's settings
            (:attr:`gald.LocalDistribution.gate_range`: ``[offset + 0.5, offset + 1)`` when the
            last stage ends in a non-negative activation such as the default ReLU,
            ``(offset, offset + 1)`` with ``final_act=False`` or another activation). In
            floating point the sigmoid of a large logit rounds to 1, so ``max`` may equal
            ``high``.
        high: the upper end of that range (excluded in exact arithmetic; see ``low``).
        offset: the LD's offset.
        final_act: whether the LD's last stage ends in its activation.
        samples: number of samples seen.
        channels: number of channels.
        calls: number of forward calls of the LD seen (empty batches included), so that
            ``samples == 0`` tells an LD never called (``calls == 0``) from one that only saw
            empty batches.
        channel_mean: the mean gate of every channel (length ``channels``), the constant
            per-channel scale an LD with a flat gate amounts to.
        low_included: whether ``low`` itself can occur (``[low, high)`` or ``(low, high)``).
        nonfinite: number of gate values that were NaN or infinite (an overflowing float16
            model, a diverged one). When it is not ``0`` the moments (mean, std, CVs, far
            fraction) are NaN, printed ``nan``; ``min`` and ``max`` are taken over the finite
            values.
        blended: whether the LD was called with a ``blend`` (the gate of
            :class:`gald.GALD`'s ``init="identity"``): the statistics then describe the gate the
            block applies, ``1 + blend * (offset + M - 1)`` (``1`` where the blend is ``0``),
            while ``low`` and ``high`` stay the range of the LD's own gate.
    """

    mean: float
    std: float
    min: float
    max: float
    spatial_cv: float
    channel_cv: float
    sample_cv: float
    far_fraction: float
    low: float
    high: float
    offset: float
    final_act: bool
    samples: int
    channels: int
    channel_mean: tuple[float, ...] = ()
    low_included: bool = True
    calls: int = 0
    blended: bool = False
    nonfinite: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Every field as a plain ``dict`` (for JSON)."""
        return asdict(self)


_COLUMNS = (
    ("mean", "mean", "{:.4f}"),
    ("std", "std", "{:.4f}"),
    ("min", "min", "{:.4f}"),
    ("max", "max", "{:.4f}"),
    ("spatial CV", "spatial_cv", "{:.2%}"),
    ("channel CV", "channel_cv", "{:.2%}"),
    ("sample CV", "sample_cv", "{:.2%}"),
    (">5% off", "far_fraction", "{:.2%}"),
)


def gate_range_text(low: float, high: float, low_included: bool) -> str:
    """The gate's range as an interval: ``[2.5, 3)`` or ``(2, 3)``."""
    return f"{'[' if low_included else '('}{low:g}, {high:g})"


def _cell(s: GateStats, attr: str, fmt: str) -> str:
    value = getattr(s, attr)
    if math.isnan(value):
        # "-": no spread across samples with one sample; "nan": non-finite gate values
        return "-" if attr == "sample_cv" and s.samples < 2 and not s.nonfinite else "nan"
    return fmt.format(value)


class LDStatistics(dict[str, GateStats]):
    """A ``dict`` from module name to :class:`GateStats`; ``str()`` gives a table."""

    def __str__(self) -> str:
        header = ["LD", "range", *(c[0] for c in _COLUMNS), "samples"]
        rows = [header]
        for name, s in self.items():
            rng = gate_range_text(s.low, s.high, s.low_included)
            if s.samples == 0:
                why = "0 (not called)" if s.calls == 0 else f"0 ({s.calls} empty batches)"
                rows.append([name or "<model>", rng, *("-" for _ in _COLUMNS), why])
                continue
            values = [_cell(s, attr, fmt) for _, attr, fmt in _COLUMNS]
            if s.blended:
                rng += " blended"
            seen = str(s.samples)
            if s.nonfinite:
                seen += f" ({s.nonfinite} non-finite gate values)"
            rows.append([name or "<model>", rng, *values, seen])
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
            )
            for r in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


class _Moments:
    """Vector running count, mean and sum of squared deviations (Chan et al.'s merge)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, values: torch.Tensor, dim: Sequence[int]) -> None:
        """Merge ``values`` (float64), reduced over ``dim``; the kept dims must match earlier
        calls."""
        n_b = math.prod(values.shape[d] for d in dim)
        if n_b == 0:
            return
        dims = tuple(dim)
        mean_keep = values.mean(dim=dims, keepdim=True)
        mean_b = mean_keep.squeeze(dims)
        m2_b = (values - mean_keep).square().sum(dim=dims)
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        if mean_b.shape != self.mean.shape:
            raise ValueError(
                f"the gate's channel count changed between batches: {self.mean.numel()} before, "
                f"{mean_b.numel()} now"
            )
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.square() * (self.n * n_b / n)
        self.n = n


def _cv(std: float, mean: float) -> float:
    if std == 0.0:
        return 0.0
    return std / abs(mean) if mean != 0.0 else math.inf


class _GateAccumulator:
    """Running sums for one LD. Its size depends on the channel count only."""

    def __init__(self, ld: LocalDistribution) -> None:
        self.offset = float(ld.offset)
        self.final_act = bool(ld.final_act)
        self.low, self.high, self.low_included = ld.gate_range
        self.per_channel = _Moments()  # gate values per channel, over samples and positions
        self.sample_means = _Moments()  # per-(sample, channel) spatial means, over samples
        self.min = math.inf
        self.max = -math.inf
        self.spatial_cv_sum = 0.0
        self.pairs = 0
        self.far = 0
        self.positions = 0
        self.calls = 0
        self.blended = False
        self.nonfinite = 0

    def state_numel(self) -> int:
        """Number of stored scalars (for checking that nothing grows with the batch count)."""
        tensors = (
            self.per_channel.mean,
            self.per_channel.m2,
            self.sample_means.mean,
            self.sample_means.m2,
        )
        return sum(t.numel() for t in tensors if t is not None)

    def update(self, gate: torch.Tensor) -> None:
        """Add one (B, C, H, W) gate (float64)."""
        self.calls += 1
        if gate.numel() == 0:
            return
        self.per_channel.update(gate, dim=(0, 2, 3))
        finite = torch.isfinite(gate)
        count = int(finite.sum())
        self.nonfinite += gate.numel() - count
        # min and max over the finite values (the moments carry the NaN on)
        values = gate if count == gate.numel() else gate[finite]
        if count:
            self.min = min(self.min, float(values.min()))
            self.max = max(self.max, float(values.max()))
        std_hw, mean_hw = torch.std_mean(gate, dim=(2, 3), correction=0)
        cv = torch.where(std_hw == 0, torch.zeros_like(std_hw), std_hw / mean_hw.abs())
        self.spatial_cv_sum += float(cv.sum())
        self.pairs += cv.numel()
        self.sample_means.update(mean_hw, dim=(0,))
        dev = (gate - mean_hw[..., None, None]).abs()
        self.far += int((dev > FAR_THRESHOLD * mean_hw.abs()[..., None, None]).sum())
        self.positions += gate.numel()

    def result(self) -> GateStats:
        low, high = self.low, self.high
        pc, sm = self.per_channel, self.sample_means
        if pc.mean is None or pc.m2 is None or sm.mean is None or sm.m2 is None:
            nan = math.nan
            return GateStats(
                nan,
                nan,
                nan,
                nan,
                nan,
                nan,
                nan,
                nan,
                low,
                high,
                self.offset,
                self.final_act,
                0,
                0,
                low_included=self.low_included,
                calls=self.calls,
                blended=self.blended,
            )
        channels = pc.mean.numel()
        # overall moments from the per-channel ones (every channel has the same count)
        mean_c = pc.mean
        mean = float(mean_c.mean())
        between = float((mean_c - mean_c.mean()).square().sum()) * pc.n
        total = pc.n * channels
        std = math.sqrt(max(float(pc.m2.sum()) + between, 0.0) / total)
        channel_std = float(mean_c.std(correction=0)) if channels > 1 else 0.0
        sample_std = (sm.m2 / sm.n).clamp_min(0).sqrt()
        sample_cv = torch.where(
            sample_std == 0, torch.zeros_like(sample_std), sample_std / sm.mean.abs()
        )
        if sm.n < 2:  # one sample: no spread across samples to speak of
            sample_cv = torch.full_like(sample_cv, math.nan)
        return GateStats(
            mean=mean,
            std=std,
            min=self.min if math.isfinite(self.min) else math.nan,
            max=self.max if math.isfinite(self.max) else math.nan,
            spatial_cv=self.spatial_cv_sum / self.pairs,
            channel_cv=_cv(channel_std, mean),
            sample_cv=float(sample_cv.mean()),
            far_fraction=math.nan if self.nonfinite else self.far / self.positions,
            low=low,
            high=high,
            offset=self.offset,
            final_act=self.final_act,
            samples=sm.n,
            channels=channels,
            channel_mean=tuple(mean_c.tolist()),
            low_included=self.low_included,
            calls=self.calls,
            blended=self.blended,
            nonfinite=self.nonfinite,
        )


def _input_of(batch: object, index: int) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        if "image" not in batch:
            raise ValueError(
                f"batch {index} is a mapping without an 'image' key (keys: {sorted(map(str, batch))})"
            )
        x = batch["image"]
    elif isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError(f"batch {index} is an empty {type(batch).__name__}")
        x = batch[0]
    else:
        raise TypeError(
            f"batches must yield tensors, tuples/lists (input first) or dicts with an 'image' "
            f"key, got {type(batch).__name__} at batch {index}"
        )
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"the input of batch {index} must be a torch.Tensor, got {type(x).__name__}"
        )
    return x


def _plain_name(name: str) -> str:
    """The module name without the ``_orig_mod`` level a ``torch.compile`` wrapper adds."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def ld_statistics(
    model: nn.Module, batches: Iterable[Any], *, max_batches: int | None = None
) -> LDStatistics:
    """Statistics of the gate ``offset + M`` of every :class:`~gald.LocalDistribution` in
    ``model``, over the inputs in ``batches``.

    The model runs in eval mode without gradients (the training flags of all modules are
    restored afterwards), and eagerly when it was compiled (``torch.compile``): a compiled
    graph would not call the hooks; the names then leave out the wrapper's ``_orig_mod``. A
    forward hook on each LD receives its input ``x`` and computes the gate as ``ld.offset + ld.mask(x)`` in float64; only running sums are kept, so memory does
    not depend on the number of batches. Floating inputs are moved to the device and dtype of
    the model's first floating parameter (a bfloat16 model reads float32 batches).

    Args:
        model: any module containing at least one ``LocalDistribution`` (the model itself may
            be one).
        batches: an iterable of input tensors, of tuples/lists whose first element is the
            input (e.g. ``(image, target)`` from a ``DataLoader``), or of dicts with an
            ``"image"`` key.
        max_batches: stop after this many batches (``None``: use them all).

    Returns:
        :class:`LDStatistics`, a ``dict`` keyed by module name (as in ``named_modules``) of
        :class:`GateStats`; ``print`` it for a table. An LD the model never called reports
        ``samples == 0`` and NaN statistics. An LD that runs more than once per forward (one
        module on two paths, or at several scales) adds every call: its ``samples`` is the
        number of calls times their batch sizes, and its statistics mix the calls.

    Raises:
        TypeError: ``batches`` is a single tensor or mapping rather than an iterable of batches.
        ValueError: the model has no LD, ``batches`` is empty, or ``max_batches < 1``.

    Example:
        >>> import torch, gald
        >>> head = gald.GALDHead(32, 4, channels=16)  # in practice: a trained model
        >>> val_loader = [(torch.randn(2, 32, 17, 17), None) for _ in range(3)]
        >>> stats = gald.ld_statistics(head, val_loader, max_batches=2)
        >>> list(stats), stats["gald.ld"].samples
        (['gald.ld'], 4)
        >>> flat = all(s.spatial_cv < 0.01 and s.sample_cv < 0.01 for s in stats.values())
        >>> print(stats)  # doctest: +ELLIPSIS
        LD       range...mean...std...
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(batches, (torch.Tensor, Mapping)):  # iterating it would yield its rows / keys
        what = (
            f"a single tensor of shape {tuple(batches.shape)}"
            if isinstance(batches, torch.Tensor)
            else "a single mapping"
        )
        raise TypeError(
            f"batches must be an iterable of batches (a list or a DataLoader), got {what}; "
            "for one batch pass [batch]"
        )
    if not isinstance(batches, Iterable) or isinstance(batches, (str, bytes)):
        raise TypeError(
            "batches must be an iterable of batches (a list or a DataLoader), got "
            f"{type(batches).__name__} {batches!r:.60}"
        )
    if max_batches is not None:
        max_batches = check_positive_int(max_batches, "max_batches")
    lds = [
        (_plain_name(name), m)
        for name, m in model.named_modules()
        if isinstance(m, LocalDistribution)
    ]
    if not lds:
        raise ValueError(
            f"model ({type(model).__name__}) contains no gald.LocalDistribution; "
            "ld_statistics needs at least one"
        )
    accumulators = {name: _GateAccumulator(m) for name, m in lds}

    def make_hook(acc: _GateAccumulator) -> Any:
        def hook(
            module: LocalDistribution, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> None:
            if args:
                x = args[0]
            elif "x" in kwargs:
                x = kwargs["x"]
            else:
                raise TypeError(
                    f"ld_statistics: the LD {type(module).__name__} was called without its "
                    f"input x (positional or x=...), got keywords {sorted(kwargs)}"
                )
            gate = module.mask(x).to(torch.float64) + module.offset
            blend = args[1] if len(args) > 1 else kwargs.get("blend")
            if blend is not None:  # the gate the block applies: 1 + blend * (gate - 1)
                gate = 1 + blend.to(torch.float64) * (gate - 1)
                acc.blended = True
            acc.update(gate)

        return hook

    # inputs join the model's device and floating dtype (a bf16 model, float32 batches)
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    handles = [
        m.register_forward_hook(make_hook(accumulators[name]), with_kwargs=True) for name, m in lds
    ]
    seen = 0
    try:
        with dry_run(model):
            for batch in itertools.islice(batches, max_batches):
                x = _input_of(batch, seen)
                if ref is not None:
                    x = x.to(device=ref.device, dtype=ref.dtype if x.is_floating_point() else None)
                model(x)
                seen += 1
                del batch, x
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise ValueError("batches yielded no batch; ld_statistics needs at least one input")
    return LDStatistics((name, acc.result()) for name, acc in accumulators.items())
