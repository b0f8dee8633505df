"""``trickbench history show``: one machine's stored history as figures and a markdown table.

Commits are placed in git order (HEAD's history, oldest first). For each cell and metric, each
step from one commit with data to the next is judged by the rule of the metric's tier
(:func:`bench.regression.compare.judge_metric`, the code ``compare`` runs): a step that rule calls
REGRESSED or IMPROVED is marked on the figure and listed. Machines are never pooled (one store
folder is shown); where the environment that sets a run's speed or numbers changes between two
commits (torch, CPU model, GPU, Python, or the matrix text), the line breaks and the step across
the break is not judged: it would compare the environments, not the commits.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.execution import machine
from bench.regression.cells import METRICS, BadInput, CellRecord, Metric, common_value
from bench.regression.compare import IMPROVED, REGRESSED, Policy, Verdict, judge_metric
from bench.regression.history import (
    DEFAULT_STORE,
    check_machine_name,
    documents,
    git_order,
    machines_in,
    one_line_failures,
    require_repository,
    stored_cells,
    this_machine,
)
from bench.reports.figures import _pyplot, _save
from bench.reports.stats import summarize

MARKED = (REGRESSED, IMPROVED)
BREAK_FIELDS = (*machine.FINGERPRINT_FIELDS, "matrix_digest")
HEADLINE = ("flops_per_step", "peak_memory_bytes", "step_time_ms_median", "accuracy_top1")  # always drawn


@dataclass
class Point:
    """One cell at one commit: its runs' values of one metric."""

    commit: str
    position: int  # on the figure's x axis
    record: CellRecord
    series: dict[str, Any]  # the fields whose change breaks the line

    def values(self, metric: str) -> list[float]:
        return list(self.record.values.get(metric, {}).values())


@dataclass
class Step:
    """Two consecutive points of a cell and metric: judged, or a break."""

    previous: Point
    point: Point
    cell: str
    metric: str
    verdict: Verdict | None = None  # None: a break
    change: str = ""  # a break's environment change


def series_of(document: dict[str, Any], key: str) -> dict[str, Any]:
    """Per break field, the value its runs share (``<mixed>`` when they differ)."""
    runs = document["cells"][key]["runs"]
    fields = [{**machine.speed_fields(run.get("env") or {}), "matrix_digest": run.get("matrix_digest")} for run in runs]
    return {name: common_value(f.get(name) for f in fields) for name in BREAK_FIELDS}


def describe_change(before: dict[str, Any], after: dict[str, Any]) -> str:
    names = {"matrix_digest": "matrix", "python_minor": "python"}
    return ", ".join(f"{names.get(k, k)} {before[k]} → {after[k]}" for k in BREAK_FIELDS if before[k] != after[k])


def matches(wanted: str | None, key: str, label: str) -> bool:
    return wanted is None or wanted in (key, label)


def collect(docs: dict[str, dict[str, Any]], order: list[str], cell: str | None) -> dict[str, list[Point]]:
    """cell key → its points in git order."""
    points: dict[str, list[Point]] = {}
    position = 0
    for commit in order:
        if commit not in docs:
            continue
        records = stored_cells(docs[commit])
        for key, record in records.items():
            if matches(cell, key, record.label):
                points.setdefault(key, []).append(Point(commit, position, record, series_of(docs[commit], key)))
        position += 1
    return points


def judge_steps(points: dict[str, list[Point]], metrics: list[Metric], policy: Policy) -> list[Step]:
    """Every step between consecutive commits with values, per cell and metric: a break or a verdict."""
    steps = []
    for key, cell_points in points.items():
        for metric in metrics:
            with_values = [p for p in cell_points if p.values(metric.name)]
            for previous, point in zip(with_values, with_values[1:]):
                if previous.series != point.series:
                    steps.append(Step(previous, point, key, metric.name,
                                      change=describe_change(previous.series, point.series)))
                    continue
                steps.append(Step(previous, point, key, metric.name,
                                  judge_metric(metric, previous.record, point.record, policy)))
    return steps


