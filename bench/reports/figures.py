"""Report figures: seaborn plots of per-cell statistics, saved as PNG (never shown)."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from bench.reports.stats import (
    MEMORY_COMPONENTS,
    Row,
    axis_key,
    axis_values,
    mean_where,
    pareto_front,
)
from bench.store.files import write_atomic

# --- figures -------------------------------------------------------------------------------------------

DPI = 120


def _pyplot() -> Any:
    # lazy: matplotlib/seaborn/pandas cost ~1 s and only figures need them
    import matplotlib

    matplotlib.use("Agg")  # files only: works on headless machines and never opens a window
    # lazy: matplotlib/seaborn/pandas cost ~1 s and only figures need them
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    """Write the PNG whole or not at all (the store's writer), and always free the figure
    (pyplot keeps every open figure alive)."""
    plt = _pyplot()
    try:
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=DPI)
        write_atomic(path, png.getvalue())
    finally:
        plt.close(fig)


def _palette(stats: list[Row]) -> dict[str, Any]:
    """One colour per cell, the same in every figure."""
    # lazy: matplotlib/seaborn/pandas cost ~1 s and only figures need them
    import seaborn as sns

    labels = [s["label"] for s in stats]
    return dict(zip(labels, sns.color_palette("tab10" if len(labels) <= 10 else "husl", len(labels))))


def _plain_log_scale(axis: Any) -> None:
    """Log scale labelled 100, 200, 500, 1000 instead of 10²: readable without mental arithmetic."""
    # lazy: matplotlib/seaborn/pandas cost ~1 s and only figures need them
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    axis.axes.set_xscale("log") if axis.axis_name == "x" else axis.axes.set_yscale("log")
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(StrMethodFormatter("{x:g}"))
    axis.set_minor_formatter(NullFormatter())


def _height(n: int) -> float:
    return max(3.0, 0.45 * n + 1.5)


def _label_offsets(ax: Any, xs: list[float], ys: list[float]) -> list[tuple[float, float]]:
    """Text offsets (points) that move a label down while it would print over an earlier one."""
    placed, offsets = [], []
    for px, py in ax.transData.transform(np.column_stack([xs, ys])) * 72 / DPI:
        dy = 5.0
        while any(abs(px - qx) < 70 and abs(py + dy - qy) < 10 for qx, qy in placed):
            dy -= 10
        placed.append((px, py + dy))
        offsets.append((6.0, dy))
    return offsets


def plot_throughput_vs_memory(stats: list[Row], path: Path) -> bool:
    ok = [s for s in stats if math.isfinite(s["peak_mib"]) and math.isfinite(s["throughput"]["mean"])]
    if not ok:
        return False
    plt, colors = _pyplot(), _palette(stats)
    fig, ax = plt.subplots(layout="constrained", figsize=(9, 5.5))
    memory, speed = [s["peak_mib"] for s in ok], [s["throughput"]["mean"] for s in ok]
    # The axes follow the means, not the intervals: with two seeds a t interval can be ten times
    # the mean and would squash every point into one corner. Bars that run off are said to.
    if max(speed) / max(min(speed), 1e-12) > 10:
        _plain_log_scale(ax.yaxis)
        ax.set_ylim(min(speed) / 2, max(speed) * 2)
    else:
        ax.set_ylim(0, max(speed) * 1.3)
    ax.set_xlim(0, max(memory) * 1.15)
    clipped = False
    for s, offset in zip(ok, _label_offsets(ax, memory, speed)):
        low, high = s["throughput"]["ci_low"], s["throughput"]["ci_high"]
        bars = math.isfinite(low) and math.isfinite(high)
        clipped |= bars and (high > ax.get_ylim()[1] or low < ax.get_ylim()[0])
        ax.errorbar(s["peak_mib"], s["throughput"]["mean"], yerr=(high - low) / 2 if bars else None, fmt="o",
                    color=colors[s["label"]], capsize=4, markersize=7, label=s["label"])
        ax.annotate(s["label"], (s["peak_mib"], s["throughput"]["mean"]), textcoords="offset points",
                    xytext=offset, fontsize=8)
    front = pareto_front(memory, speed)
    xs, ys = [memory[i] for i in front], [speed[i] for i in front]
    ax.plot(xs + [max(memory)], ys + [ys[-1]], drawstyle="steps-post", color="0.3", linestyle="--",
            linewidth=1.2, zorder=0, label="Pareto front:\nmost throughput\nfor its memory (circled)")
    ax.scatter(xs, ys, s=220, facecolors="none", edgecolors="0.2", linewidths=1.5, zorder=3)
    ax.set(xlabel="peak memory (MiB)", ylabel="throughput (samples/s" + (", log scale)" if
           ax.get_yscale() == "log" else ")"), title="Throughput vs peak memory (mean over seeds, 95% CI)"
           + ("\nsome intervals run off the plot (few seeds)" if clipped else ""))
    fig.legend(fontsize=8, loc="outside right upper")
    ax.grid(alpha=0.3)
    _save(fig, path)
    return True


def plot_accuracy(stats: list[Row], path: Path) -> bool:
    ok = [s for s in stats if math.isfinite(s["accuracy"]["mean"])]
    if not ok:
        return False
    plt, colors = _pyplot(), _palette(stats)
    fig, ax = plt.subplots(layout="constrained", figsize=(8, _height(len(ok))))
    for y, s in enumerate(ok):
        half = (s["accuracy"]["ci_high"] - s["accuracy"]["ci_low"]) / 2
        ax.errorbar(s["accuracy"]["mean"], y, xerr=half if math.isfinite(half) else None, fmt="o",
                    color=colors[s["label"]], capsize=4, markersize=7)
    title = "Final top-1 accuracy (mean over seeds, 95% CI)"
    if stats[0] in ok:
        ax.axvline(stats[0]["accuracy"]["mean"], color="0.5", linestyle="--", linewidth=1)
        title += "\ndashed line: baseline mean"
    ax.set_yticks(range(len(ok)), [s["label"] for s in ok])
    ax.invert_yaxis()
    left, right = ax.get_xlim()
    if right > 100:  # a t interval of a few seeds can pass 100%; the scale should not
        ax.set_xlim(left, 100.5)
        title += "; intervals cut at 100%"
    ax.set(xlabel="top-1 accuracy (%)", title=title)
    ax.grid(alpha=0.3, axis="x")
    _save(fig, path)
    return True


def _speedup_grid(stats: list[Row], design: str) -> tuple[Any, ...] | None:
    """(speedups, annotations, y label, x label, row names, column names) for the heatmap.

    full_factorial: the first two axes, each square the mean over the other axes. one_at_a_time:
    one row per axis, one column per value position, each square the cell that changes only that
    axis. None when no axis has a second value or the baseline has no throughput.
    """
    values = {a: v for a, v in axis_values(stats).items() if len(v) > 1}
    if not values or not math.isfinite(stats[0]["throughput"]["mean"]):
        return None
    names = list(values)
    if design == "full_factorial" and len(names) >= 2:
        a, b = names[:2]
        grid = np.array([[mean_where(stats, "speedup", **{a: va, b: vb}) for vb in values[b]] for va in values[a]])
        notes = np.vectorize(lambda v: f"{v:.2f}×" if math.isfinite(v) else "no data", otypes=[object])(grid)
        return grid, notes, a, b, [axis_key(v) for v in values[a]], [axis_key(v) for v in values[b]]
    width = max(len(v) for v in values.values())
    grid, notes = np.full((len(names), width), np.nan), np.full((len(names), width), "", dtype=object)
    for r, axis in enumerate(names):
        for c, value in enumerate(values[axis]):
            grid[r, c] = speed = mean_where(stats, "speedup", **{**stats[0]["axes"], axis: value})
            notes[r, c] = f"{axis_key(value)}\n" + (f"{speed:.2f}×" if math.isfinite(speed) else "no data")
    columns = ["baseline value"] + [f"value {i + 1}" for i in range(1, width)]
    return grid, notes, "axis", "axis value (annotated; first = baseline)", names, columns


def _ratio_ticks(span: float) -> list[float]:
    """Round ratios (0.5×, 1×, 2×, …) inside ±span on a log2 scale, finer when the span is narrow."""
    for candidates in ((0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100),
                       (0.5, 0.67, 0.8, 1, 1.25, 1.5, 2), (0.8, 0.9, 0.95, 1, 1.05, 1.1, 1.25)):
        ticks = [math.log2(r) for r in candidates if abs(math.log2(r)) <= span]
        if len(ticks) >= 4:
            break
    return ticks


def plot_speedup_heatmap(stats: list[Row], design: str, path: Path) -> bool:
    spec = _speedup_grid(stats, design)
    if spec is None:
        return False
    grid, notes, ylabel, xlabel, rows, columns = spec
    # lazy: matplotlib/seaborn/pandas cost ~1 s and only figures need them
    import seaborn as sns

    plt = _pyplot()
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log2(grid)  # colour on a log scale: 0.5× and 2× get equally strong colours
    span = max(float(np.nanmax(np.abs(logs))) * 1.05 if np.isfinite(logs).any() else 0.0, 0.15)
    size = (max(5.0, 1.6 * len(columns) + 2.5), max(3.0, 0.8 * len(rows) + 1.5))
    fig, ax = plt.subplots(layout="constrained", figsize=size)
    sns.heatmap(logs, annot=notes, fmt="", cmap="RdYlGn", center=0, vmin=-span, vmax=span, ax=ax,
                xticklabels=columns, yticklabels=rows, linewidths=0.5, linecolor="white",
                cbar_kws={"label": "speedup vs baseline (×, log scale)", "ticks": _ratio_ticks(span)})
    ax.collections[0].colorbar.set_ticklabels([f"{2 ** t:.3g}×" for t in _ratio_ticks(span)])
    ax.set(xlabel=xlabel, ylabel=ylabel, title="Throughput speedup vs baseline (green faster, red slower)")
    ax.tick_params(axis="y", rotation=0)
    _save(fig, path)
    return True


def plot_memory_breakdown(stats: list[Row], path: Path) -> bool:
    ok = [s for s in stats if any(math.isfinite(v) for v in s["breakdown"].values())]
    if not ok:
        return False
    # lazy: matplotlib/seaborn/pandas cost ~1 s and only figures need them
    import seaborn as sns

    plt = _pyplot()
    fig, ax = plt.subplots(layout="constrained", figsize=(9, _height(len(ok))))
    left = np.zeros(len(ok))
    for component, color in zip(MEMORY_COMPONENTS, sns.color_palette("Set2", len(MEMORY_COMPONENTS))):
        widths = np.nan_to_num([s["breakdown"][component] for s in ok])
        ax.barh(range(len(ok)), widths, left=left, color=color, label=component.replace("_", " "))
        left += widths
    ax.set_yticks(range(len(ok)), [s["label"] for s in ok])
    ax.invert_yaxis()
    ax.set(xlabel="memory at peak (MiB, mean over seeds)", title="Peak memory breakdown per cell")
    fig.legend(fontsize=8, loc="outside right upper")
    ax.grid(alpha=0.3, axis="x")
    _save(fig, path)
    return True


def plot_curves(stats: list[Row], path: Path) -> bool:
    # lazy: pandas costs ~0.5 s and only the CSV/figures need it
    import pandas as pd

    # lazy: matplotlib/seaborn/pandas cost ~1 s and only figures need them
    import seaborn as sns

    frame = pd.DataFrame([{**p, "cell": s["label"]} for s in stats for p in s["curves"]])
    if frame.empty or "train_loss" not in frame or frame["train_loss"].isna().all():
        return False
    plt, colors = _pyplot(), _palette(stats)
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, layout="constrained", figsize=(12, 4.5))
    sns.lineplot(frame, x="epoch", y="train_loss", hue="cell", palette=colors, estimator="mean",
                 errorbar=None, marker="o", ax=loss_ax, legend=False)
    loss_ax.set(xlabel="epoch", ylabel="train loss", title="Training loss (mean over seeds)")
    if "accuracy_top1" in frame and frame["accuracy_top1"].notna().any():
        frame["accuracy_pct"] = frame["accuracy_top1"] * 100
        sns.lineplot(frame, x="epoch", y="accuracy_pct", hue="cell", palette=colors, estimator="mean",
                     errorbar=None, marker="o", ax=acc_ax, legend=False)
    else:
        acc_ax.text(0.5, 0.5, "no accuracy recorded\n(e.g. synthetic data)", ha="center", va="center",
                    transform=acc_ax.transAxes, color="0.4")
    acc_ax.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="Accuracy after each epoch (mean over seeds)")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[c], marker="o", label=c) for c in dict.fromkeys(frame["cell"])]
    fig.legend(handles=handles, fontsize=8, loc="outside right upper")
    _save(fig, path)
    return True


def plot_step_times(stats: list[Row], path: Path) -> bool:
    """One point per run (its median step time), the unit the significance marks compare; runs
    under competing load in red, so a lone slow point can be traced to the machine."""
    # lazy: pandas costs ~0.5 s and only the CSV/figures need it
    import pandas as pd

    # lazy: matplotlib/seaborn/pandas cost ~1 s and only figures need them
    import seaborn as sns

    frame = pd.DataFrame([{"cell": s["label"], "ms": run["step_ms"], "load": _load_label(run["under_load"])}
                          for s in stats for run in s["runs"] if run["step_ms"] is not None])
    if frame.empty:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(layout="constrained", figsize=(9, _height(frame["cell"].nunique())))
    colors = {"quiet": "tab:blue", "under load": "tab:red", "load unknown": "0.5"}
    # seaborn draws its jitter from numpy's global generator: seed it here (and restore it), so a
    # report rebuilt from the same rows gives the same figure, byte for byte.
    state = np.random.get_state()
    np.random.seed(0)
    sns.stripplot(frame, x="ms", y="cell", hue="load", hue_order=[k for k in colors if k in set(frame["load"])],
                  palette=colors, size=7, jitter=0.15, ax=ax)
    np.random.set_state(state)
    spread = frame["ms"].max() / max(frame["ms"].min(), 1e-9)
    if spread > 20:  # one slow cell would squash every other cell's points into one
        _plain_log_scale(ax.xaxis)
    ax.set(xlabel="median step time of each run (ms" + (", log scale)" if spread > 20 else ")"), ylabel="",
           title="Per-run median step time (one point per run, warm-up excluded)")
    ax.legend(title="machine during the run", fontsize=8, title_fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    _save(fig, path)
    return True


def _load_label(under_load: bool | None) -> str:
    return "load unknown" if under_load is None else "under load" if under_load else "quiet"


SKIPPED = {"accuracy": "accuracy is null in every row (e.g. synthetic data)",
           "throughput_vs_memory": "no successful run recorded throughput and memory",
           "speedup_heatmap": "needs a baseline with throughput and an axis with a second value",
           "memory_breakdown": "no memory breakdown recorded", "curves": "no training curves recorded",
           "step_times": "no per-run step times recorded"}


def write_figures(stats: list[Row], design: str, folder: Path) -> tuple[list[str], list[str]]:
    """Every figure that has data; stale ones from an earlier build are removed. (written, notes)."""
    folder.mkdir(parents=True, exist_ok=True)
    plots = {"throughput_vs_memory": plot_throughput_vs_memory, "accuracy": plot_accuracy,
             "speedup_heatmap": lambda s, p: plot_speedup_heatmap(s, design, p),
             "memory_breakdown": plot_memory_breakdown, "curves": plot_curves, "step_times": plot_step_times}
    written, notes = [], []
    for name, plot in plots.items():
        path = folder / f"{name}.png"
        if plot(stats, path):
            written.append(path.name)
        else:
            path.unlink(missing_ok=True)
            notes.append(f"{name}.png skipped: {SKIPPED[name]}.")
    return written, notes
