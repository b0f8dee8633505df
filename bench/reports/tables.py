"""Markdown tables and sections of a report: number formatting, the per-cell table, the design's
sections, load, failures, environment and machines. Pure functions of rows and statistics."""
from __future__ import annotations

import math
from collections import Counter
from typing import Any, Optional

from bench.base.errors import clip
from bench.execution import machine
from bench.reports.stats import (
    LOAD_HEADROOM,
    MIN_EFFECT,
    MIN_RUNS,
    Comparison,
    Row,
    all_cell_stats,
    axis_key,
    axis_values,
    excludes,
    infer_design,
    mean_where,
    ran_under_load,
    too_few_note,
)


def md_table(headers: list[str], rows: list[list[Any]], numeric: bool = True) -> str:
    """A GitHub markdown table (no tabulate dependency): first column left-aligned, the others
    right-aligned when ``numeric``, so that numbers line up; cells are flattened to one line."""
    def cell(value: Any) -> str:
        return " ".join(str(value).split()).replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, headers)) + " |",
             "| :--- |" + (" ---: |" if numeric else " :--- |") * (len(headers) - 1)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def _decimals(x: float) -> int:
    """Enough decimals for three significant digits: 3026, 273, 19.9, 8.07, 0.123."""
    return max(0, 2 - math.floor(math.log10(abs(x)))) if math.isfinite(x) and x else 0


def fmt(x: float, decimals: int | None = None) -> str:
    if not math.isfinite(x):
        return "—"
    return f"{x:.{_decimals(x) if decimals is None else decimals}f}"


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}×" if math.isfinite(x) else "—"


