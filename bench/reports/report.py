"""Reports from stored rows: ``report.md``, PNG figures and an index of result folders.

Pure functions of ``cells.jsonl``: nothing here trains or measures, so a report can be rebuilt at
any time, also while a run is still appending rows. The numbers come from :mod:`bench.reports.stats`
(which also documents how the baseline is found); this module only formats and draws them. The
design is inferred from the rows: one_at_a_time when no cell differs from the baseline in more
than one axis, unless the folder's ``matrix.json`` records it (and the baseline, and which cells
belong to the matrix: rows of cells or seeds it does not list are left out). The newest row of a
(cell, seed) counts, so a failure retried with ``run --retry-failed`` is replaced by the retry.

Heavy libraries (pandas, matplotlib, seaborn, scipy) are imported where used: the CLI imports
this module for ``add_cli`` and every command would otherwise pay for them at start-up.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from bench.execution import machine
from bench.reports.figures import write_figures
from bench.store.results import (CSV_FILE, clip, MATRIX_FILE, ROWS_FILE, StoreError, latest_runs, print_warning,
                           read_matrix_record, read_rows, refuse_link, write_atomic, write_csv)
from bench.reports.stats import (LOAD_HEADROOM, MIN_EFFECT, MIN_RUNS, Comparison, Row, all_cell_stats, axis_key,
                         axis_values, excludes, infer_design, mean_where, ran_under_load, too_few_note)

REPORT_FILE = "report.md"
INFERRED = "inferred from the cells' axes"
FIGURES_DIR = "figures"
MACHINE_FIELDS = ("hostname", "device_name")
LIBRARY_FIELDS = ("torch", "torchvision", "cuda", "harness_version")
ENV_FIELDS = ("device_name", "cpu_model", "torch", "torchvision", "cuda", "cudnn", "python", "harness_version")


# --- markdown ------------------------------------------------------------------------------------------

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


# --- the report and the index --------------------------------------------------------------------------

@dataclass
class StoredResults:
    """What a report is built from: the standing rows of the recorded matrix, and its baseline.

    Rows of different machines are never pooled: ``rows`` are those of the machine that wrote the
    last row (the one being measured now), ``others`` the standing rows of each other machine."""

    rows: list[Row]  # the newest row of each (cell, seed), in the matrix's cell order when recorded
    all_rows: list[Row]  # every usable row of cells.jsonl (for results.csv)
    baseline_cell_id: Optional[str]  # None: no matrix.json, the first row's cell is the baseline
    design: Optional[str]  # None: inferred from the cells' axes
    machine: Optional[str] = None  # fingerprint of ``rows``' machine (bench.execution.machine); None without rows
    others: dict[str, list[Row]] = field(default_factory=dict)  # other machine → its standing rows


def split_by_machine(rows: list[Row], order: Optional[dict[str, int]] = None) -> tuple[Optional[str], dict[str, list[Row]]]:
    """(the latest machine, machine → its standing rows), each machine's rows apart, in cell order."""
    by_machine: dict[str, list[Row]] = {}
    for key in machine.machines(rows):
        standing = list(latest_runs(machine.rows_of(rows, key)).values())
        by_machine[key] = sorted(standing, key=lambda r: order[r["cell_id"]]) if order else standing
    return machine.latest_machine(rows), by_machine


def _stored(rows: list[Row], all_rows: list[Row], baseline: Optional[str], design: Optional[str],
            order: Optional[dict[str, int]] = None) -> StoredResults:
    latest, by_machine = split_by_machine(rows, order)
    mine = by_machine.pop(latest, []) if latest else []
    return StoredResults(mine, all_rows, baseline, design, latest, by_machine)


