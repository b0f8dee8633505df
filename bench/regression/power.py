"""How the timing tier of ``trickbench compare`` behaves on real runs: false alarms and power.

Input: A/A rows, many runs of ONE config, each in its own process (``trickbench aa`` writes
them). Every comparison between two groups of those runs is judged with exactly the timing rule
of :func:`bench.regression.compare.judge_timing` (ratio of run medians beyond the factor AND Welch on logs),
so every REGRESSED or IMPROVED is a false alarm. Then group B's per-run values are made slower by
a known factor (step time × (1 + δ), throughput ÷ (1 + δ)) and the share of comparisons that say
REGRESSED is the tier's power at that slowdown.

Groups, in run (time) order:
- ``after``: consecutive blocks of 2n runs, the first n against the next n: a baseline recorded
  earlier against new runs later, as ``trickbench check`` compares them. Disjoint: independent.
- ``interleaved``: the same blocks dealt A, B, A, B, as ``compare --against`` runs them. Disjoint.
- ``random``: many random draws of 2n runs. Runs are reused, so the draws are NOT independent;
  ± is a leave-one-run-out jackknife standard error, not a binomial interval.

    trickbench power results/aa
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable

from bench.base.errors import MAX_ERROR_CHARS, clip
from bench.regression.aa import disjoint_splits, jackknife_se, random_splits, rate
from bench.regression.cells import BadInput
from bench.regression.compare import IMPROVED, METRICS, REGRESSED, Policy, judge_timing
from bench.reports.stats import Row
from bench.store.files import write_atomic
from bench.store.paths import check_out_files
from bench.store.results import ROWS_FILE, read_rows

TIMING = {m.name: m for m in METRICS if m.tier == "timing"}
SLOWDOWNS = (0.05, 0.10, 0.15, 0.20, 0.30, 0.50)
SplitList = list[tuple[list[int], list[int]]]


def after_splits(n_runs: int, per_group: int) -> SplitList:
    """Consecutive blocks of 2n runs: runs [s, s+n) against [s+n, s+2n); no run reused."""
    return [(list(range(s, s + per_group)), list(range(s + per_group, s + 2 * per_group)))
            for s in range(0, n_runs - 2 * per_group + 1, 2 * per_group)]


def slowed(metric: str, value: float, slowdown: float) -> float:
    """``value`` of a run made (1 + slowdown) times slower: more time per step, fewer samples/s."""
    return value * (1 + slowdown) if TIMING[metric].better == "lower" else value / (1 + slowdown)


def verdict(metric: str, values: list[float], split: tuple[list[int], list[int]], policy: Policy,
            slowdown: float = 0.0) -> str:
    """The timing tier's verdict on group A against group B slowed by ``slowdown``."""
    a, b = split
    base = {str(i): values[i] for i in a}
    new = {str(i): slowed(metric, values[i], slowdown) for i in b}
    return judge_timing(TIMING[metric], base, new, policy).verdict


def run_values(rows: Iterable[Row], metric: str) -> list[float]:
    """One value per ok run, in seed order (``trickbench aa`` runs seed after seed: time order)."""
    ok = sorted((r for r in rows if r.get("status") == "ok"), key=lambda r: r["seed"])
    cells = {r["cell_id"] for r in ok}
    if len(cells) > 1:
        raise BadInput(f"rows of {len(cells)} cells; A/A needs runs of one config (trickbench aa writes them)")
    values = [r.get(metric) for r in ok]
    return [float(v) for v in values if isinstance(v, (int, float)) and v > 0]


def timing_power(rows: list[Row], per_groups: Iterable[int] = (3, 5), slowdowns: Iterable[float] = SLOWDOWNS,
                 splits: int = 1000, policy: Policy | None = None, seed: int = 0) -> dict[str, Any]:
    """False alarms and detection rates of the timing tier on A/A runs, per metric and group size.

    Returns ``{"runs": R, "policy": {...}, "metrics": {metric: {n: {"false_alarms": {design: rate},
    "detected": {slowdown: rate}}}}}``; a rate is :func:`bench.regression.aa.rate`'s dict (random draws add
    ``jackknife_se``). Detection counts REGRESSED only, on the random draws.
    """
    policy = policy or Policy()
    out: dict[str, Any] = {"policy": {"factor": policy.factor, "alpha": policy.alpha, "min_runs": policy.min_runs},
                           "splits": splits, "metrics": {}}
    for metric in TIMING:
        values = run_values(rows, metric)
        if not values:
            continue  # e.g. benchmark_median_s: pytest-benchmark's, not in rows
        out["runs"] = len(values)
        by_n: dict[str, Any] = {}
        for n in per_groups:
            if len(values) < 2 * n:
                continue
            designs = {"after": after_splits(len(values), n), "interleaved": disjoint_splits(len(values), n),
                       "random": random_splits(len(values), n, splits, seed)}
            alarms = {name: _rate(pairs, [verdict(metric, values, p, policy) in (REGRESSED, IMPROVED)
                                          for p in pairs], len(values), name == "random")
                      for name, pairs in designs.items()}
            detected = {f"{d:g}": _rate(designs["random"], [verdict(metric, values, p, policy, d) == REGRESSED
                                                             for p in designs["random"]], len(values), True)
                        for d in slowdowns}
            by_n[str(n)] = {"false_alarms": alarms, "detected": detected}
        out["metrics"][metric] = by_n
    return out


