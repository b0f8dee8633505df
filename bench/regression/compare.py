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
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bench.regression.cells import (
    FINGERPRINT,
    METRICS,
    MIXED,
    SAME_NUMERICS,
    CellRecord,
    Metric,
)
from bench.regression.instructions import margin
from bench.reports.stats import (  # the report's rules, shared
    ALPHA,
    CONFIDENCE,
    MIN_RUNS,
    welch,
)

PASS, REGRESSED, IMPROVED, NOISE = "PASS", "REGRESSED", "IMPROVED", "~"
NOT_COMPARABLE, NEW, MISSING = "NOT COMPARABLE", "NEW", "MISSING"
CELL = "(cell)"  # the metric name of a verdict about a whole cell (missing, new, failed)


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


def md_cell(text: object) -> str:
    """``text`` safe inside one cell of a markdown table: a ``|`` (e.g. in a pytest-benchmark
    name) would end the cell and shift every later column, a newline would end the row."""
    return " ".join(str(text).split("\n")).replace("\r", " ").replace("|", "\\|")


def md_code(text: str) -> str:
    """``text`` as inline code inside a table cell, even when it holds backticks."""
    fence = "``" if "`" in text else "`"
    return f"{fence}{' ' if fence == '``' else ''}{md_cell(text)}{' ' if fence == '``' else ''}{fence}"


def _table(verdicts: list[Verdict]) -> list[str]:
    lines = ["| cell | metric | tier | base | new | change | verdict | note |",
             "| :--- | :--- | :--- | ---: | ---: | ---: | :--- | :--- |"]
    for v in verdicts:
        verdict = f"**{v.verdict}** ✗" if v.fails else v.verdict
        lines.append(f"| {md_cell(v.label)} {md_code(v.cell_id)} | " + " | ".join(
            md_cell(x) for x in (v.metric, v.tier, v.base, v.new, v.change, verdict, v.note)) + " |")
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