def unit(metric: str) -> tuple[float, str]:
    if metric.endswith("_bytes") or metric.startswith("memory_breakdown."):
        return 2 ** 20, "MiB"
    if metric == "flops_per_step":
        return 1e6, "MFLOP"
    return 1.0, {"step_time_ms_median": "ms", "throughput_samples_per_s": "samples/s"}.get(metric, "")


def segments(points: list[Point], breaks: set[str]) -> list[list[Point]]:
    """``points`` cut where a break starts a new stretch of line."""
    parts: list[list[Point]] = []
    for point in points:
        if not parts or point.commit in breaks:
            parts.append([])
        parts[-1].append(point)
    return parts


def plot_metric(metric: str, points: dict[str, list[Point]], steps: list[Step], ticks: list[str],
                machine_name: str, path: Path) -> bool:
    """Per-run values as points, the run-level mean and 95% interval as a line and band per cell,
    a dotted line at each break, a ring at each marked step."""
    # lazy: matplotlib/seaborn/pandas cost ~1 s and only figures need them
    import seaborn as sns

    series = {key: [p for p in cell_points if p.values(metric)] for key, cell_points in points.items()}
    series = {key: cell_points for key, cell_points in series.items() if cell_points}
    if not series:
        return False
    scale, label = unit(metric)
    plt = _pyplot()
    fig, ax = plt.subplots(layout="constrained", figsize=(max(8.0, 0.6 * len(ticks) + 3), 4.8))
    colors = dict(zip(series, sns.color_palette("tab10" if len(series) <= 10 else "husl", len(series))))
    xs, ys, hues = [], [], []
    for key, cell_points in series.items():
        for p in cell_points:
            values = p.values(metric)
            offsets = [0.0] if len(values) == 1 else [0.16 * (i / (len(values) - 1) - 0.5) for i in range(len(values))]
            xs += [p.position + o for o in offsets]
            ys += [v / scale for v in values]
            hues += [key] * len(values)
    sns.scatterplot(x=xs, y=ys, hue=hues, palette=colors, ax=ax, s=22, alpha=0.55, edgecolor="none", legend=False)
    mine = [s for s in steps if s.metric == metric and s.cell in series]
    for key, cell_points in series.items():
        breaks = {s.point.commit for s in mine if s.cell == key and s.verdict is None}
        for index, part in enumerate(segments(cell_points, breaks)):
            stats = [summarize(p.values(metric)) for p in part]
            at = [p.position for p in part]
            ax.plot(at, [s["mean"] / scale for s in stats], color=colors[key], marker="_", markersize=14,
                    linewidth=1.6, label=None if index else key)
            lows, highs = [s["ci_low"] / scale for s in stats], [s["ci_high"] / scale for s in stats]
            ax.fill_between(at, lows, highs, color=colors[key], alpha=0.15, linewidth=0)
            shown = [(x, s["mean"] / scale, lo, hi) for x, s, lo, hi in zip(at, stats, lows, highs) if math.isfinite(lo)]
            if shown:  # the interval of a lone commit, which a band cannot draw
                x, y, lo, hi = map(list, zip(*shown))
                ax.errorbar(x, y, yerr=[[a - b for a, b in zip(y, lo)], [b - a for a, b in zip(y, hi)]], fmt="none",
                            ecolor=colors[key], elinewidth=1, capsize=3, alpha=0.6)
    for step in mine:
        if step.verdict is None:
            x = step.point.position - 0.5
            ax.axvline(x, color="0.35", linestyle=":", linewidth=1.4)
            ax.annotate(f"break: {step.change}", (x, 0.02), xycoords=("data", "axes fraction"), rotation=90,
                        va="bottom", ha="right", fontsize=7, color="0.3")
        elif step.verdict.verdict in MARKED:
            y = summarize(step.point.values(metric))["mean"] / scale
            color = "tab:red" if step.verdict.verdict == REGRESSED else "tab:green"
            ax.scatter([step.point.position], [y], s=260, facecolors="none", edgecolors=color, linewidths=2, zorder=4)
            before = summarize(step.previous.values(metric))["mean"] / scale
            relative = f" ({y / before - 1:+.2%})" if before and "%" not in step.verdict.change and "×" not in \
                step.verdict.change else ""
            ax.annotate(f"{step.verdict.verdict} {step.verdict.change}{relative}", (step.point.position, y),
                        textcoords="offset points", xytext=(10, 8), fontsize=8, color=color)
    ax.set_xticks(range(len(ticks)), ticks, rotation=35, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(ticks) - 0.4)
    ax.margins(y=0.12)  # room for the labels of marked steps
    ax.set(xlabel="commit (git order, oldest first)", ylabel=f"{metric}" + (f" ({label})" if label else ""))
    fig.suptitle(f"{metric} on machine {machine_name}")
    ax.set_title("points: runs; line and band: mean and 95% interval; rings: steps compare's rule marks; "
                 "dotted: a break", fontsize=8)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    _save(fig, path)
    return True