def _rate(pairs: SplitList, hits: list[bool], n_runs: int, dependent: bool) -> dict[str, float]:
    result = rate(sum(hits), len(hits))
    if dependent:
        result["jackknife_se"] = jackknife_se(pairs, hits, n_runs)
    return result


def smallest_detected(detected: dict[str, dict[str, float]], at_least: float = 0.9) -> str | None:
    """The smallest slowdown detected in ≥ ``at_least`` of the draws, as its key (e.g. "0.2")."""
    hits = [d for d, r in detected.items() if r["total"] and r["rate"] >= at_least]
    return min(hits, key=float) if hits else None


def format_power(result: dict[str, Any]) -> str:
    """Markdown: a false-alarm table and a detection table, per metric and group size."""
    def cell(r: dict[str, float]) -> str:
        if not r["total"]:
            return "—"
        if "jackknife_se" in r:
            return f"{r['rate']:.0%} ± {r['jackknife_se']:.0%}"
        return f"{r['hits']}/{r['total']} [{r['ci_low']:.0%}, {r['ci_high']:.0%}]"

    policy = result["policy"]
    lines = [f"Timing tier (factor {policy['factor']:g}, Welch on logs p < {policy['alpha']:g}, "
             f"≥ {policy['min_runs']} runs a side) on {result['runs']} A/A runs; random: "
             f"{result['splits']} draws (dependent).", "",
             "| metric | runs a side | false alarms: after (disjoint) | interleaved (disjoint) | random |",
             "| :--- | ---: | ---: | ---: | ---: |"]
    for metric, by_n in result["metrics"].items():
        lines += [f"| {metric} | {n} | {cell(r['false_alarms']['after'])} | {cell(r['false_alarms']['interleaved'])} "
                  f"| {cell(r['false_alarms']['random'])} |" for n, r in by_n.items()]
    slowdowns = next((list(r["detected"]) for by_n in result["metrics"].values() for r in by_n.values()), [])
    lines += ["", "| metric | runs a side | " + " | ".join(f"+{float(d):.0%}" for d in slowdowns)
              + " | smallest ≥ 90% |", "| :--- | ---: |" + " ---: |" * (len(slowdowns) + 1)]
    for metric, by_n in result["metrics"].items():
        for n, r in by_n.items():
            smallest = smallest_detected(r["detected"])
            lines.append(f"| {metric} | {n} | " + " | ".join(cell(r["detected"][d]) for d in slowdowns)
                         + f" | {'none' if smallest is None else f'+{float(smallest):.0%}'} |")
    lines += ["", "Detection: share of random draws judged REGRESSED after slowing group B by the column's "
                  "amount. [..]: exact 95% binomial interval; ±: leave-one-run-out jackknife SE."]
    return "\n".join(lines) + "\n"


def cmd_power(args: argparse.Namespace) -> int:
    check_out_files(json=args.json)  # before any work: a late write failure must not turn the result into exit 2
    path = Path(args.results)
    path = path / ROWS_FILE if path.is_dir() else path
    try:
        if not os.path.lexists(path):
            raise BadInput(f"{path}: no such file (expected an A/A results folder, e.g. results/aa)")
        if not 1 < args.factor < math.inf:
            raise BadInput(f"--factor: {args.factor:g} must be above 1 (e.g. 1.10)")
        if not all(0 < s < math.inf for s in args.slowdowns):
            raise BadInput(f"--slowdowns: {args.slowdowns} must all be above 0 (0.1 = 10% slower)")
        rows = read_rows(path)  # refuses a FIFO, a device or a folder
        result = timing_power(rows, args.per_group, args.slowdowns, args.splits, Policy(factor=args.factor))
        if result.get("runs", 0) < 2 * min(args.per_group):
            raise BadInput(f"{path}: {result.get('runs', 0)} ok runs; needs at least {2 * min(args.per_group)}")
    except BadInput as err:
        print(f"error: {clip(str(err), MAX_ERROR_CHARS)}", file=sys.stderr)
        return 2
    text = format_power(result)
    print(text, end="")
    if args.json:
        write_atomic(Path(args.json), json.dumps(result, indent=1) + "\n")
    return 0
