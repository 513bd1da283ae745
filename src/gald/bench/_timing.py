"""Measurement helpers shared by the benchmark tables.

Timing runs on :class:`torch.utils.benchmark.Timer` (``blocked_autorange``: it picks how many
calls one measured block holds and synchronises CUDA around every block). Every comparison
*interleaves* its candidates: the measurement is split into rounds, and each round measures
every candidate once, so a change in machine load or clock hits all candidates alike. The
statistics of a candidate pool the per-call times of all its blocks: the median, the
interquartile range and the number of blocks.

A ratio of two candidates is, with three or more rounds, the median over the rounds of the
per-round ratio of their medians (a paired comparison in which every round weighs the same). Its
uncertainty is estimated two ways; the interval printed (about 95 %) is the wider of the two:

- from the blocks: the standard error of a median is estimated from the IQR
  (``sigma ~ IQR / 1.349``, ``se(median) ~ 1.2533 * sigma / sqrt(n)``), the relative errors of
  numerator and denominator add in quadrature, times 1.96;
- from the rounds: the spread of the log of the per-round ratio, taken robustly
  (``1.4826 * MAD``), times the 95 % quantile of the median's error in those units for that
  many normal samples (:func:`median_q95`, simulated: 2.85 at 5 rounds, where the large-sample
  ``1.96 * 1.2533 / sqrt(5)`` would give 1.10 and cover far less than 95 %). This one sees a
  machine whose state drifts during the run, which blocks measured back to back do not; being
  robust, a single round hit by a one-off stall (a page-fault storm, another process) does not
  swamp it, and it does not move the figure.

Both half-widths ``h`` are on the log scale; the interval is ``[r * exp(-h), r * exp(h)]``
(stored as the relative half-width ``exp(h) - 1``, so ``[r / (1 + h'), r * (1 + h')]``): the
interval of ``b / a`` is exactly the reciprocal of that of ``a / b``, so a comparison and its
inverse always get the same verdict (:attr:`Ratio.verdict`).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.benchmark import Timer

Z95 = 1.96

# 95 % quantile of |median(x) - mu| / (1.4826 * MAD(x)) for n independent normal samples
# (``statistics.median`` conventions: the mean of the middle two for even n), from 400 000
# simulated samples per n: the half-width of an exact 95 % interval for the centre, in units of
# the robust spread. The normal-theory constant 1.96 * 1.2533 / sqrt(n) is far too small at a
# few rounds (the MAD of 5 values is often small by chance): 1.10 at n = 5 against 2.85.
_MEDIAN_Q95 = {
    3: 12.45, 4: 3.234, 5: 2.845, 6: 1.781, 7: 1.689, 8: 1.313, 9: 1.251, 10: 1.060,
    11: 1.032, 12: 0.914, 13: 0.894, 14: 0.811, 15: 0.798, 16: 0.735, 17: 0.727, 18: 0.679,
    19: 0.672, 20: 0.631, 21: 0.627, 22: 0.595, 23: 0.593, 24: 0.561, 25: 0.558, 26: 0.535,
    27: 0.532, 28: 0.511, 29: 0.509, 30: 0.489,
}  # fmt: skip


def median_q95(n: int) -> float:
    """Half-width of a 95 % interval for the centre of ``n >= 3`` normal samples, as a multiple
    of ``1.4826 * MAD``: the simulated table up to 30, then the large-sample value
    ``1.96 * 1.2533 / sqrt(n)`` with a small-sample factor ``1 + 2.6 / n``, and ``1 + 0.6 / n``
    more for odd ``n`` (whose median is one sample), fitted to the simulation at n = 31-101
    (within 1 %)."""
    if n < 3:
        raise ValueError(f"n must be at least 3, got {n}")
    if n in _MEDIAN_Q95:
        return _MEDIAN_Q95[n]
    odd = 1.0 + 0.6 / n if n % 2 else 1.0
    return Z95 * 1.2533 / math.sqrt(n) * (1.0 + 2.6 / n) * odd


# --------------------------------------------------------------------------------------------
# Statistics


@dataclass
class Stats:
    """Per-call times of one candidate, in seconds (one sample per measured block)."""

    times: list[float] = field(default_factory=list)
    calls: int = 0  # calls measured in all (a block may hold several)
    round_medians: list[float] = field(default_factory=list)  # one per interleaved round

    @property
    def n(self) -> int:
        return len(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def iqr(self) -> float:
        if len(self.times) < 2:
            return math.nan
        q1, q3 = self.quartiles
        return q3 - q1

    @property
    def rel_se(self) -> float:
        """Relative standard error of the median (from the IQR); ``nan`` below 3 samples."""
        if len(self.times) < 3:
            return math.nan
        sigma = self.iqr / 1.349
        return 1.2533 * sigma / math.sqrt(len(self.times)) / self.median

    @property
    def quartiles(self) -> tuple[float, float]:
        if len(self.times) < 2:
            return self.median, self.median
        q = statistics.quantiles(self.times, n=4, method="inclusive")
        return q[0], q[2]

    def as_dict(self) -> dict[str, Any]:
        q1, q3 = self.quartiles
        return {
            "median_ms": 1e3 * self.median,
            "q1_ms": 1e3 * q1,
            "q3_ms": 1e3 * q3,
            "iqr_ms": 1e3 * self.iqr if self.n >= 2 else None,
            "runs": self.n,
            "calls": self.calls,
            "round_medians_ms": [1e3 * m for m in self.round_medians],
        }


# a 95 % interval whose ends differ by this factor or more gives no usable figure
NOISY_FACTOR = 2.0


@dataclass
class Ratio:
    """``a / b`` of two medians with an approximate 95 % interval (relative half-width ``h``:
    the interval is ``[value / (1 + h), value * (1 + h)]``)."""

    value: float
    rel_halfwidth: float  # of the ratio, relative; nan when unknown

    @classmethod
    def of(cls, a: Stats, b: Stats) -> Ratio:
        """``a / b`` with its interval. With three or more interleaved rounds (as the benchmarks
        measure) the figure is the median over the rounds of the per-round ratio: every round
        weighs the same, and the comparison is paired. Otherwise it is the ratio of the pooled
        medians."""
        value = a.median / b.median
        log_h = Z95 * math.hypot(a.rel_se, b.rel_se)  # relative errors: errors of the logs
        rounds = len(a.round_medians)
        if rounds >= 3 and rounds == len(b.round_medians):
            logs = [math.log(x / y) for x, y in zip(a.round_medians, b.round_medians)]
            centre = statistics.median(logs)
            value = math.exp(centre)
            mad = statistics.median(abs(v - centre) for v in logs)
            log_rounds = median_q95(rounds) * 1.4826 * mad
            log_h = max(log_h, log_rounds) if not math.isnan(log_h) else log_rounds
        # the interval [value * exp(-h), value * exp(h)], stored as a relative half-width
        return cls(value, math.expm1(log_h))

    @property
    def low(self) -> float:
        return self.value / (1.0 + self.rel_halfwidth)

    @property
    def high(self) -> float:
        return self.value * (1.0 + self.rel_halfwidth)

    @property
    def within_noise(self) -> bool:
        """The interval contains 1 (no difference), or the spread is unknown."""
        return not (self.low > 1.0 or self.high < 1.0)

    @property
    def verdict(self) -> str:
        """What a table may say, by one rule for every table: ``"spread unknown"``, ``"too
        noisy"`` (the interval's ends differ by a factor of :data:`NOISY_FACTOR` or more: no
        usable figure, whether or not it contains 1), ``"within noise"`` (a narrower interval
        that contains 1) or ``"measured"``. The same for ``a / b`` and ``b / a``: their
        intervals are reciprocal."""
        if math.isnan(self.rel_halfwidth):
            return "spread unknown"
        if (1.0 + self.rel_halfwidth) ** 2 >= NOISY_FACTOR:
            return "too noisy"
        if self.within_noise:
            return "within noise"
        return "measured"

    def as_dict(self) -> dict[str, Any]:
        known = not math.isnan(self.rel_halfwidth)
        return {
            "ratio": self.value,
            "ratio_low": self.low if known else None,
            "ratio_high": self.high if known else None,
            "overhead_pct": 100.0 * (self.value - 1.0),
            "overhead_pct_low": 100.0 * (self.low - 1.0) if known else None,
            "overhead_pct_high": 100.0 * (self.high - 1.0) if known else None,
            "within_noise": self.within_noise,
            "verdict": self.verdict,
        }


def signed(value: float, digits: int) -> str:
    """``value`` with an explicit sign and ``digits`` decimals; a value that rounds to zero is
    ``+0`` (``+0.0``), never ``-0``: ``signed(-0.4, 0) == "+0"``, ``signed(-1.2, 0) == "-1"``."""
    text = f"{value:+.{digits}f}"
    return "+" + text[1:] if text.startswith("-") and float(text) == 0 else text


def format_overhead(r: Ratio, *, emphasis: bool = False) -> str:
    """``+12.3 % [+8.9, +15.8]`` (the figure and the ends of its ~95 % interval, which is not
    symmetric: ``[value / (1 + h), value * (1 + h)]``); ``within noise [...]`` or ``too
    noisy...`` by :attr:`Ratio.verdict`. A figure or an end that rounds to zero reads ``+0``.

    ``emphasis`` sets a measured figure in Markdown bold (``**+12.3 %** [+8.9, +15.8]``)."""
    pct = 100.0 * (r.value - 1.0)
    verdict = r.verdict
    if verdict == "spread unknown":
        return f"{signed(pct, 1)} % (spread unknown)"
    lo, hi = 100.0 * (r.low - 1.0), 100.0 * (r.high - 1.0)
    if verdict == "within noise":
        digits = 0 if hi - lo >= 10 else 1
        return f"within noise [{signed(lo, digits)}, {signed(hi, digits)} %]"
    if verdict == "too noisy":
        # the order of magnitude, not a figure
        if pct >= 1000:
            return "too noisy (> +1000 %)"
        high = signed(hi, 0) if hi < 1000 else "> +1000"
        return f"too noisy: {signed(pct, 0)} % [{signed(lo, 0)}, {high}]"
    figure = f"**{signed(pct, 1)} %**" if emphasis else f"{signed(pct, 1)} %"
    return f"{figure} [{signed(lo, 1)}, {signed(hi, 1)}]"


def paired_note(what: str, ratio: str, beside: str = "above") -> str:
    """The footnote of a table whose ratio column is :meth:`Ratio.of` of interleaved rounds:
    what the figure is, and why it need not equal the ratio of the medians printed beside it."""
    return (
        f"{what}: median over the rounds of the per-round ratio ({ratio}), with a ~95 % "
        f"interval; it can differ from the ratio of the medians {beside} when the machine's "
        "speed drifts during the run"
    )


#: the LD overhead of the GA table (terminal, docs and ``--json``)
OVERHEAD_NOTE = paired_note("LD overhead", "time with LD / without LD")
#: the speedups of the LD against the authors' formulation
SPEEDUP_NOTE = paired_note("vs authors", "the authors' time / this time")
#: the kernels' ratios to the copy and to the plain ops
KERNEL_NOTE = (
    "of copy, triton vs plain: medians over the rounds of the per-round ratios (copy time / "
    "triton time, plain-ops time / triton time; the latter with a ~95 % interval); they can "
    "differ from the ratios of the medians and bandwidths beside them when the machine's speed "
    "drifts during the run"
)


def _times(v: float) -> str:
    """A factor for a range: ``1.03x``, ``42x``, ``310x`` (no exponent, no ``1x``), and
    ``> 10000x`` beyond (a range that wide says only that it is no figure)."""
    if v >= 1e4:
        return "> 10000x"
    return f"{v:.2f}x" if v < 10 else f"{v:.0f}x"


def format_speed(r: Ratio, *, emphasis: bool = False) -> str:
    """``r`` = baseline time / candidate time: ``2.10x faster (95 %: 1.98–2.23)``, ``1.30x
    slower (95 %: ...)`` (the interval in the unit of the figure), or by :attr:`Ratio.verdict`
    ``same within noise`` / ``too noisy (2.1x–5.3x slower)``.

    ``emphasis`` sets a figure faster than the baseline in Markdown bold."""
    verdict = r.verdict
    if verdict == "within noise":
        return "same within noise"
    faster = r.value >= 1.0
    word = "faster" if faster else "slower"
    if verdict == "too noisy":
        if r.within_noise:  # the interval runs from slower to faster
            return f"too noisy ({_times(1.0 / r.low)} slower to {_times(r.high)} faster)"
        low, high = (r.low, r.high) if faster else (1.0 / r.high, 1.0 / r.low)
        return f"too noisy ({_times(low)}–{_times(high)} {word})"
    value = r.value if faster else 1.0 / r.value
    figure = f"{_times(value)} {word}"
    if emphasis and faster:
        figure = f"**{figure}**"
    if verdict == "spread unknown":
        return figure
    low, high = (r.low, r.high) if faster else (1.0 / r.high, 1.0 / r.low)
    digits = 2 if value < 10 else 0
    return f"{figure} (95 %: {low:.{digits}f}–{high:.{digits}f})"


def format_duration(seconds: float) -> str:
    """An expected duration for a person: ``"about 40 s"``, ``"about 2.5 min"``,
    ``"about 2.0 h"``, ``"under 1 s"``."""
    if seconds < 0.5:
        return "under 1 s"
    if seconds < 120:
        return f"about {seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"about {seconds / 60:.1f} min"
    return f"about {seconds / 3600:.1f} h"


def format_time(d: Mapping[str, Any]) -> str:
    """``12.3 ms [IQR 0.4, n=9]`` from a :meth:`Stats.as_dict` record."""
    med, iqr, n = d["median_ms"], d["iqr_ms"], d["runs"]
    digits = 3 if med < 1 else (2 if med < 10 else 1)
    if iqr is None:
        return f"{med:.{digits}f} ms [n={n}]"
    return f"{med:.{digits}f} ms [IQR {iqr:.{digits}f}, n={n}]"


def ratio_from(d: Mapping[str, Any]) -> Ratio:
    """The :class:`Ratio` of a :meth:`Ratio.as_dict` record."""
    low = d["ratio_low"]
    return Ratio(d["ratio"], math.nan if low is None else d["ratio"] / low - 1.0)


def format_mib(b: int | None) -> str:
    """Bytes as MiB: one decimal from 10 MiB, three significant digits below (``0.38``), ``<
    0.01`` for less than 10 KiB and ``0`` for nothing; ``n/a`` when unknown. A small figure never
    reads as ``0.0`` beside an overhead computed from it."""
    if b is None:
        return "n/a"
    mib = b / 2**20
    if mib >= 10:
        return f"{mib:.1f}"
    if mib >= 0.01:
        return f"{mib:.3g}"
    return "< 0.01" if b > 0 else "0"


def _si(value: float, unit: str, largest: str) -> str:
    """``value`` with the largest SI prefix up to ``largest`` that keeps it at 1 or more, four
    significant digits and ``unit``: ``_si(5.461e7, "", "G") == "54.61 M"`` (no exponent
    notation; no prefix below 1000)."""
    prefixes = [("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)]
    for prefix, scale in prefixes[[p for p, _ in prefixes].index(largest) :]:
        if abs(value) >= scale:
            return f"{value / scale:.4g} {prefix}{unit}"
    return f"{value:.4g}" + (f" {unit}" if unit else "")


def format_rate(gbps: float) -> str:
    """A bandwidth given in GB/s, with an SI prefix and four significant digits: ``4.8 TB/s``,
    ``312.5 GB/s``, ``43.81 kB/s`` (no exponent notation)."""
    return _si(gbps * 1e9, "B/s", "T")


def format_fraction(x: float) -> str:
    """A fraction as a percentage: ``87 %``, ``4.2 %``, ``< 0.1 %`` (never ``0 %`` for
    something)."""
    pct = 100.0 * x
    if pct >= 10:
        return f"{pct:.0f} %"
    if pct >= 0.1:
        return f"{pct:.1f} %"
    return "< 0.1 %" if pct > 0 else "0 %"


def format_flops(gflops: float) -> str:
    """A FLOP count given in GFLOPs, with an SI prefix and four significant digits:
    ``41.72 G``, ``54.61 M``, ``98.88 k`` (no exponent notation at small shapes)."""
    return _si(gflops * 1e9, "", "G")


def format_pct(r: float | None) -> str:
    """A ratio as a signed percentage change: 1.25 -> ``+25.0 %``, 0.9999 -> ``+0.0 %`` (never
    ``-0.0``); ``n/a`` when unknown."""
    return "n/a" if r is None else f"{signed(100 * (r - 1), 1)} %"


# --------------------------------------------------------------------------------------------
# Timing


def measure_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    min_time: float,
    rounds: int,
    threads: int,
    on_block: Callable[[str, int], None] | None = None,
    call_s: Mapping[str, float] | None = None,
    between_rounds: Callable[[], None] | None = None,
) -> dict[str, Stats]:
    """Time every function in ``fns``, interleaved: ``rounds`` rounds, each measuring every
    function with ``Timer.blocked_autorange(min_run_time=min_time / rounds)``, in the order of
    ``fns`` in even rounds and in the reverse order in odd ones (a steady drift of the machine's
    speed then cancels out between pairs of rounds instead of favouring the first candidate).

    ``blocked_autorange`` starts with one untimed call (it sizes the blocks), which doubles as a
    warm-up after switching from the other candidates. A function whose known duration
    (``call_s``, from a warm-up call) already fills a round's budget is timed by one call per
    round instead (``Timer.timeit(1)`` would add two warm-up calls): the sizing call would
    double the time of a slow candidate and measure nothing. ``on_block(name, round)`` is called
    after each measurement (progress reporting), ``between_rounds()`` before every round but the
    first: a benchmark that moves its models and tensors to fresh memory there makes each round
    meet another memory layout, so the spread between rounds, and the interval of a ratio, take
    in what otherwise differs only from one process to the next.
    """
    stats = {name: Stats() for name in fns}
    timers = {
        name: Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, label=name)
        for name, fn in fns.items()
    }
    per_round = min_time / rounds
    for r in range(rounds):
        if r and between_rounds is not None:
            between_rounds()
        # every other round in reverse order (A B, B A, A B, ...): a speed that drifts during
        # the run favours no candidate, and none is always the first after between_rounds
        order = list(timers.items())
        for name, timer in order if r % 2 == 0 else reversed(order):
            if call_s is not None and call_s.get(name, 0.0) >= per_round:
                times, calls = [_time_single(fns[name], threads)], 1
            else:
                m = timer.blocked_autorange(min_run_time=per_round)
                times, calls = m.times, m.number_per_run * len(m.raw_times)
            stats[name].times.extend(times)
            stats[name].round_medians.append(statistics.median(times))
            stats[name].calls += calls
            if on_block is not None:
                on_block(name, r)
    return stats


def _time_single(fn: Callable[[], object], threads: int) -> float:
    """One call of ``fn`` in seconds, with ``threads`` CPU threads and CUDA synchronised around
    it (what ``Timer`` does for a block)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    try:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call in seconds (device synchronised); used for warm-up and estimates."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def expected_seconds(call_s: float, *, min_time: float, rounds: int) -> float:
    """What :func:`measure_interleaved` will take for one candidate whose call takes ``call_s``.

    Per round: one untimed sizing call, then measured calls until ``min_time / rounds``; a
    call that alone fills the round is timed once, without the sizing call.
    """
    budget = min_time / rounds
    per_round = call_s if call_s >= budget else budget + call_s
    return rounds * per_round


