"""The ``--plot`` figure: time and memory per GA, with and without the LD, with error bars."""

from __future__ import annotations

from typing import Any

INSTALL_HINT = "matplotlib is not installed; install it with: pip install 'gald[plot]'"


def plot_available() -> tuple[bool, str]:
    """Whether matplotlib imports, and what to do when it does not."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False, INSTALL_HINT
    return True, ""


def plot(results: dict[str, Any], path: str) -> None:
    """Write a PNG of the block results: inference and train-step medians (whiskers: the
    interquartile range) and bytes saved for backward (and peak memory on CUDA) per GA."""
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
        ("saved", "saved for backward, MiB"),
    ]
    if cuda:
        panels.append(("peak", "peak memory of a train step, MiB"))
    fig = Figure(figsize=(4.2 * len(panels), 3.8))
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
    env, cfg = results["environment"], results["config"]
    fig.suptitle(
        f"GALD with and without LD, input {tuple(cfg['shape'])}, {cfg['device']} "
        f"({env['device_name']}), {cfg['dtype']}, "
        f"{'channels_last' if cfg['channels_last'] else 'NCHW'}, threads: {env['threads']}, "
        f"{env['date']}; "
        "bars: median, whiskers: interquartile range",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
