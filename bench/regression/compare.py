"""Regression verdicts: a baseline (results folder or baseline file) against new results.

Pure functions of rows; nothing here runs training. Cells are matched by ``cell_id`` (the hash
of the resolved config), never by row order. Each metric belongs to a tier with its own rule:

- ``exact``: counters that only change when the computation changes (FLOPs, tensor bytes,
  optimizer steps, the seeded training loss on CPU). Any move beyond the metric's tolerance
  fails, an unexplained improvement too (as in PyTorch's pr_time_benchmarks): the new value is
  printed so the baseline can be updated on purpose.
- ``timing``: run-level samples (one median per run/seed), never the steps of one run. A change
  needs both the ratio of medians beyond ``factor`` and Welch's t-test on the logs (p < alpha);
  with fewer than ``MIN_RUNS`` runs a side the verdict is ``~``. Warn-only unless ``strict``.
- ``instructions`` (opt-in, :mod:`bench.regression.instructions`): valgrind's instruction count of one
  training step; a move beyond the margin measured from repeated counts fails either way.
- ``accuracy``: regressed only when the Welch interval of the difference of means lies wholly
  below zero, i.e. the drop is outside what the seeds' spread explains.

Every tier needs the environment to match on its fingerprint keys, else ``NOT COMPARABLE``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from bench.store.results import MEMORY_CATEGORIES
from bench.reports.stats import ALPHA, CONFIDENCE, MIN_RUNS, ran_under_load, welch  # the report's rules, shared

PASS, REGRESSED, IMPROVED, NOISE = "PASS", "REGRESSED", "IMPROVED", "~"
NOT_COMPARABLE, NEW, MISSING = "NOT COMPARABLE", "NEW", "MISSING"
CELL = "(cell)"  # the metric name of a verdict about a whole cell (missing, new, failed)
MIXED = "<mixed>"  # a fingerprint value that differs between the runs of one cell
BASELINE_FORMAT = "trickbench-baseline"


@dataclass(frozen=True)
class Metric:
    """One judged quantity: ``name`` is its dotted path in a row; ``tolerance`` is relative
    (timing: the factor minus one); ``tolerance_across`` applies to exact metrics when the
    numerics differ (another CPU capability, or a GPU), e.g. a loss that is bit-exact only on
    the same instruction set."""

    name: str
    tier: str
    better: str  # "lower" or "higher"
    tolerance: float = 0.0
    tolerance_across: float | None = None


# The one list of judged metrics (memory_breakdown's parts come from the row schema).
METRICS: tuple[Metric, ...] = (
    Metric("flops_per_step", "exact", "lower"),
    Metric("peak_memory_bytes", "exact", "lower"),
    *(Metric(f"memory_breakdown.{part}", "exact", "lower") for part in MEMORY_CATEGORIES),
    Metric("steps", "exact", "lower"),  # optimizer steps of the run
    Metric("final_train_loss", "exact", "lower", 0.0, tolerance_across=1e-3),
    Metric("step_time_ms_median", "timing", "lower", 0.10),
    Metric("throughput_samples_per_s", "timing", "higher", 0.10),
    Metric("benchmark_median_s", "timing", "lower", 0.10),  # pytest-benchmark JSON (bench.regression.pytest_bench)
    Metric("accuracy_top1", "accuracy", "higher"),
    Metric("instructions_per_step", "instructions", "lower"),  # margin: bench.regression.instructions.margin
)
TIERS = ("exact", "timing", "accuracy", "instructions")

# Where the environment must match for a tier's numbers to mean the same thing. Timing needs
# the same machine (not the same hostname: CI runners are ephemeral); exact counters need the
# same torch and the same measurement schema; accuracy is judged against the seeds' spread.
# runtime/platform (Python, OS) come from pytest-benchmark's machine_info; rows lack them.
FINGERPRINT: dict[str, tuple[str, ...]] = {
    "exact": ("schema_version", "torch", "device"),
    "timing": ("schema_version", "torch", "device", "device_name", "cpu_model", "cpu_capability",
               "cpu_cores", "torch_threads", "runtime", "platform"),
    "accuracy": ("device",),
    # Counts change with the code that runs (torch, CPython, the kernels for this CPU) and the counter.
    "instructions": ("torch", "python", "cpu_model", "cpu_capability", "valgrind"),
}
SAME_NUMERICS = ("device_name", "cpu_capability")  # exact tier: bit-exact loss needs these too
ENV_KEYS = tuple(dict.fromkeys(k for keys in FINGERPRINT.values() for k in keys + SAME_NUMERICS))


class BadInput(Exception):
    """An input that cannot be compared: reported on one line, exit code 2."""


@dataclass
class CellRecord:
    """What a side knows about one cell: per metric, a value per seed (str keys, as in JSON)."""

    cell_id: str
    label: str
    axes: dict[str, Any]
    env: dict[str, Any]
    values: dict[str, dict[str, float]] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)  # "status seed=N: error" of failed runs
    spreads: dict[str, float] = field(default_factory=dict)  # metric → measured relative spread
    under_load: int = 0  # ok runs whose timing ran under competing load (bench.reports.stats.ran_under_load)
    shared_timing: int = 0  # ok runs that ran beside other runs on the same CPU (run --shared-timing)


@dataclass
class Policy:
    factor: float = 1.10
    strict: bool = False  # timing gates too (a dedicated machine)
    alpha: float = ALPHA
    min_runs: int = MIN_RUNS


@dataclass
class Verdict:
    cell_id: str
    label: str
    metric: str
    tier: str
    verdict: str
    base: str = ""
    new: str = ""
    change: str = ""
    fails: bool = False
    note: str = ""


# ---- reading the two sides -------------------------------------------------------------------

def lookup(row: dict[str, Any], dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _as_dict(row: Any) -> dict[str, Any]:
    if isinstance(row, dict):
        return row
    return row.to_dict() if hasattr(row, "to_dict") else asdict(row)


def cells_from_rows(rows: Iterable[Any], source: str = "<rows>") -> dict[str, CellRecord]:
    """Group rows by cell; ok runs give values, failed runs are listed; env fields of a cell's
    runs that disagree become ``MIXED`` (a folder resumed on another machine)."""
    cells: dict[str, CellRecord] = {}
    envs: dict[str, list[dict[str, Any]]] = {}
    for number, raw in enumerate(rows, 1):
        row = _as_dict(raw)
        if "cell_id" not in row or "seed" not in row:
            raise BadInput(f"{source}: row {number}: no 'cell_id'/'seed' (not a trickbench results row)")
        axes = row.get("axes") or {}
        cell = cells.setdefault(row["cell_id"], CellRecord(
            row["cell_id"], " ".join(f"{k}={json.dumps(v)}" for k, v in axes.items()) or row["cell_id"], axes, {}))
        if row.get("status") != "ok":
            cell.failed.append(f"{row.get('status')} seed={row['seed']}: {row.get('error')}")
            continue
        cell.under_load += bool(ran_under_load(row))
        cell.shared_timing += bool(row.get("shared_timing"))
        envs.setdefault(cell.cell_id, []).append({"schema_version": row.get("schema_version"),
                                                  **(row.get("env") or {})})
        for metric in METRICS:
            value = lookup(row, metric.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                cell.values.setdefault(metric.name, {})[str(row["seed"])] = value
    for cell_id, cell_envs in envs.items():
        cells[cell_id].env = {k: _common(e.get(k) for e in cell_envs) for k in ENV_KEYS
                              if any(k in e for e in cell_envs)}
    return cells


def _common(values: Iterable[Any]) -> Any:
    distinct = list(dict.fromkeys(json.dumps(v) for v in values))
    return json.loads(distinct[0]) if len(distinct) == 1 else MIXED


def cells_from_baseline(data: dict[str, Any], source: str) -> dict[str, CellRecord]:
    """A baseline file's cells; a scalar value stands for every recorded seed."""
    if not isinstance(data, dict) or data.get("format") != BASELINE_FORMAT:
        raise BadInput(f"{source}: format: not a trickbench baseline (expected '{BASELINE_FORMAT}')")
    if not isinstance(data.get("cells"), dict):
        raise BadInput(f"{source}: cells: missing or not a mapping of cell_id to entries")
    cells = {}
    for cell_id, entry in data["cells"].items():
        try:
            seeds = [str(s) for s in entry["seeds"]]
            values = {name: dict(v) if isinstance(v, dict) else {s: v for s in seeds}
                      for name, v in entry["metrics"].items()}
            cells[cell_id] = CellRecord(cell_id, entry.get("label", cell_id), entry.get("axes", {}),
                                        entry.get("env", {}), values, failed=list(entry.get("failed", [])),
                                        spreads={k: float(v) for k, v in entry.get("spreads", {}).items()})
        except (KeyError, TypeError, AttributeError) as err:
            raise BadInput(f"{source}: cells.{cell_id}: malformed entry ({type(err).__name__}: {err}); "
                           "needs seeds, metrics, env") from None
    return cells


