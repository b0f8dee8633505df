"""The numbers behind a report: intervals, significance gates, and per-cell aggregates of rows.

The first half is generic: functions of plain sequences of numbers (None and NaN dropped) that
return plain floats. The second half turns ``cells.jsonl`` rows into one summary per cell,
compared against the baseline cell, so that tables, figures and the index share one computation.

scipy is imported inside the functions that need it: it takes about a second to import, and the
CLI imports this module (through bench.report) for every command.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
MIB = 2 ** 20
MEMORY_COMPONENTS = ("parameters", "gradients", "optimizer_state", "activations", "other", "buffers")
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
    from scipy import stats

    data = clean(values)
    n = len(data)
    mean = float(data.mean()) if n else math.nan
    if n < 2:
        return {"mean": mean, "std": math.nan, "n": n, "ci_low": math.nan, "ci_high": math.nan}
    std = float(data.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "n": n, "ci_low": mean - half, "ci_high": mean + half}


def ratio_ci(a_values: Iterable[float | None], b_values: Iterable[float | None],
             confidence: float = CONFIDENCE, resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float, float]:
    """mean(b) / mean(a) with a percentile-bootstrap interval: (ratio, low, high).

    Each group is resampled on its own (the seeds of two cells are independent runs). The
    generator is seeded, so a report rebuilt from the same rows prints the same interval. With
    fewer than two values in either group there is no spread to resample: the interval is NaN.
    """
    a, b = clean(a_values), clean(b_values)
    if not len(a) or not len(b):
        return math.nan, math.nan, math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = float(b.mean() / a.mean())
        if len(a) < 2 or len(b) < 2:
            return ratio, math.nan, math.nan
        rng = np.random.default_rng(0)
        a_means = a[rng.integers(0, len(a), size=(resamples, len(a)))].mean(axis=1)
        b_means = b[rng.integers(0, len(b), size=(resamples, len(b)))].mean(axis=1)
        ratios = b_means / a_means
    tail = (1 - confidence) / 2 * 100
    low, high = np.nanpercentile(ratios, [tail, 100 - tail])
    return ratio, float(low), float(high)


def diff_ci(a_values: Iterable[float | None], b_values: Iterable[float | None],
            confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """mean(b) − mean(a) with a Welch t interval: (difference, low, high).

    Welch rather than a bootstrap because with three seeds a bootstrap interval is far too
    narrow; the t interval widens honestly with few samples and unequal variances.
    """
    from scipy import stats

    a, b = clean(a_values), clean(b_values)
    if not len(a) or not len(b):
        return math.nan, math.nan, math.nan
    diff = float(b.mean() - a.mean())
    if len(a) < 2 or len(b) < 2:
        return diff, math.nan, math.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, diff, diff
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, dof)) * se
    return diff, diff - half, diff + half


def excludes(low: float, high: float, value: float) -> bool:
    """True when the interval [low, high] is known and does not contain ``value``."""
    return math.isfinite(low) and math.isfinite(high) and not low <= value <= high


@dataclass(frozen=True)
class Verdict:
    """Whether two sets of timings differ: both gates must pass for ``significant``.

    ``effect`` is the signed relative change of the median, median(cell)/median(baseline) − 1.
    """

    significant: bool
    p_value: float
    effect: float
    reason: str


def differs(baseline_samples: Iterable[float | None], cell_samples: Iterable[float | None],
            min_effect: float = 0.02, alpha: float = 0.05) -> Verdict:
    """Two gates, as asv and criterion use: a real difference AND one big enough to matter.

    Gate 1 is a two-sided Mann–Whitney U test on the raw samples (timings are skewed and
    heavy-tailed, so no normality is assumed). Gate 2 asks for a relative change of the median
    of at least ``min_effect``: with thousands of step times a 0.5% change is "significant"
    but is noise from the machine, not an effect of the trick.
    """
    from scipy import stats

    a, b = clean(baseline_samples), clean(cell_samples)
    if len(a) < 2 or len(b) < 2:
        return Verdict(False, math.nan, math.nan, "too few samples to test")
    base_median = float(np.median(a))
    effect = float(np.median(b)) / base_median - 1 if base_median else math.nan
    p_value = float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue)
    if not p_value < alpha:
        return Verdict(False, p_value, effect, f"p={p_value:.3g} ≥ {alpha:g}: no detectable difference")
    if not abs(effect) >= min_effect:
        return Verdict(False, p_value, effect, f"|effect| {abs(effect):.1%} < {min_effect:.0%} minimum")
    return Verdict(True, p_value, effect,
                   f"p={p_value:.3g} < {alpha:g} and |effect| {abs(effect):.1%} ≥ {min_effect:.0%}")


# --- per-cell aggregates of rows ---------------------------------------------------------------------
# Baseline: the cell of the first row written. The runner goes round-robin over the cells in
# matrix order and a matrix lists its baseline (every axis at its first value) first, so the first
# row is the baseline's first seed in both designs. Rows store ``axes`` with sorted keys: axes come
# out in alphabetical order, each axis's values in the order the cells first use them.

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
    """One entry per cell_id, baseline first, then in first-appearance order; ok and failed rows apart.

    The baseline is ``baseline_cell_id`` (from ``matrix.json``) when given and present in the rows,
    else the cell of the first row.
    """
    ids = [r["cell_id"] for r in rows]
    base_id = baseline_cell_id if baseline_cell_id in ids else rows[0]["cell_id"]
    baseline = rows[ids.index(base_id)]["axes"]
    cells: dict[str, Row] = {}
    for row in sorted(rows, key=lambda r: r["cell_id"] != base_id):  # stable: baseline's rows first
        cell = cells.setdefault(row["cell_id"], {"cell_id": row["cell_id"], "axes": row["axes"], "ok": [],
                                                 "failed": [], "label": cell_label(row["axes"], baseline)})
        cell["ok" if row.get("status") == "ok" else "failed"].append(row)
    return list(cells.values())


def pooled_steps(ok_rows: list[Row]) -> np.ndarray:
    """Every timed step of every seed: the raw samples the significance test needs."""
    return clean(t for r in ok_rows for t in (r.get("step_times_ms") or []))


def cell_stats(cell: Row, base: Row) -> Row:
    """Everything a report shows about one cell, compared against the baseline cell.

    Memory in MiB, accuracy in percent; summaries are :func:`summarize` dicts and comparisons
    (estimate, low, high) triples. A cell without ok rows gets NaN everywhere, never a zero.
    """
    ok, base_ok = cell["ok"], base["ok"]
    throughput = _values(ok, "throughput_samples_per_s")
    accuracy = _values(ok, "accuracy_top1", 100)
    peak = _values(ok, "peak_memory_bytes", 1 / MIB)
    steps = pooled_steps(ok)
    breakdowns = [r.get("memory_breakdown") or {} for r in ok]
    return {
        "cell_id": cell["cell_id"], "label": cell["label"], "axes": cell["axes"], "is_base": cell is base,
        "n_ok": len(ok), "n_runs": len(ok) + len(cell["failed"]), "steps": steps,
        "throughput": summarize(throughput), "accuracy": summarize(accuracy),
        "step_ms": float(np.median(steps)) if len(steps) else mean_or_nan(_values(ok, "step_time_ms_median")),
        "peak_mib": mean_or_nan(peak), "loss": mean_or_nan(_values(ok, "final_train_loss")),
        "breakdown": {c: mean_or_nan(b.get(c) for b in breakdowns) / MIB for c in MEMORY_COMPONENTS},
        "speedup": ratio_ci(_values(base_ok, "throughput_samples_per_s"), throughput),
        "memory_ratio": ratio_ci(_values(base_ok, "peak_memory_bytes", 1 / MIB), peak)[0],
        "accuracy_change": diff_ci(_values(base_ok, "accuracy_top1", 100), accuracy),
        "step_verdict": differs(pooled_steps(base_ok), steps),
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