def _number(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:.4g}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def to_markdown(machine_name: str, description: str, steps: list[Step], points: dict[str, list[Point]],
                metrics: list[Metric], subjects: dict[str, str], figures: list[str]) -> str:
    marked = [s for s in steps if s.verdict is not None and s.verdict.verdict in MARKED]
    breaks = {(s.cell, s.point.commit): s for s in steps if s.verdict is None}
    commits = sorted({p.commit: p.position for ps in points.values() for p in ps}.items(), key=lambda kv: kv[1])
    lines = [f"# Performance history: machine {machine_name}", "", f"{description}; {len(commits)} commits "
             f"with runs, oldest first. Steps judged by `compare`'s rule of each metric's tier.", "",
             f"## Steps ({len(marked)} marked)", ""]
    if marked:
        lines += ["| commit | subject | cell | metric | before | after | change | verdict | note |",
                  "| :--- | :--- | :--- | :--- | ---: | ---: | ---: | :--- | :--- |"]
        for s in marked:
            v = s.verdict
            lines.append(f"| `{s.point.commit[:12]}` | {_cell(subjects[s.point.commit])} | {_cell(s.cell)} | {s.metric} "
                         f"| {v.base} | {v.new} | {v.change} | {v.verdict} | {_cell(v.note)} |")
    else:
        lines.append("No step between consecutive commits is marked by the rules.")
    if breaks:
        lines += ["", "## Breaks (not judged across)", ""]
        lines += [f"- `{s.previous.commit[:12]}` → `{s.point.commit[:12]}` ({_cell(s.cell)}): {s.change}"
                  for s in breaks.values()]
    lines += ["", "## Values (mean of the runs)", ""]
    for key, cell_points in points.items():
        shown = [m for m in metrics if any(p.values(m.name) for p in cell_points)]
        lines += [f"### {key}", "", "| commit | subject | runs | " + " | ".join(m.name for m in shown) + " |",
                  "| :--- | :--- | ---: | " + " | ".join("---:" for _ in shown) + " |"]
        for p in cell_points:
            means = [summarize(p.values(m.name)) for m in shown]
            runs = max(s["n"] for s in means)
            values = [_number(s["mean"]) if s["n"] else "" for s in means]
            lines.append(f"| `{p.commit[:12]}` | {_cell(subjects[p.commit])} | {runs} | " + " | ".join(values) + " |")
        lines.append("")
    lines += ["## Figures", ""] + [f"![{name}]({name})" for name in figures]
    return "\n".join(lines) + "\n"