# --------------------------------------------------------------------------------------------
# Memory


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the unique storages autograd saves for backward while running ``fn()``."""
    seen: dict[tuple[str, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. sparse or fake tensors
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak CUDA memory allocated while running ``fn()``, above what was allocated before.

    ``None`` on devices without an allocator peak counter (CPU).
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


# --------------------------------------------------------------------------------------------
# Environment and output


def environment(device: torch.device, threads: int) -> dict[str, Any]:
    """gald and torch versions, device name, threads, date: what a number depends on."""
    from .._version import __version__

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "gald": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu": cpu,
        "threads": threads,
        "logical_cpus": _cpu_count(),
    }
    env["load_average_1min"] = load_average()
    env["cpus_in_use_at_start"] = cpus_in_use() if device.type == "cpu" else None
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = cpu
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
    return env


def _cpu_count() -> int | None:
    return os.cpu_count()


def load_average() -> float | None:
    """The 1-minute load average (``None`` where the OS does not report one)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from ``/proc/stat`` (Linux), else ``None``."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
    return total - fields[3] - fields[4], total


def cpus_in_use(window: float = 0.25) -> float | None:
    """How many logical CPUs other processes keep busy right now, averaged over ``window``
    seconds (from ``/proc/stat``; ``None`` where it is not available)."""
    first = _cpu_times()
    cpus = os.cpu_count()
    if first is None or not cpus:
        return None
    time.sleep(window)
    second = _cpu_times()
    if second is None or second[1] <= first[1]:
        return None
    return round(cpus * (second[0] - first[0]) / (second[1] - first[1]), 2)