def load_side(path: str | Path) -> dict[str, CellRecord]:
    """A results folder (its cells.jsonl), a cells.jsonl file, a baseline JSON file, or
    pytest-benchmark JSON: one file, or a folder of them (one file = one run)."""
    from bench.regression import pytest_bench
    from bench.store.results import ROWS_FILE, read_rows

    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such file or directory")
    if path.is_dir():
        if not (path / ROWS_FILE).exists():
            if (runs := pytest_bench.load_folder(path)) is not None:
                return runs
            raise BadInput(f"{path}: no {ROWS_FILE} and no pytest-benchmark JSON here (not a results folder)")
        path = path / ROWS_FILE
    if path.suffix == ".json":
        data = pytest_bench.read_json(path)
        if pytest_bench.is_pytest_benchmark(data):
            return pytest_bench.cells_from_runs([(str(path), data)])
        cells = cells_from_baseline(data, str(path))
    else:
        cells = cells_from_rows(one_machine(read_rows(path), path), str(path))
    if not cells:
        raise BadInput(f"{path}: no rows to compare")
    return cells


def one_machine(rows: list[dict[str, Any]], source: Path) -> list[dict[str, Any]]:
    """The rows of the machine that wrote the last row: a folder resumed on new hardware keeps the
    old machine's rows as reference data, and comparing pooled machines would compare nothing."""
    from bench.execution import machine

    found = machine.machines(rows)
    if len(found) <= 1:
        return rows
    latest = machine.latest_machine(rows)
    left = {key: text for key, text in found.items() if key != latest}
    print(f"warning: {source}: comparing the rows of machine {latest} ({found[latest]}); rows of "
          f"{len(left)} other machine(s) left out: {'; '.join(f'{k} ({t})' for k, t in left.items())}",
          file=sys.stderr)
    return machine.rows_of(rows, latest)