def pick_machine(store: Path, wanted: str | None) -> str:
    found = machines_in(store)
    if not found:
        raise BadInput(f"{store}: no history here (record some with `trickbench history record MATRIX`)")
    if wanted:
        if wanted not in found:
            raise BadInput(f"--machine {wanted}: not in {store} (machines there: {', '.join(found)})")
        return wanted
    here = [m for m in this_machine() if m in found]
    if here:
        return here[0]
    if len(found) == 1:
        print(f"note: {store} holds one machine, {found[0]}, not this one; showing it", file=sys.stderr)
        return found[0]
    raise BadInput(f"{store}: this machine has no history there; pick one with --machine ({', '.join(found)})")


def pick_metrics(names: list[str] | None) -> list[Metric]:
    known = {m.name: m for m in METRICS if m.tier != "instructions" and m.name != "benchmark_median_s"}
    for name in names or []:
        if name not in known:
            raise BadInput(f"--metric {name}: not a judged metric of a run (one of {', '.join(known)})")
    return [known[n] for n in names] if names else list(known.values())


def figure_metrics(metrics: list[Metric], steps: list[Step], asked: list[str] | None) -> list[Metric]:
    """Those asked for; by default the headline metrics and any other with a marked step or a break."""
    if asked:
        return metrics
    eventful = {s.metric for s in steps if s.verdict is None or s.verdict.verdict in MARKED}
    return [m for m in metrics if m.name in HEADLINE or m.name in eventful]


def figure_name(metric: str) -> str:
    return f"history-{metric.replace('.', '-')}.png"


@one_line_failures
def cmd_show(args: argparse.Namespace) -> int:
    """``history show``: figures and markdown for one machine; prints the markdown."""
    require_repository()
    store = Path(args.store or DEFAULT_STORE)
    if args.factor <= 1:
        raise BadInput(f"--factor: {args.factor:g} must be above 1 (e.g. 1.10)")
    metrics = pick_metrics(args.metric)
    machine_name = pick_machine(store, check_machine_name(args.machine))
    docs = documents(store, machine_name)
    order = git_order(args.since)
    left_out = [c for c in docs if c not in order]
    if left_out:
        print(f"note: {len(left_out)} stored commits are not in HEAD's history{' from --since on' if args.since else ''}"
              f" and are left out: {', '.join(c[:12] for c in left_out[:5])}", file=sys.stderr)
    points = collect(docs, order, args.cell)
    if not points:
        raise BadInput(f"{store / machine_name}: no runs to show" + (f" of cell {args.cell}" if args.cell else ""))
    steps = judge_steps(points, metrics, Policy(factor=args.factor))
    shown = [c for c in order if c in docs]
    subjects = {c: docs[c].get("subject", "") for c in shown}
    ticks = [f"{c[:7]} {subjects[c][:22]}" for c in shown]
    out = Path(args.out or Path("results") / "history" / machine_name)
    out.mkdir(parents=True, exist_ok=True)
    figures = [figure_name(m.name) for m in figure_metrics(metrics, steps, args.metric)
               if plot_metric(m.name, points, steps, ticks, machine_name, out / figure_name(m.name))]
    description = docs[shown[0]].get("machine_description", "")
    markdown = to_markdown(machine_name, description, steps, points, metrics, subjects, figures)
    (out / "history.md").write_text(markdown, encoding="utf-8")
    (out / "steps.json").write_text(json.dumps(
        [{"commit": s.point.commit, "previous": s.previous.commit, "cell": s.cell, "metric": s.metric,
          "verdict": s.verdict.verdict if s.verdict else "break", "change": s.verdict.change if s.verdict else s.change,
          "before": s.verdict.base if s.verdict else "", "after": s.verdict.new if s.verdict else ""}
         for s in steps if s.verdict is None or s.verdict.verdict in MARKED], indent=1) + "\n", encoding="utf-8")
    print(markdown)
    print(f"wrote {out / 'history.md'}, {out / 'steps.json'} and {len(figures)} figures", file=sys.stderr)
    return 0
