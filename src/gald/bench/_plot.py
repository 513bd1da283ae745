"""The ``--plot`` figure: time and memory per GA, with and without the LD, with error bars."""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

INSTALL_HINT = (
    "matplotlib is not installed; install it with pip install 'gald[plot]' (or pip install "
    "matplotlib; in a clone of gald: pip install -e '.[plot]')"
)


def plot_available() -> tuple[bool, str]:
    """Whether matplotlib imports, and what to do when it does not."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False, INSTALL_HINT
    return True, ""


TITLE_SIZE = 10  # points


def title(results: dict[str, Any], width_in: float) -> str:
    """The figure's title: what was measured, where, and what the bars mean, one item per line,
    each wrapped to fit ``width_in`` inches at :data:`TITLE_SIZE` (a long device name, broken if
    need be, does not run off the figure)."""
    env, cfg = results["environment"], results["config"]
    fmt = "channels_last" if cfg["channels_last"] else "NCHW"
    threads = f"{env['threads']} thread{'s' if env['threads'] != 1 else ''}"
    lines = [
        f"GALD with and without LD, input {tuple(cfg['shape'])}, {cfg['dtype']}, {fmt}",
        f"{cfg['device']} ({env['device_name']}), {threads}, {env['date']}",
        "bars: median, whiskers: interquartile range",
    ]
    # a character of the default sans-serif averages about 0.55 em; 0.65 leaves a margin, and
    # lines of at most 100 characters stay readable
    chars = max(20, min(100, int(width_in * 72 / (0.65 * TITLE_SIZE))))
    return "\n".join(textwrap.fill(line, chars) for line in lines)


def plot(results: dict[str, Any], path: str) -> None:
    """Write a PNG of the block results: inference and train-step medians (whiskers: the
    interquartile range) and the bytes autograd keeps for backward (and peak memory on CUDA) per GA."""
    figure(results).savefig(path, dpi=110, format="png")  # ".png" alone is a name, not a format


def figure(results: dict[str, Any]) -> Figure:
    """The figure :func:`plot` writes."""
    ok, why = plot_available()
    if not ok:
        raise RuntimeError(why)
    # a Figure without pyplot: no global backend or figure state changes in the caller's process
    from matplotlib.figure import Figure

    rows = results["block"]["rows"]
    gas = [r["ga"] for r in rows]
    cuda = any(r["models"]["with LD"]["peak_bytes"] is not None for r in rows)
    panels = [
        ("inference", "inference, ms"),
        ("train_step", "train step, ms"),
        ("saved", "kept for backward, MiB"),
    ]
    if cuda:
        panels.append(("peak", "peak memory of a train step, MiB"))
    width_in = 4.2 * len(panels)
    text = title(results, width_in)
    # the panels keep their height under a title of more than three lines
    fig = Figure(figsize=(width_in, 3.8 + 0.17 * max(0, text.count("\n") - 2)))
    axes = fig.subplots(1, len(panels), squeeze=False)
    xs = list(range(len(gas)))
    width = 0.38
    for ax, (key, label) in zip(axes[0], panels):
        for k, name in enumerate(("with LD", "without LD")):
            pos = [x + (k - 0.5) * width for x in xs]
            if key in ("inference", "train_step"):
                stats = [r["models"][name][key] for r in rows]
                vals = [t["median_ms"] for t in stats]
                # error bars: the interquartile range around the median
                low = [t["median_ms"] - t.get("q1_ms", t["median_ms"]) for t in stats]
                high = [t.get("q3_ms", t["median_ms"]) - t["median_ms"] for t in stats]
                ax.bar(pos, vals, width, yerr=[low, high], capsize=3, label=name)
            else:
                field = "saved_bytes" if key == "saved" else "peak_bytes"
                vals = [(r["models"][name][field] or 0) / 2**20 for r in rows]
                ax.bar(pos, vals, width, label=name)
        ax.set_xticks(xs)
        ax.set_xticklabels(gas, rotation=45, ha="right")
        ax.set_title(label, fontsize=10)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(text, fontsize=TITLE_SIZE)
    fig.tight_layout()
    return fig