def _div(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b else math.nan


def fmt_ci(summary: Row, decimals: int | None = None) -> str:
    """``mean ± half-width`` of the 95% interval; the mean alone when the interval is unknown."""
    mean, decimals = summary["mean"], _decimals(summary["mean"]) if decimals is None else decimals
    half = (summary["ci_high"] - summary["ci_low"]) / 2
    return fmt(mean, decimals) + (f" ± {fmt(half, decimals)}" if math.isfinite(half) else "")


def fmt_interval(estimate: tuple[float, float, float], unit: str, decimals: int, mark: bool,
                 signed: bool = False) -> str:
    value, low, high = estimate
    if not math.isfinite(value):
        return "—"
    def number(x: float) -> str:
        text = f"{x:{'+' if signed else ''}.{decimals}f}"
        return text.replace("-", "+") if signed and float(text) == 0 else text  # no "-0.0"

    text = number(value) + unit
    if math.isfinite(low) and math.isfinite(high):
        text += f" [{number(low)}, {number(high)}]"
    return text + ("*" if mark else "")


def fmt_runs(s: Row) -> str:
    """ok/all runs, and how many of the ok runs ran under competing load or beside other runs."""
    return (f"{s['n_ok']}/{s['n_runs']}" + (f", {s['n_under_load']} under load" if s["n_under_load"] else "")
            + (f", {s['n_shared_timing']} shared timing" if s["n_shared_timing"] else ""))


SHARED = "not comparable (shared timing)"


def timing_shared(s: Row) -> bool:
    """Whether the cell's or the baseline's runs were timed beside other runs: no speed call then."""
    return bool(s["n_shared_timing"] or s["shared_baseline"])


CELL_HEADERS = ["cell", "ok runs", "throughput (samples/s)", "median step (ms)", "peak memory (MiB)",
                "activations (MiB)", "top-1 (%)", "final train loss", "speedup ×", "memory ×", "Δ top-1 (pts)"]


LEGEND = ("The unit of replication is the run (one seed, one process): each run is first reduced to one "
          "value (its median step time, its throughput, its accuracy); step times of different runs are "
          "never pooled, because the steps of one run are not independent samples. Throughput and top-1: "
          "mean over runs ± half-width of the 95% Student-t interval. Median step = geometric mean over runs "
          "of each run's median step time. Speedup = geometric mean of the per-run throughputs ÷ the "
          "baseline's, [95% interval: Welch's t on log throughput, exponentiated]; memory × = mean peak "
          "memory ÷ the baseline's; Δ top-1 = difference of mean accuracy in percentage points, [95% Welch "
          "interval]. `*` on the median step = the cell's one speed call: Welch's t on the log per-run "
          f"median step times gives p < 0.05 against the baseline's, AND their ratio moved by ≥ {MIN_EFFECT:.0%}. "
          "One call per cell, not one per column, keeps the rate of false calls within the nominal 5% "
          f"(measured with the A/A check `trickbench aa`). With fewer than {MIN_RUNS} ok runs in the cell "
          "or the baseline there is no call and no interval; the cell says `n=K: too few runs to call` "
          "(K = the smaller run count). `*` on Δ top-1 = its interval excludes 0. `under load` = runs whose "
          f"1-minute load average at start or end exceeded {LOAD_HEADROOM:g} × the CPU cores (competing "
          "work; listed below the tables). `shared timing` = runs started beside other runs on the same CPU "
          f"(`run --parallel N --shared-timing`): their speed is shown but never compared ({SHARED}). "
          "`—` = no data.")


def cell_row(s: Row) -> list[str]:
    change = s["accuracy_change"]
    ref = s["is_base"]
    shared = timing_shared(s)
    return [f"**{s['label']}**" if ref else s["label"], fmt_runs(s), fmt_ci(s["throughput"]),
            fmt(s["step_ms"]) + ("" if ref or shared else verdict_mark(s["step_verdict"])),
            fmt(s["peak_mib"]), fmt(s["breakdown"]["activations"]), fmt_ci(s["accuracy"], 1), fmt(s["loss"], 3),
            "ref" if ref else SHARED if shared else fmt_speedup(s["speedup"]),
            "ref" if ref else fmt_ratio(s["memory_ratio"]),
            "ref" if ref else fmt_interval(change, "", 1, excludes(change[1], change[2], 0.0), signed=True)]


# Axes that act on the input pipeline: their effect is the time the step waits for data, so the
# tables where they vary show the data-stall fraction too.
INPUT_PIPELINE_AXES = frozenset({"num_workers", "pin_memory", "persistent_workers", "prefetch_factor", "augment"})


STALL_HEADER = "data stall (%)"


def cell_table(stats: list[Row], with_stall: bool) -> str:
    """The cells' table; with ``with_stall`` also the mean share of timed wall time spent in ``next(loader)``."""
    if not with_stall:
        return md_table(CELL_HEADERS, [cell_row(s) for s in stats])
    return md_table(CELL_HEADERS + [STALL_HEADER], [cell_row(s) + [fmt(100 * s["data_stall"], 1)] for s in stats])


def one_at_a_time_section(stats: list[Row]) -> list[str]:
    """One table per axis: the baseline and the cells that change that axis; any cell left over after."""
    lines, shown = [], {0}
    base = stats[0]["axes"]
    for axis in axis_values(stats):
        members = [i for i, s in enumerate(stats) if i and axis_key(s["axes"].get(axis)) != axis_key(base.get(axis))]
        if members:
            shown.update(members)
            table = cell_table([stats[i] for i in [0, *members]], axis in INPUT_PIPELINE_AXES)
            lines += [f"### {axis}", "", table, ""]
    rest = [0] + [i for i in range(len(stats)) if i not in shown]
    if len(rest) > 1 or len(stats) == 1:
        with_stall = bool(INPUT_PIPELINE_AXES & set(axis_values(stats)))
        lines += ["### Other cells", "", cell_table([stats[i] for i in rest], with_stall), ""]
    return lines


def factorial_section(stats: list[Row]) -> list[str]:
    """All cells, then main effects per axis value and a speedup pivot for every pair of axes."""
    values = axis_values(stats)
    lines = ["### All cells", "", cell_table(stats, bool(INPUT_PIPELINE_AXES & set(values))), "",
             "### Main effects", "", "Each value's mean over all cells that have it (the other axes averaged "
             "out); ratios are against the baseline's value of the same axis.", ""]
    for axis, options in values.items():
        base_thr = mean_where(stats, "throughput", **{axis: options[0]})
        base_mem = mean_where(stats, "peak_mib", **{axis: options[0]})
        table = []
        for value in options:
            thr, mem = (mean_where(stats, f, **{axis: value}) for f in ("throughput", "peak_mib"))
            table.append([axis_key(value), fmt(thr), fmt_ratio(_div(thr, base_thr)), fmt(mem),
                          fmt_ratio(_div(mem, base_mem)), fmt(mean_where(stats, "accuracy", **{axis: value}), 1)])
        lines += [f"**{axis}**", "", md_table([axis, "throughput (samples/s)", "speedup ×", "peak memory (MiB)",
                                               "memory ×", "top-1 (%)"], table), ""]
    lines += ["### Interactions", "", "Speedup vs the baseline for each pair of axes, mean over the other axes.", ""]
    names = list(values)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            table = [[axis_key(va)] + [fmt_ratio(mean_where(stats, "speedup", **{a: va, b: vb})) for vb in values[b]]
                     for va in values[a]]
            lines += [f"**{a} × {b}**", "", md_table([f"{a} \\ {b}"] + [axis_key(v) for v in values[b]], table), ""]
    return lines


def scaling_section(stats: list[Row]) -> list[str]:
    """Data-parallel scaling: each world_size > 1 cell beside the world_size 1 cell of equal config."""
    scaled = [s for s in stats if math.isfinite(s["scaling_efficiency"])]
    if not scaled:
        return []
    table = [[s["label"], s["world_size"], fmt_ci(s["throughput"]), fmt(s["scaling_efficiency"], 2), fmt(s["peak_mib"])]
             for s in sorted(scaled, key=lambda s: s["world_size"])]
    return ["### Scaling", "", "Scaling efficiency = throughput ÷ (world size × the throughput of the world_size 1 "
            "cell with otherwise equal config); 1.00 = linear. Throughput counts the samples of all ranks; peak "
            "memory is the largest rank's.", "",
            md_table(["cell", "world size", "throughput (samples/s)", "scaling efficiency",
                      "peak memory per rank (MiB)"], table), ""]


def unstable_note(stats: list[Row], limit: float = 0.25) -> list[str]:
    """A visible note when seeds of one cell disagree wildly on throughput.

    Seeds change the data order and initialisation, which barely moves throughput; a spread this
    large almost always means the machine was busy with something else during some runs.
    """
    spread = {s["label"]: s["throughput"]["std"] / s["throughput"]["mean"] for s in stats
              if math.isfinite(s["throughput"]["std"]) and s["throughput"]["mean"] > 0}
    unstable = [f"{label} ({cv:.0%})" for label, cv in spread.items() if cv > limit]
    if not unstable:
        return []
    return [f"**Note: throughput varies by more than {limit:.0%} (std/mean) between the seeds of "
            f"{len(unstable)} of {len(spread)} cells: {', '.join(unstable)}. Seeds hardly change speed, so the "
            "machine was probably busy during some runs; treat speed comparisons with care.**", ""]


def load_section(rows: list[Row], labels: dict[str, str]) -> list[str]:
    """The ok runs flagged by :func:`bench.reports.stats.ran_under_load`, and how many rows cannot tell."""
    ok = [r for r in rows if r.get("status") == "ok"]
    flags = [ran_under_load(r) for r in ok]
    loaded = [r for r, flag in zip(ok, flags) if flag]
    unknown = sum(flag is None for flag in flags)
    lines = [f"{len(loaded)} of {len(ok)} ok runs ran under competing load (1-minute load average above "
             f"{LOAD_HEADROOM:g} × the CPU cores at start or end)"
             + (f"; {unknown} rows carry no load average (recorded before it was): unknown." if unknown else ".")]
    if loaded:
        def load(value: Any) -> str:
            return fmt(value, 2) if isinstance(value, (int, float)) else "—"

        table = [[labels[r["cell_id"]], r["seed"], load(r.get("load_avg_1m_start")), load(r.get("load_avg_1m_end")),
                  (r.get("env") or {}).get("cpu_cores")] for r in loaded]
        lines += ["", md_table(["cell", "seed", "load at start", "load at end", "CPU cores"], table)]
    return lines


def failures_section(rows: list[Row], labels: dict[str, str]) -> list[str]:
    failed = [r for r in rows if r.get("status") != "ok"]
    if not failed:
        return ["No failed runs."]
    table = [[labels[r["cell_id"]], r["seed"], r.get("status"), fmt(r["failed_at_step"], 0)
              if isinstance(r.get("failed_at_step"), (int, float)) else "—", _short(r.get("error"))] for r in failed]
    return [md_table(["cell", "seed", "status", "failed at step", "error"], table, numeric=False)]


def _short(text: Any, limit: int = 300) -> str:
    return clip(" ".join(str(text or "—").split()), limit)


def _counts(values: list[Any]) -> str:
    counts = Counter("—" if v is None else str(v) for v in values)
    if len(counts) == 1:
        return next(iter(counts))
    return "; ".join(f"{v} ({n} rows)" for v, n in counts.most_common())


def environment_section(rows: list[Row]) -> list[str]:
    """Where the numbers come from, with a WARNING when rows mix machines or library versions."""
    envs = [r["env"] for r in rows if isinstance(r.get("env"), dict)]
    if not envs:
        return ["No environment recorded in the rows."]
    lines = []
    for kind, fields in (("machines", MACHINE_FIELDS), ("library versions", LIBRARY_FIELDS)):
        mixed = [f"{f}: {_counts([e.get(f) for e in envs])}" for f in fields if len({str(e.get(f)) for e in envs}) > 1]
        if mixed:
            lines += [f"**WARNING: rows come from different {kind}; comparisons between them are not "
                      f"like for like.** " + " · ".join(mixed), ""]
    commits = [f"{str(e.get('git_commit'))[:12]}{' (dirty)' if e.get('git_dirty') else ''}" for e in envs]
    if len({c.split()[0] for c in commits}) > 1:
        lines += ["Note: rows come from different commits of the harness; timing code may have changed.", ""]
    table = [[f, _counts([e.get(f) for e in envs])] for f in ENV_FIELDS] + [["git commit", _counts(commits)]]
    return lines + [md_table(["field", "value"], table, numeric=False)]


def machine_section(rows: list[Row], others: dict[str, list[Row]]) -> list[str]:
    """Which machine the tables come from, and the other machines whose rows the folder holds."""
    if not rows:
        return []
    key = machine.latest_machine(rows)
    lines = [f"Measured on machine `{key}`: {machine.describe(rows[-1].get('env'))}."]
    if others:
        table = [[f"`{k}`", machine.describe(r[-1].get("env")), _ok_failed(r)] for k, r in others.items()]
        lines += ["", f"**This folder also holds runs measured on {len(others)} other machine"
                  f"{'s' if len(others) > 1 else ''}: reported apart under \"Results on other machines\", "
                  "never pooled with these.**", "",
                  md_table(["machine", "what it is", "runs"], table, numeric=False)]
    return lines


def _ok_failed(rows: list[Row]) -> str:
    ok = sum(r.get("status") == "ok" for r in rows)
    return f"{ok} ok / {len(rows) - ok} failed"


def other_machines_section(others: dict[str, list[Row]], baseline_cell_id: Optional[str],
                           design: Optional[str]) -> list[str]:
    """The results tables of every other machine, each against its own baseline runs."""
    if not others:
        return []
    lines = ["## Results on other machines", ""]
    for key, rows in others.items():
        lines += [f"### Machine `{key}`", "", f"{machine.describe(rows[-1].get('env'))}; {_ok_failed(rows)}.", ""]
        try:
            stats = all_cell_stats(rows, baseline_cell_id)
        except ValueError:  # no run of the baseline cell on that machine
            lines += ["The baseline cell has no run on this machine: nothing to compare against.", ""]
            continue
        body = one_at_a_time_section(stats) if (design or infer_design(stats)) == "one_at_a_time" \
            else factorial_section(stats)
        lines += ["#" + line if line.startswith("### ") else line for line in body]
    return lines


MACHINE_FIELDS = ("hostname", "device_name")


LIBRARY_FIELDS = ("torch", "torchvision", "cuda", "harness_version")


ENV_FIELDS = ("device_name", "cpu_model", "torch", "torchvision", "cuda", "cudnn", "python", "harness_version")


def verdict_mark(comparison: Comparison) -> str:
    """``*`` when both gates pass; the too-few-runs note instead of any mark; else nothing."""
    if comparison.significant:
        return "*"
    return f" ({too_few_note(comparison.n_base, comparison.n_cell)})" if comparison.too_few else ""


def fmt_speedup(speedup: Comparison) -> str:
    """The ratio and its interval; no mark of its own (the speed call is on the median step)."""
    if not math.isfinite(speedup.ratio):
        return "—"
    return fmt_interval((speedup.ratio, speedup.low, speedup.high), "×", 2, False)