def load_results(out_dir: Path, warn: bool = True) -> StoredResults:
    """The rows of ``out_dir/cells.jsonl`` restricted to ``matrix.json``'s cells and seeds;
    FileNotFoundError naming the path when there are no rows."""
    path = Path(out_dir) / ROWS_FILE
    if not Path(out_dir).is_dir():
        raise FileNotFoundError(f"no results to report: {out_dir} is not a folder")
    if not path.is_file():
        what = "is not a regular file" if os.path.lexists(path) else "does not exist (run `trickbench run` first)"
        raise FileNotFoundError(f"no results to report: {path} {what}")
    rows = read_rows(path, warn=warn)
    try:
        record = read_matrix_record(out_dir)
    except StoreError as err:
        if warn:
            print_warning(f"{err}; reporting every row, baseline = the cell of the first row")
        return _stored(rows, rows, None, None)
    if record is None:
        if warn and rows:
            print_warning(f"{out_dir}: no {MATRIX_FILE} (results of an older trickbench): baseline = the "
                          "cell of the first row, design inferred")
        return _stored(rows, rows, None, None)
    order = {c["cell_id"]: i for i, c in enumerate(record["cells"])}
    seeds = set(record["seeds"])
    kept = [r for r in rows if r["cell_id"] in order and r["seed"] in seeds]
    if warn and len(kept) < len(rows):
        print_warning(f"{path}: {len(rows) - len(kept)} rows of cells or seeds not in {MATRIX_FILE} left out")
    return _stored(kept, rows, record["baseline_cell_id"], record["design"], order)


def load_rows(out_dir: Path) -> list[Row]:
    """The standing rows of ``out_dir`` (see :func:`load_results`)."""
    return load_results(out_dir).rows


def refuse_linked_figures(folder: Path) -> None:
    """StoreError if ``figures/`` or a file in it is a link: figures are written by matplotlib,
    which opens paths the ordinary way."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            raise StoreError(f"{folder} is not a folder (or is a symbolic link); remove it")
        for entry in os.scandir(folder):
            refuse_link(Path(entry.path))


def speed_call(s: Row) -> str:
    """The cell's speed call in words: faster/slower beyond noise, within noise, or no call."""
    call = s["step_verdict"]
    if timing_shared(s):
        return "speed not compared (shared timing)"
    if call.too_few:
        return f"speed: {too_few_note(call.n_base, call.n_cell)}"
    step = (f"step {'slower' if call.ratio > 1 else 'faster'} ({fmt_ratio(call.ratio)})" if call.significant
            else "step time within noise")
    # Throughput also counts the wait for data, which the step time leaves out: input-pipeline
    # tricks show there. Its interval is reported, not a second call.
    speedup = s["speedup"]
    if math.isfinite(speedup.low) and not excludes(speedup.low, speedup.high, 1.0):
        return f"{step}; throughput within noise ({fmt_ratio(speedup.ratio)})"
    return f"{step}; throughput {fmt_speedup(speedup)}" if math.isfinite(speedup.ratio) else step


def accuracy_call(s: Row) -> Optional[str]:
    """Δ top-1 in words, or None when the runs have no accuracy."""
    change, low, high = s["accuracy_change"]
    if not math.isfinite(change):
        return None
    if excludes(low, high, 0.0):
        return f"top-1 {'better' if change > 0 else 'worse'} by {abs(change):.1f} pts [{low:+.1f}, {high:+.1f}]"
    return f"top-1 within seed noise ({change:+.1f} pts, interval [{low:+.1f}, {high:+.1f}])"


def noise_section(stats: list[Row]) -> list[str]:
    """Per cell, in one line: which of its effects are beyond run-to-run (seed) noise and which are not.
    Memory is deterministic for a fixed config, so its ratio is stated without a test (≥ 1% counts)."""
    lines = []
    for s in stats:
        if s["is_base"] or not s["n_ok"]:
            continue
        memory = s["memory_ratio"]
        parts = [speed_call(s),
                 f"peak memory {fmt_ratio(memory)}" if math.isfinite(memory) and abs(memory - 1) >= 0.01
                 else "peak memory unchanged", accuracy_call(s)]
        lines.append(f"- {s['label']}: " + "; ".join(p for p in parts if p))
    if not lines:
        return []
    return ["## Beyond seed noise?", "",
            "Each cell against the baseline, with the tests of the tables above: step time, the `*` call; "
            "throughput (which also counts the wait for data), whether its 95% interval excludes 1; top-1, "
            "whether its 95% interval excludes 0.", "", *lines, ""]


