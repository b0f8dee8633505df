"""The numbers behind a report: intervals, significance gates, and per-cell aggregates of rows.

The first half is generic: functions of plain sequences of numbers (None and NaN dropped) that
return plain floats. The second half turns ``cells.jsonl`` rows into one summary per cell,
compared against the baseline cell, so that tables, figures and the index share one computation.

The unit of replication is the run (one seed, one process), never a step: step times inside
one run share the process, its memory layout and whatever else the machine was doing at the
time, so they are autocorrelated and tell little about the next run. Every test and interval
here therefore takes one number per run (its median step time, its throughput).

scipy is imported inside the functions that need it: it takes about a second to import, and the
CLI imports this module (through bench.reports.report) for every command.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from bench.store.results import MEMORY_PARTS

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE
MIN_EFFECT = 0.02  # the smallest relative change a mark may claim (gate 2)
MIN_RUNS = 3  # per group: below it a comparison says "too few runs to call" (validated by `trickbench aa`)
LOAD_HEADROOM = 1.25  # load average above this × the cores = competing load (see ran_under_load)
MIB = 2 ** 20
MEMORY_COMPONENTS = MEMORY_PARTS  # the parts of memory_breakdown, from the row schema
Row = dict[str, Any]


def clean(values: Iterable[float | None]) -> np.ndarray:
    """The finite numbers of ``values`` as a float array: failed seeds (None/NaN) carry no data."""
    array = np.asarray([np.nan if v is None else v for v in values], dtype=float)
    return array[np.isfinite(array)]


def summarize(values: Iterable[float | None], confidence: float = CONFIDENCE) -> dict[str, float]:
    """Mean, sample std and a Student-t confidence interval of the mean.

    With one value the spread is unknown, so std and the interval are NaN rather than zero:
    a single seed must not look like a perfectly reproducible measurement.
    """
    # lazy: scipy costs ~0.3 s and only the statistics need it
    from scipy import stats

    data = clean(values)
    n = len(data)
    mean = float(data.mean()) if n else math.nan
    if n < 2:
        return {"mean": mean, "std": math.nan, "n": n, "ci_low": math.nan, "ci_high": math.nan}
    std = float(data.std(ddof=1))
    if std == 0:  # scipy's interval is NaN without spread; the mean is then known exactly
        return {"mean": mean, "std": 0.0, "n": n, "ci_low": mean, "ci_high": mean}
    interval = stats.ttest_1samp(data, 0.0).confidence_interval(confidence)
    return {"mean": mean, "std": std, "n": n, "ci_low": float(interval.low), "ci_high": float(interval.high)}


def welch(a: np.ndarray, b: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """mean(b) − mean(a) with its Welch t interval and two-sided p-value: (diff, low, high, p).

    Welch, not Student: the two groups may have different spreads (a trick can make runs more
    or less variable). Needs two values per group; with no spread at all the interval is the
    point and p is 1 for equal means, 0 otherwise.
    """
    # lazy: scipy costs ~0.3 s and only the statistics need it
    from scipy import stats

    diff = float(b.mean() - a.mean())
    if a.var(ddof=1) == 0 and b.var(ddof=1) == 0:  # scipy gives NaN here; the difference is then exact
        return diff, diff, diff, 1.0 if diff == 0 else 0.0
    result = stats.ttest_ind(b, a, equal_var=False)
    interval = result.confidence_interval(confidence)
    return diff, float(interval.low), float(interval.high), float(result.pvalue)


def diff_ci(a_values: Iterable[float | None], b_values: Iterable[float | None],
            confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """mean(b) − mean(a) with a Welch t interval: (difference, low, high); NaN bounds below 2 values."""
    a, b = clean(a_values), clean(b_values)
    if not len(a) or not len(b):
        return math.nan, math.nan, math.nan
    if len(a) < 2 or len(b) < 2:
        return float(b.mean() - a.mean()), math.nan, math.nan
    return welch(a, b, confidence)[:3]


def excludes(low: float, high: float, value: float) -> bool:
    """True when the interval [low, high] is known and does not contain ``value``."""
    return math.isfinite(low) and math.isfinite(high) and not low <= value <= high


@dataclass(frozen=True)
class Comparison:
    """A cell against the baseline on one number per run: the ratio, its interval, and the verdict.

    ``ratio`` = geometric mean(cell) / geometric mean(baseline); ``low``/``high`` its interval (NaN
    when there are too few runs); ``significant`` only when both gates pass.
    """

    ratio: float
    low: float
    high: float
    p_value: float
    n_base: int
    n_cell: int
    significant: bool
    reason: str

    @property
    def effect(self) -> float:
        """Signed relative change, ratio − 1."""
        return self.ratio - 1

    @property
    def too_few(self) -> bool:
        return min(self.n_base, self.n_cell) < MIN_RUNS


def too_few_note(n_base: int, n_cell: int) -> str:
    return f"n={min(n_base, n_cell)}: too few runs to call"


def compare_runs(baseline_runs: Iterable[float | None], cell_runs: Iterable[float | None],
                 min_effect: float = MIN_EFFECT, alpha: float = ALPHA, min_runs: int = MIN_RUNS) -> Comparison:
    """The report's decision: do two cells differ, judged from one positive number per run?

    Timings are multiplicative (a trick makes a step 1.3× slower, a busy machine slows every
    kernel by a factor), so the test runs on log values: Welch's t on log(per-run value) gives a
    p-value and, exponentiated, an interval for the ratio of geometric means. Small-n honest:
    with three runs per cell the t quantile has ~2–4 degrees of freedom and the interval is
    wide, as it should be (a bootstrap of three values is not). Two gates, as asv and criterion
    use: p < ``alpha`` AND |ratio − 1| ≥ ``min_effect``, because a real but tiny change is not
    worth a mark. Fewer than ``min_runs`` runs in either cell: no test, no interval, no mark.
    """
    a, b = clean(baseline_runs), clean(cell_runs)
    a, b = a[a > 0], b[b > 0]
    if not len(a) or not len(b):
        return Comparison(math.nan, math.nan, math.nan, math.nan, len(a), len(b), False, "no data")
    ratio = math.exp(float(np.log(b).mean() - np.log(a).mean()))
    if min(len(a), len(b)) < max(min_runs, 2):
        return Comparison(ratio, math.nan, math.nan, math.nan, len(a), len(b), False, too_few_note(len(a), len(b)))
    _, low, high, p_value = welch(np.log(a), np.log(b), 1 - alpha)
    effect = ratio - 1
    if not p_value < alpha:
        verdict, reason = False, f"p={p_value:.3g} ≥ {alpha:g}: no detectable difference"
    elif not abs(effect) >= min_effect:
        verdict, reason = False, f"|effect| {abs(effect):.1%} < {min_effect:.0%} minimum"
    else:
        verdict, reason = True, f"p={p_value:.3g} < {alpha:g} and |effect| {abs(effect):.1%} ≥ {min_effect:.0%}"
    return Comparison(ratio, math.exp(low), math.exp(high), p_value, len(a), len(b), verdict, reason)


def geometric_mean(values: Iterable[float | None]) -> float:
    # lazy: scipy costs ~0.3 s and only the statistics need it
    from scipy import stats

    data = clean(values)
    data = data[data > 0]
    return float(stats.gmean(data)) if len(data) else math.nan


def ran_under_load(row: Row, headroom: float = LOAD_HEADROOM) -> bool | None:
    """True when a run's timing ran under competing load; None when the row cannot tell (old rows).

    Rule: the 1-minute load average, at the start or at the end of the run, exceeds ``headroom``
    × the machine's cores. Why this and not a lower bar: the load average lags (a 60 s moving
    average), so at the start of a run it still holds the harness's own previous run, and at the
    end it holds this one. The harness alone keeps at most its thread count busy, and that is at
    most the core count (torch's default on CPU; about one thread per rank on GPU), so alone
    it never pushes the average above the cores; more means other work was runnable and had to
    share cores with the run. The 25% headroom absorbs what the average also counts besides
    runnable threads (the runner's parent process, daemons, tasks waiting on I/O). The limit of
    the rule: competition that fits in the cores the run leaves idle goes unflagged (e.g. one
    busy thread beside a CPU run on all cores), since the average cannot tell it apart from
    the harness's own previous run.
    """
    cores = (row.get("env") or {}).get("cpu_cores")
    loads = [row.get("load_avg_1m_start"), row.get("load_avg_1m_end")]
    loads = [x for x in loads if isinstance(x, (int, float)) and math.isfinite(x)]
    if not loads or not isinstance(cores, int) or cores < 1:
        return None
    return max(loads) > headroom * cores


# --- per-cell aggregates of rows ---------------------------------------------------------------------
# Baseline: the cell the caller names (the runner records it in matrix.json); without one, the cell
# of the first row written. The runner goes round-robin over the cells in matrix order and a
# matrix lists its baseline (every axis at its first value) first, so the first row is the
# baseline's first seed in both designs. Rows store ``axes`` with sorted keys: axes come out in
# alphabetical order, each axis's values in the order the cells first use them.

def axis_key(value: Any) -> str:
    """Axis values compared as JSON text: keeps false apart from 0, and makes null hashable."""
    return json.dumps(value, sort_keys=True)


def mean_or_nan(values: Iterable[float | None]) -> float:
    data = clean(values)
    return float(data.mean()) if len(data) else math.nan


def _values(rows: list[Row], key: str, scale: float = 1.0) -> list[float | None]:
    return [None if r.get(key) is None else r[key] * scale for r in rows]


def cell_label(axes: dict[str, Any], baseline: dict[str, Any]) -> str:
    """The axis values that differ from the baseline, e.g. ``precision="bf16"``; "baseline" if none."""
    changed = [f"{k}={axis_key(v)}" for k, v in axes.items() if axis_key(v) != axis_key(baseline.get(k))]
    return ", ".join(changed) or "baseline"


def group_cells(rows: list[Row], baseline_cell_id: str | None = None) -> list[Row]:
    """One entry per cell_id, the baseline first, the others in first-appearance order; ok and failed
    rows apart. ``baseline_cell_id`` None: the cell of the first row is the baseline."""
    ids = list(dict.fromkeys(r["cell_id"] for r in rows))
    base_id = ids[0] if baseline_cell_id is None else baseline_cell_id
    if base_id not in ids:
        raise ValueError(f"baseline cell {base_id!r} has no rows; cells with rows: {', '.join(ids)}")
    baseline = next(r["axes"] for r in rows if r["cell_id"] == base_id)
    cells: dict[str, Row] = {}
    for cell_id in [base_id] + [i for i in ids if i != base_id]:
        axes = next(r["axes"] for r in rows if r["cell_id"] == cell_id)
        cells[cell_id] = {"cell_id": cell_id, "axes": axes, "ok": [], "failed": [], "label": cell_label(axes, baseline)}
    for row in rows:
        cells[row["cell_id"]]["ok" if row.get("status") == "ok" else "failed"].append(row)
    return list(cells.values())


def run_step_ms(row: Row) -> float | None:
    """One run's median step time: the row's own median, else the median of its step times."""
    if row.get("step_time_ms_median") is not None:
        return row["step_time_ms_median"]
    steps = clean(row.get("step_times_ms") or [])
    return float(np.median(steps)) if len(steps) else None


def cell_stats(cell: Row, base: Row) -> Row:
    """Everything a report shows about one cell, compared against the baseline cell.

    Memory in MiB, accuracy in percent; summaries are :func:`summarize` dicts, speed comparisons
    :class:`Comparison` on one value per run, the accuracy change an (estimate, low, high) triple.
    A cell without ok rows gets NaN everywhere, never a zero.
    """
    ok, base_ok = cell["ok"], base["ok"]
    throughput = _values(ok, "throughput_samples_per_s")
    accuracy = _values(ok, "accuracy_top1", 100)
    peak = _values(ok, "peak_memory_bytes", 1 / MIB)
    run_steps = [run_step_ms(r) for r in ok]
    breakdowns = [r.get("memory_breakdown") or {} for r in ok]
    loads = [ran_under_load(r) for r in ok]
    base_peak = mean_or_nan(_values(base_ok, "peak_memory_bytes", 1 / MIB))
    return {
        "cell_id": cell["cell_id"], "label": cell["label"], "axes": cell["axes"], "is_base": cell is base,
        "n_ok": len(ok), "n_runs": len(ok) + len(cell["failed"]),
        "runs": [{"seed": r["seed"], "step_ms": s, "under_load": u} for r, s, u in zip(ok, run_steps, loads)],
        "n_under_load": sum(u is True for u in loads), "n_load_unknown": sum(u is None for u in loads),
        # runs timed beside other runs on purpose (run --shared-timing): their speed is not compared
        "n_shared_timing": sum(bool(r.get("shared_timing")) for r in ok),
        "shared_baseline": any(r.get("shared_timing") for r in base_ok),
        "throughput": summarize(throughput), "accuracy": summarize(accuracy),
        "step_ms": geometric_mean(run_steps),
        "peak_mib": mean_or_nan(peak), "loss": mean_or_nan(_values(ok, "final_train_loss")),
        "data_stall": mean_or_nan(_values(ok, "data_stall_fraction")),
        "breakdown": {c: mean_or_nan(b.get(c) for b in breakdowns) / MIB for c in MEMORY_COMPONENTS},
        "speedup": compare_runs(_values(base_ok, "throughput_samples_per_s"), throughput),
        "memory_ratio": mean_or_nan(peak) / base_peak if base_peak else math.nan,
        "accuracy_change": diff_ci(_values(base_ok, "accuracy_top1", 100), accuracy),
        "step_verdict": compare_runs([run_step_ms(r) for r in base_ok], run_steps),
        "curves": [dict(point, seed=r["seed"]) for r in ok for point in (r.get("curve") or [])],
    }


def all_cell_stats(rows: list[Row], baseline_cell_id: str | None = None) -> list[Row]:
    """:func:`cell_stats` of every cell, baseline first, with its :func:`scaling_efficiency`."""
    cells = group_cells(rows, baseline_cell_id)
    scaling = scaling_efficiency(rows)
    return [{**cell_stats(cell, cells[0]), "world_size": scaling.get(cell["cell_id"], (math.nan,) * 2)[0],
             "scaling_efficiency": scaling.get(cell["cell_id"], (math.nan,) * 2)[1]} for cell in cells]


def scaling_efficiency(rows: list[Row]) -> dict[str, tuple[int, float]]:
    """cell_id → (world size W, throughput(W) / (W × throughput(1))) of each cell whose config equals,
    world_size apart, that of a world_size 1 cell among the rows (which itself gets 1.0).

    Throughputs are means over the ok seeds. 1.0 = linear scaling; under ``batch_scaling: global``
    each rank also gets 1/W of the batch, so this mixes communication cost with the cost of
    smaller per-rank batches.
    """
    throughputs: dict[str, list[float | None]] = {}
    world: dict[str, int] = {}
    others: dict[str, str] = {}  # cell_id → its config minus world_size, as JSON text
    for row in rows:
        config = row.get("config") or {}
        world[row["cell_id"]] = config.get("world_size", 1)
        others[row["cell_id"]] = axis_key({k: v for k, v in config.items() if k != "world_size"})
        if row.get("status") == "ok":
            throughputs.setdefault(row["cell_id"], []).append(row.get("throughput_samples_per_s"))
    single = {others[c]: mean_or_nan(throughputs.get(c, [])) for c, w in world.items() if w == 1}
    scaled = {others[c] for c, w in world.items() if w > 1}
    return {c: (w, mean_or_nan(throughputs.get(c, [])) / (w * single[others[c]]))
            for c, w in world.items() if others[c] in single and others[c] in scaled}


def scalar(s: Row, field: str) -> float:
    """One number per cell: the mean of a summary, the estimate of a comparison, or the value."""
    value = s[field]
    if isinstance(value, Comparison):
        return value.ratio
    return value["mean"] if isinstance(value, dict) else value[0] if isinstance(value, tuple) else value


def mean_where(stats: list[Row], field: str, **axes: Any) -> float:
    """Mean of :func:`scalar` over the cells with the given axis values (a marginal mean)."""
    return mean_or_nan(scalar(s, field) for s in stats
                       if all(axis_key(s["axes"].get(a)) == axis_key(v) for a, v in axes.items()))


def axis_values(stats: list[Row]) -> dict[str, list[Any]]:
    """Each axis's distinct values in the order cells first use them (the baseline's value first)."""
    values: dict[str, dict[str, Any]] = {}
    for s in stats:
        for axis, value in s["axes"].items():
            values.setdefault(axis, {}).setdefault(axis_key(value), value)
    return {axis: list(v.values()) for axis, v in values.items()}


def infer_design(stats: list[Row]) -> str:
    """one_at_a_time when no cell differs from the baseline in more than one axis, else full_factorial."""
    base = stats[0]["axes"]
    most = max(sum(axis_key(v) != axis_key(base.get(k)) for k, v in s["axes"].items()) for s in stats)
    return "one_at_a_time" if most <= 1 else "full_factorial"


def pareto_front(memory: list[float], throughput: list[float]) -> list[int]:
    """Indices of the points no other point beats on both (less memory, more throughput), by memory."""
    finite = [i for i in range(len(memory)) if math.isfinite(memory[i]) and math.isfinite(throughput[i])]
    front, best = [], -math.inf
    for i in sorted(finite, key=lambda i: (memory[i], -throughput[i])):
        if throughput[i] > best:
            front.append(i)
            best = throughput[i]
    return front