# ---- the rules -------------------------------------------------------------------------------

def env_difference(tier: str, base: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The fingerprint keys of ``tier`` on which the two environments differ, as 'key: a → b'."""
    return [f"{k}: {base.get(k)} → {new.get(k)}" for k in FINGERPRINT[tier]
            if base.get(k) != new.get(k) or MIXED in (base.get(k), new.get(k))]


def _fmt(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:.6g}"


def _worse(metric: Metric, base: float, new: float) -> bool:
    return new > base if metric.better == "lower" else new < base


def judge_exact(metric: Metric, base: dict[str, float], new: dict[str, float], same_numerics: bool) -> Verdict:
    """Seed by seed on the seeds both sides ran; any deviation beyond tolerance is a change."""
    seeds = sorted(set(base) & set(new), key=lambda s: (len(s), s))
    if not seeds:
        return Verdict("", "", metric.name, metric.tier, NOT_COMPARABLE, note="no seed in common")
    tolerance = metric.tolerance if same_numerics or metric.tolerance_across is None else metric.tolerance_across
    deviations = [(_relative(base[s], new[s]), s) for s in seeds]
    worst, seed = max(deviations)
    b, n = base[seed], new[seed]
    shown_b, shown_n = _fmt(b), _fmt(n)
    change = "0" if b == n else (f"{int(n - b):+,}" if float(b).is_integer() and float(n).is_integer()
                                 else f"{(n - b) / abs(b):+.3%}" if b else f"{n - b:+.3g}")
    if worst <= tolerance:
        return Verdict("", "", metric.name, metric.tier, PASS, shown_b, shown_n, change)
    where = f"seed {seed}: " if len(seeds) > 1 and len({base[s] for s in seeds}) > 1 else ""
    if _worse(metric, b, n):
        return Verdict("", "", metric.name, metric.tier, REGRESSED, shown_b, shown_n, change, True,
                       f"{where}the computation changed (tolerance {tolerance:g})")
    return Verdict("", "", metric.name, metric.tier, IMPROVED, shown_b, shown_n, change, True,
                   f"{where}unexplained improvement: if intended, update the baseline to {shown_n}")


def _relative(base: float, new: float) -> float:
    if base == new:
        return 0.0
    return abs(new - base) / abs(base) if base else math.inf


def log_welch_p(base: list[float], new: list[float]) -> float:
    """Two-sided Welch t-test on log values (a test of the ratio). With three runs a side a
    two-sided Mann–Whitney test cannot reach p < 0.1, so it could never flag anything."""
    return welch(np.log(base), np.log(new))[3]


def judge_timing(metric: Metric, base: dict[str, float], new: dict[str, float], policy: Policy) -> Verdict:
    """Both gates: ratio of run-level medians beyond the factor AND Welch on logs significant."""
    b, n = [v for v in base.values() if v > 0], [v for v in new.values() if v > 0]
    shown = (_fmt(statistics.median(b)) if b else "", _fmt(statistics.median(n)) if n else "")
    if len(b) < policy.min_runs or len(n) < policy.min_runs:
        return Verdict("", "", metric.name, metric.tier, NOISE, *shown,
                       note=f"{len(b)} vs {len(n)} runs; needs {policy.min_runs} a side")
    ratio = statistics.median(n) / statistics.median(b)
    slower = ratio if metric.better == "lower" else 1 / ratio  # > 1: worse
    p = log_welch_p(b, n)
    change = f"{ratio:.2f}×"
    if max(slower, 1 / slower) < policy.factor:
        return Verdict("", "", metric.name, metric.tier, PASS, *shown, change, note=f"p={p:.2g}")
    if p >= policy.alpha:
        return Verdict("", "", metric.name, metric.tier, NOISE, *shown, change,
                       note=f"beyond {policy.factor:g}× but p={p:.2g} ≥ {policy.alpha:g}")
    if slower > 1:
        return Verdict("", "", metric.name, metric.tier, REGRESSED, *shown, change, policy.strict,
                       f"p={p:.2g}" + ("" if policy.strict else "; warning only (shared machine; --strict gates)"))
    return Verdict("", "", metric.name, metric.tier, IMPROVED, *shown, change, note=f"p={p:.2g}")


def welch_interval(base: list[float], new: list[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """mean(new) − mean(base) and its Welch t interval (:func:`bench.reports.stats.welch`); a point with no spread."""
    return welch(np.asarray(base, dtype=float), np.asarray(new, dtype=float), confidence)[:3]


def judge_accuracy(metric: Metric, base: dict[str, float], new: dict[str, float]) -> Verdict:
    b, n = list(base.values()), list(new.values())
    shown = (f"{statistics.fmean(b):.4g}", f"{statistics.fmean(n):.4g}")
    if len(b) < 2 or len(n) < 2:
        if b == n:
            return Verdict("", "", metric.name, metric.tier, PASS, *shown, "0")
        return Verdict("", "", metric.name, metric.tier, NOISE, *shown, note="one seed: no interval")
    diff, low, high = welch_interval(b, n)
    change = f"{diff:+.4g} [{low:+.3g}, {high:+.3g}]"
    worse_side = high < 0 if metric.better == "higher" else low > 0
    better_side = low > 0 if metric.better == "higher" else high < 0
    if worse_side:
        return Verdict("", "", metric.name, metric.tier, REGRESSED, *shown, change, True,
                       "drop outside the seeds' interval")
    if better_side:
        return Verdict("", "", metric.name, metric.tier, IMPROVED, *shown, change)
    return Verdict("", "", metric.name, metric.tier, PASS, *shown, change)


def judge_instructions(metric: Metric, base: dict[str, float], new: dict[str, float],
                       base_spread: float | None, new_spread: float | None) -> Verdict:
    """Medians of the counts; beyond the margin either way fails (an unexplained improvement
    too, as in the exact tier): on the same fingerprint, only a code change moves a count."""
    from bench.regression.instructions import margin

    b, n = statistics.median(base.values()), statistics.median(new.values())
    tolerance = margin(base_spread, new_spread)
    change = f"{(n - b) / b:+.3%}" if b else ""
    verdict = Verdict("", "", metric.name, metric.tier, PASS, _fmt(round(b)), _fmt(round(n)), change,
                      note=f"margin {tolerance:.2%}")
    if _relative(b, n) <= tolerance:
        return verdict
    verdict.fails = True
    if _worse(metric, b, n):
        verdict.verdict = REGRESSED
        verdict.note = f"beyond the margin {tolerance:.2%}"
    else:
        verdict.verdict = IMPROVED
        verdict.note = f"unexplained improvement beyond {tolerance:.2%}: if intended, update the baseline"
    return verdict


def judge_metric(metric: Metric, base: CellRecord, new: CellRecord, policy: Policy) -> Verdict | None:
    b, n = base.values.get(metric.name), new.values.get(metric.name)
    if not b and not n:
        return None  # neither side has it (e.g. accuracy on synthetic data)
    if not n:
        return Verdict("", "", metric.name, metric.tier, MISSING, fails=metric.tier == "exact",
                       note="the new rows lack this metric")
    if not b:
        return Verdict("", "", metric.name, metric.tier, NEW, new=_fmt(statistics.median(n.values())))
    differs = env_difference(metric.tier, base.env, new.env)
    if differs:
        return Verdict("", "", metric.name, metric.tier, NOT_COMPARABLE, note="; ".join(differs))
    if metric.tier == "exact":
        # The loss is bit-exact only with the same instruction set, on CPU.
        same = new.env.get("device") == "cpu" and all(
            base.env.get(k) == new.env.get(k) != MIXED for k in SAME_NUMERICS)
        return judge_exact(metric, b, n, same)
    if metric.tier == "timing":
        return loaded_timing(judge_timing(metric, b, n, policy), base, new)
    if metric.tier == "instructions":
        return judge_instructions(metric, b, n, base.spreads.get(metric.name), new.spreads.get(metric.name))
    return judge_accuracy(metric, b, n)


def loaded_timing(verdict: Verdict, base: CellRecord, new: CellRecord) -> Verdict:
    """A timing call from runs that shared the machine with other work says nothing about the
    code: such a REGRESSED/IMPROVED becomes NOT COMPARABLE (never a gate), with the count.
    Runs started side by side on purpose (``run --shared-timing``) are never compared at all."""
    sides = (("base", base), ("new", new))
    shared = [f"{cell.shared_timing} {side} runs" for side, cell in sides if cell.shared_timing]
    if shared:
        return dataclasses.replace(verdict, verdict=NOT_COMPARABLE, fails=False,
                                   note=f"timed beside other runs (--shared-timing): {', '.join(shared)}")
    loaded = [f"{cell.under_load} {side} runs" for side, cell in sides if cell.under_load]
    if not loaded:
        return verdict
    note = f"under competing load: {', '.join(loaded)}"
    if verdict.verdict in (REGRESSED, IMPROVED):
        return dataclasses.replace(verdict, verdict=NOT_COMPARABLE, fails=False, note=f"{note}; was {verdict.verdict}")
    return dataclasses.replace(verdict, note="; ".join(filter(None, (verdict.note, note))))


def compare_cells(base: dict[str, CellRecord], new: dict[str, CellRecord], policy: Policy | None = None) -> list[Verdict]:
    """Every (cell, metric) verdict, baseline cells first in their order, then new cells."""
    policy = policy or Policy()
    verdicts: list[Verdict] = []
    for cell_id in dict.fromkeys([*base, *new]):
        b, n = base.get(cell_id), new.get(cell_id)
        label = (b or n).label
        if n is None or not n.values:
            note = "; ".join(n.failed) if n else "not in the new results"
            verdicts.append(Verdict(cell_id, label, CELL, "", MISSING, fails=True, note=note))
            continue
        if b is None:
            verdicts.append(Verdict(cell_id, label, CELL, "", NEW, note="not in the baseline"))
            continue
        if n.failed and not b.failed:  # some seeds fail now: a run that diverges is a regression
            verdicts.append(Verdict(cell_id, label, CELL, "", MISSING, fails=True, note="; ".join(n.failed)))
        for metric in METRICS:
            verdict = judge_metric(metric, b, n, policy)
            if verdict is not None:
                verdict.cell_id, verdict.label = cell_id, label
                verdicts.append(verdict)
    return verdicts


def stale_reason(verdicts: list[Verdict]) -> str | None:
    """Why no exact counter could be compared at all (another torch, schema or device), if so:
    then a check would pass without gating anything, so the baseline must be re-recorded."""
    exact = [v for v in verdicts if v.tier == "exact"]
    if exact and all(v.verdict == NOT_COMPARABLE for v in exact):
        return exact[0].note
    return None


def exit_code(verdicts: list[Verdict]) -> int:
    return 1 if any(v.fails for v in verdicts) else 0


# ---- output ----------------------------------------------------------------------------------

def counts(verdicts: list[Verdict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in verdicts:
        out[v.verdict] = out.get(v.verdict, 0) + 1
    return out


def _table(verdicts: list[Verdict]) -> list[str]:
    lines = ["| cell | metric | tier | base | new | change | verdict | note |",
             "| :--- | :--- | :--- | ---: | ---: | ---: | :--- | :--- |"]
    for v in verdicts:
        verdict = f"**{v.verdict}** ✗" if v.fails else v.verdict
        note = v.note.replace("|", "\\|")
        lines.append(f"| {v.label} `{v.cell_id}` | {v.metric} | {v.tier} | {v.base} | {v.new} | {v.change} "
                     f"| {verdict} | {note} |")
    return lines


def to_markdown(verdicts: list[Verdict], base_name: str, new_name: str) -> str:
    """A job-summary table: every verdict that is not PASS, then all of them folded away."""
    failing = [v for v in verdicts if v.fails]
    title = "FAIL" if failing else "PASS"
    tally = ", ".join(f"{n} {k}" for k, n in sorted(counts(verdicts).items()))
    lines = [f"### trickbench compare: {title}", "",
             f"`{base_name}` → `{new_name}`: {tally}; {len(failing)} gated "
             f"({'a gated verdict fails the check' if failing else 'nothing fails the check'}).", ""]
    notable = [v for v in verdicts if v.verdict != PASS]
    lines += _table(notable) if notable else ["Every compared metric passed."]
    lines += ["", "<details><summary>all verdicts</summary>", "", *_table(verdicts), "", "</details>", ""]
    return "\n".join(lines)


def to_json(verdicts: list[Verdict], base_name: str, new_name: str) -> str:
    return json.dumps({"base": base_name, "new": new_name, "exit_code": exit_code(verdicts),
                       "counts": counts(verdicts), "verdicts": [asdict(v) for v in verdicts]}, indent=1)