def render_report(rows: list[Row], stats: list[Row], figures: list[str], notes: list[str],
                  design: Optional[str] = None, others: Optional[dict[str, list[Row]]] = None,
                  baseline_cell_id: Optional[str] = None) -> str:
    """The markdown text of a report; ``figures`` are file names under ``figures/``; ``design``
    as recorded in matrix.json (None: inferred, and the baseline is the first row's cell);
    ``others``: the standing rows of other machines, reported apart."""
    others = others or {}
    recorded = design is not None
    design = design or infer_design(stats)
    ok = sum(r.get("status") == "ok" for r in rows)
    matrices = ", ".join(dict.fromkeys(str(r.get("matrix")) for r in rows))
    base_axes = ", ".join(f"{k}={axis_key(v)}" for k, v in stats[0]["axes"].items())
    lines = [f"# Report: {matrices}", "",
             f"{len(rows)} runs ({ok} ok, {len(rows) - ok} failed) of {len(stats)} cells × "
             f"{len({r['seed'] for r in rows})} seeds; design {design} "
             f"({'from matrix.json' if recorded else INFERRED}).", "",
             f"Baseline: {'the first cell of the matrix' if recorded else 'the cell of the first row written'} "
             f"({base_axes}); other cells are named by the axis values in which they differ from it.", "",
             *machine_section(rows, others), ""]
    if not stats[0]["n_ok"]:
        lines += ["**The baseline has no successful run: no comparisons are possible.**", ""]
    lines += ["## Environment", "", *environment_section(rows), "", "## Results", "", LEGEND, "",
              *unstable_note(stats)]
    lines += one_at_a_time_section(stats) if design == "one_at_a_time" else factorial_section(stats)
    lines += scaling_section(stats)
    lines += noise_section(stats)
    lines += other_machines_section(others, baseline_cell_id or stats[0]["cell_id"], design)
    labels = {s["cell_id"]: s["label"] for s in stats}
    lines += ["## Runs under competing load", "", *load_section(rows, labels), ""]
    lines += ["## Failed runs", "", *failures_section(rows, labels), "", "## Figures", ""]
    lines += [f"![{name}](figures/{name})" for name in figures] + [""] + [f"- {note}" for note in notes]
    return "\n".join(lines).rstrip() + "\n"


def build_report(out_dir: Path) -> Path:
    """Read ``out_dir/cells.jsonl``; write ``report.md``, ``figures/*.png`` and ``results.csv``."""
    out_dir = Path(out_dir)
    results = load_results(out_dir)
    report = out_dir / REPORT_FILE
    for path in (report, out_dir / CSV_FILE):
        refuse_link(path)
    refuse_linked_figures(out_dir / FIGURES_DIR)
    if not results.rows:
        write_atomic(report, "# Report\n\nNo complete rows in cells.jsonl yet.\n")
        return report
    stats = all_cell_stats(results.rows, results.baseline_cell_id)
    figures, notes = write_figures(stats, results.design or infer_design(stats), out_dir / FIGURES_DIR)
    write_atomic(report, render_report(results.rows, stats, figures, notes, results.design, results.others,
                                       results.baseline_cell_id))
    write_csv(results.all_rows, out_dir / CSV_FILE)
    return report


def _finite_or(x: float, default: float) -> float:
    return x if math.isfinite(x) else default


def headline_findings(stats: list[Row]) -> list[str]:
    """Two to four one-line findings: the fastest, slowest, lowest-memory and most accurate cell."""
    ok = [s for s in stats if s["n_ok"]]
    if not ok:
        return ["no successful runs"]

    def versus(s: Row) -> str:
        call = s["step_verdict"]
        pace = (" (shared timing: not compared)" if timing_shared(s) else
                f" ({too_few_note(call.n_base, call.n_cell)})" if call.too_few else " (within noise)"
                if not call.significant else " (slower)" if call.ratio > 1 else " (faster)")
        return f"{fmt(s['speedup'].ratio, 2)}× throughput{pace}, {fmt(s['memory_ratio'], 2)}× peak memory vs baseline"

    fastest = max(ok, key=lambda s: _finite_or(s["throughput"]["mean"], -math.inf))
    slowest = min(ok, key=lambda s: _finite_or(s["throughput"]["mean"], math.inf))
    smallest = min(ok, key=lambda s: _finite_or(s["peak_mib"], math.inf))
    found = [f"fastest: {fastest['label']}, {fmt(fastest['throughput']['mean'])} samples/s",
             f"slowest: {slowest['label']}, {fmt(slowest['throughput']['mean'])} samples/s",
             f"lowest peak memory: {smallest['label']}, {fmt(smallest['peak_mib'])} MiB"]
    found = [line + ("" if s["is_base"] else f" ({versus(s)})") for line, s in zip(found, (fastest, slowest, smallest))]
    with_accuracy = [s for s in ok if math.isfinite(s["accuracy"]["mean"])]
    if with_accuracy:
        best = max(with_accuracy, key=lambda s: s["accuracy"]["mean"])
        change, low, high = best["accuracy_change"]
        noise = "" if excludes(low, high, 0.0) else " (within noise)"
        change = "" if best["is_base"] else f", {change:+.1f} pts vs baseline{noise}"
        found.append(f"best top-1: {best['label']}, {best['accuracy']['mean']:.1f}%{change}")
    return list(dict.fromkeys(found))