def busy_note(threads: int, in_use: float | None = None) -> str | None:
    """A note when other processes compete for the CPUs this run needs, else ``None``.

    ``in_use`` is the number of logical CPUs busy just before the run (:func:`cpus_in_use`);
    where that is unknown, the 1-minute load average stands in (it also counts a benchmark that
    has just finished, so it can be high on an idle machine).
    """
    cpus = os.cpu_count()
    if not cpus:
        return None
    if threads > cpus:
        return (
            f"note: this run uses {threads} threads on {cpus} logical CPUs: the threads take "
            "turns on the cores, and timings will be slower and noisier than with "
            f"--threads {cpus} or fewer"
        )
    if in_use is not None:
        what, value = "CPUs in use by other processes", in_use
    else:
        load = load_average()
        if load is None:
            return None
        what, value = "1-minute load average", load
    # half a core of slack for short-lived processes
    if value < cpus - threads + 0.5:
        return None
    return (
        f"note: the machine is busy ({what} {value:.1f} of {cpus} logical CPUs, "
        f"this run uses {threads} thread{'s' if threads != 1 else ''}): timings will be slower "
        "and noisier than on an idle machine"
        + ("; --threads 1 suffers least from the competition" if threads > 1 else "")
    )


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    line = " | ".join(h.ljust(w) for h, w in zip(headers, widths))
    sep = "-+-".join("-" * w for w in widths)
    body = "\n".join(" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
    return f"{line}\n{sep}\n{body}"


class Progress:
    """One status line on stderr, redrawn in place; silent unless both stdout and stderr are
    terminals (output redirected to a file or a pipe stays free of it). One line per phase of a
    run: :meth:`close` clears it and starts the next phase from zero (each phase adds its own
    expected duration to :attr:`total`)."""

    def __init__(self, total_s: float, *, enabled: bool) -> None:
        self.enabled = enabled and sys.stdout.isatty() and sys.stderr.isatty()
        self._reset(total_s)

    def _reset(self, total_s: float) -> None:
        self.total = max(total_s, 1e-9)
        self.start = time.perf_counter()
        self.done = 0.0

    def advance(self, seconds: float, what: str) -> None:
        self.done += seconds
        if not self.enabled:
            return
        frac = min(self.done / self.total, 1.0)
        elapsed = time.perf_counter() - self.start
        left = max(self.total - self.done, 0.0) * (elapsed / max(self.done, 1e-9))
        bar = "#" * int(24 * frac)
        sys.stderr.write(f"\r[{bar:<24}] {100 * frac:3.0f} % {what[:40]:<40} ~{left:4.0f} s left")
        sys.stderr.flush()

    def close(self) -> None:
        """Clear the line; the next phase starts from zero."""
        if self.enabled:
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()
        self._reset(0.0)