def write_index(results_dir: Path) -> Path:
    """``results_dir/README.md``: every folder holding a cells.jsonl, its counts, device and findings.

    A folder whose report is missing or older than its rows gets its report rebuilt first, so
    every link in the index points at a report of the current rows. A folder that cannot be
    read or reported is left out with a warning; the others are still indexed.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"no results folder: {results_dir} is not a folder")
    table, sections = [], []
    for rows_path in sorted(results_dir.rglob(ROWS_FILE)):
        try:
            row, section = index_entry(results_dir, rows_path)
        except (StoreError, OSError, ValueError) as err:
            print_warning(f"{rows_path.parent}: left out of the index: {err}")
            continue
        table.append(row)
        sections += section
    lines = ["# Results index", ""]
    if not table:
        lines.append("No results yet.")
    else:
        lines += [md_table(["matrix", "runs", "machine"], table, numeric=False), "", *sections]
    index = results_dir / "README.md"
    write_atomic(index, "\n".join(lines).rstrip() + "\n")
    return index


def index_entry(results_dir: Path, rows_path: Path) -> tuple[list[str], list[str]]:
    """One folder's line in the index table and its section of findings."""
    folder, report = rows_path.parent, rows_path.parent / REPORT_FILE
    stale = not report.exists() or report.stat().st_mtime < rows_path.stat().st_mtime
    if stale:
        build_report(folder)  # warns about skipped rows itself
    results = load_results(folder, warn=not stale)
    rows = results.rows
    link = report.relative_to(results_dir).as_posix()
    name = ", ".join(dict.fromkeys(str(r.get("matrix")) for r in rows)) or folder.name
    failed = Counter(r.get("status") for r in rows if r.get("status") != "ok")
    devices = f"`{results.machine}` {machine.describe(rows[-1].get('env'))}" if rows else "—"
    others = [f"`{key}` {machine.describe(r[-1].get('env'))}: {_ok_failed(r)}" for key, r in results.others.items()]
    row = [f"[{name}]({link})", f"{len(rows) - sum(failed.values())} ok / {sum(failed.values())} failed"
           + (f" ({', '.join(f'{k} {n}' for k, n in failed.items())})" if failed else ""),
           devices + (f" (+ {len(others)} other machine{'s' if len(others) > 1 else ''}, reported apart)"
                      if others else "")]
    findings = headline_findings(all_cell_stats(rows, results.baseline_cell_id)) if rows else ["no rows yet"]
    also = [f"Also in this folder, not pooled with the findings above (see the report): {'; '.join(others)}.", ""] \
        if others else []
    return row, [f"## [{name}]({link})", "", f"`{folder.relative_to(results_dir).as_posix() or '.'}` on {devices}",
                 "", *[f"- {f}" for f in findings], "", *also]


def _cmd_report(args: argparse.Namespace) -> int:
    print(build_report(Path(args.dir)))
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    print(write_index(Path(args.results_dir)))
    return 0


def add_cli(subparsers: Any) -> None:
    """Add ``report DIR`` and ``index RESULTS_DIR`` to the trickbench command line."""
    report = subparsers.add_parser("report", help="write DIR/report.md and DIR/figures/ from DIR/cells.jsonl")
    report.add_argument("dir", metavar="DIR", help="a run's output folder (holds cells.jsonl)")
    report.set_defaults(func=_cmd_report)
    index = subparsers.add_parser("index", help="write RESULTS_DIR/README.md indexing every run folder")
    index.add_argument("results_dir", metavar="RESULTS_DIR", help="folder whose subfolders hold cells.jsonl")
    index.set_defaults(func=_cmd_index)
