"""A/A check of the report's significance marks: one config run R times, split into two "cells".

Both "cells" are the same config, so every mark between them is a false positive. The runs go
through the normal worker path (one process per run, ``bench.execution.runner.run_in_child``) one after
another; a disjoint comparison takes the next 2n runs and deals them out A, B, A, B, … as the
runner's round-robin deals seeds to cells, so slow drift of the machine lands on both sides.
Each comparison is judged with exactly the report's decision (:func:`bench.reports.stats.compare_runs`
on per-run median step times and on per-run throughput) and, on the same runs, with the former
pooled method (below) to show what it claimed. Rows are kept in ``OUT/cells.jsonl``: running the
same command again adds only the missing runs, then analyses all of them.

    trickbench aa --runs 90 --per-group 3
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from bench.config.matrix import Matrix
from bench.execution.children import run_in_child
from bench.execution.runner import exclusive
from bench.reports.stats import Row, clean, compare_runs, ran_under_load, run_step_ms
from bench.store.paths import check_out_dir
from bench.store.results import (
    MATRIX_FILE,
    ROWS_FILE,
    StoreError,
    append_row,
    end_torn_row,
    matrix_change,
    matrix_record,
    read_matrix_record,
    read_rows,
    write_atomic,
)
from bench.training.feasibility import load_runnable_matrix

# ~5 s per run on a 2-core CPU, most of it starting the interpreter and importing torch.
DEFAULT_MATRIX = """\
# A/A: one short config; `trickbench aa` runs its baseline cell once per seed.
name: aa
base: {model: tiny_cnn, dataset: digits, download: false, augment: none, image_size: 8,
       batch_size: 32, steps: 30, optimizer: {name: sgd, lr: 0.05}}
axes: {precision: [fp32]}
"""
DEFAULT_MATRIX_FILE = "aa_matrix.yaml"  # the default matrix, kept beside the rows it made


# --- the former method, kept only to be compared against --------------------------------------------

def pooled_step_verdict(base_rows: list[Row], cell_rows: list[Row], min_effect: float = 0.02,
                        alpha: float = 0.05) -> bool:
    """The marks reports used to print: Mann–Whitney U on every step time of every seed pooled,
    and the pooled median moved by ≥ ``min_effect``. Wrong because the steps of one run are not
    independent samples; kept here so the A/A check can show what it claims."""
    # lazy: scipy costs ~0.3 s and only the statistics need it
    from scipy import stats

    a, b = (clean(t for r in rows for t in (r.get("step_times_ms") or [])) for rows in (base_rows, cell_rows))
    if len(a) < 2 or len(b) < 2:
        return False
    effect = float(np.median(b)) / float(np.median(a)) - 1
    return bool(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue < alpha and abs(effect) >= min_effect)


def bootstrap_speedup_excludes_1(base_rows: list[Row], cell_rows: list[Row], resamples: int = 2000) -> bool:
    """The former speedup mark: a 95% percentile bootstrap of mean(throughput) ratios excludes 1."""
    a, b = (clean(r.get("throughput_samples_per_s") for r in rows) for rows in (base_rows, cell_rows))
    if len(a) < 2 or len(b) < 2:
        return False
    rng = np.random.default_rng(0)
    ratios = (b[rng.integers(0, len(b), (resamples, len(b)))].mean(axis=1)
              / a[rng.integers(0, len(a), (resamples, len(a)))].mean(axis=1))
    low, high = np.percentile(ratios, [2.5, 97.5])
    return not low <= 1.0 <= high


# --- analysis (a pure function of rows) ------------------------------------------------------------

MARKS = {"call": "the report's speed call: `*` on the median step (per-run medians, Welch on logs, ≥2%)",
         "interval": "(not a call) speedup interval excludes 1 (per-run throughput, Welch on logs)",
         "old_step": "former `*` on the median step: pooled step times, Mann–Whitney, ≥2%",
         "old_speedup": "former `*` on the speedup: bootstrap interval of 3 values excludes 1",
         "old_either": "either former mark"}

def judge(a: list[Row], b: list[Row]) -> dict[str, bool]:
    """What a report would claim between two groups of runs of the same config: its speed call,
    whether its speedup interval excludes 1 (shown, not called), and the former method's marks."""
    call = compare_runs([run_step_ms(r) for r in a], [run_step_ms(r) for r in b]).significant
    speedup = compare_runs([r.get("throughput_samples_per_s") for r in a], [r.get("throughput_samples_per_s") for r in b])
    old_step, old_speed = pooled_step_verdict(a, b), bootstrap_speedup_excludes_1(a, b)
    return {"call": call, "interval": speedup.low > 1 or speedup.high < 1,
            "old_step": old_step, "old_speedup": old_speed, "old_either": old_step or old_speed}


def disjoint_splits(n_runs: int, per_group: int) -> list[tuple[list[int], list[int]]]:
    """Consecutive blocks of 2n runs, dealt A, B, A, B like the runner's round-robin; no run reused."""
    blocks = range(0, n_runs - 2 * per_group + 1, 2 * per_group)
    return [(list(range(s, s + 2 * per_group, 2)), list(range(s + 1, s + 2 * per_group, 2))) for s in blocks]


def random_splits(n_runs: int, per_group: int, count: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """``count`` draws of 2n runs at random, halved at random. Runs are reused across draws, so
    the draws are NOT independent: a better point estimate than the few disjoint ones, no more."""
    rng = np.random.default_rng(seed)
    draws = [rng.choice(n_runs, 2 * per_group, replace=False).tolist() for _ in range(count)]
    return [(d[:per_group], d[per_group:]) for d in draws]


def rate(hits: int, total: int) -> dict[str, float]:
    """hits/total with its exact (Clopper–Pearson) 95% binomial interval."""
    # lazy: scipy costs ~0.3 s and only the statistics need it
    from scipy import stats

    if not total:
        return {"hits": 0, "total": 0, "rate": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    ci = stats.binomtest(hits, total).proportion_ci(0.95, method="exact")
    return {"hits": hits, "total": total, "rate": hits / total, "ci_low": float(ci.low), "ci_high": float(ci.high)}


def jackknife_se(pairs: list[tuple[list[int], list[int]]], hits: list[bool], n_runs: int) -> float:
    """Standard error of the random-split rate, by leaving out one run at a time (the rate is a
    U-statistic over runs, so its uncertainty comes from the runs, not from the number of draws)."""
    hits_array = np.asarray(hits, dtype=float)
    rates = []
    for run in range(n_runs):
        keep = np.asarray([run not in a and run not in b for a, b in pairs])
        if keep.any():
            rates.append(hits_array[keep].mean())
    if len(rates) < 2:
        return math.nan
    rates_array = np.asarray(rates)
    return float(math.sqrt((len(rates) - 1) / len(rates) * ((rates_array - rates_array.mean()) ** 2).sum()))


def analyse(rows: Iterable[Row], per_group: int, splits: int = 1000) -> dict[str, Any]:
    """False-positive rates of the current and the former marks over disjoint and random splits."""
    ok = sorted((r for r in rows if r.get("status") == "ok"), key=lambda r: r["seed"])
    result: dict[str, Any] = {"runs_ok": len(ok), "per_group": per_group,
                              "runs_under_load": sum(ran_under_load(r) is True for r in ok),
                              "runs_load_unknown": sum(ran_under_load(r) is None for r in ok)}
    for name, pairs in (("disjoint", disjoint_splits(len(ok), per_group)),
                        ("random", random_splits(len(ok), per_group, splits) if len(ok) >= 2 * per_group else [])):
        verdicts = [judge([ok[i] for i in a], [ok[i] for i in b]) for a, b in pairs]
        result[name] = {mark: rate(sum(v[mark] for v in verdicts), len(verdicts)) for mark in MARKS}
        if name == "random":
            for mark in MARKS:
                result[name][mark]["jackknife_se"] = jackknife_se(pairs, [v[mark] for v in verdicts], len(ok))
    steps = clean(run_step_ms(r) for r in ok)
    result["run_median_step_ms"] = {"min": float(steps.min()), "median": float(np.median(steps)),
                                    "max": float(steps.max())} if len(steps) else {}
    return result


def format_result(result: dict[str, Any]) -> str:
    """A markdown summary: one line per mark, disjoint (independent) and random (dependent) splits."""
    def cell(r: dict[str, float]) -> str:
        if not r["total"]:
            return "—"
        text = f"{r['hits']}/{r['total']} = {r['rate']:.1%}"
        if "jackknife_se" in r:
            return text + (f" ± {r['jackknife_se']:.1%}" if math.isfinite(r["jackknife_se"]) else "")
        return text + f" [{r['ci_low']:.1%}, {r['ci_high']:.1%}]"

    lines = [f"A/A: {result['runs_ok']} ok runs of one config, {result['per_group']} runs per group; "
             f"{result['runs_under_load']} runs flagged as under competing load, {result['runs_load_unknown']} "
             "without load data.", "",
             "| mark | disjoint comparisons (independent) | random splits (runs reused: not independent) |",
             "| :--- | ---: | ---: |"]
    lines += [f"| {label} | {cell(result['disjoint'][m])} | {cell(result['random'][m])} |"
              for m, label in MARKS.items()]
    spread = result["run_median_step_ms"]
    if spread:
        lines += ["", f"Per-run median step time: {spread['min']:.1f} to {spread['max']:.1f} ms "
                      f"(median {spread['median']:.1f}). Brackets: exact 95% binomial (Clopper–Pearson) interval. "
                      "Random splits share runs, so no binomial interval: ± = leave-one-run-out jackknife standard error."]
    return "\n".join(lines) + "\n"


# --- running ----------------------------------------------------------------------------------------

def load_aa_matrix(matrix_path: str | None, profile: str | None, out_dir: Path) -> Matrix:
    """The matrix whose baseline cell is run: the user's, or the default one (validated from a
    temporary copy, so nothing is written before every check has passed)."""
    if matrix_path:
        return load_runnable_matrix(matrix_path, profile=profile)
    with tempfile.TemporaryDirectory(prefix="trickbench-aa-") as folder:
        draft = Path(folder) / DEFAULT_MATRIX_FILE
        draft.write_text(DEFAULT_MATRIX)
        matrix = load_runnable_matrix(draft, profile=profile)
    return dataclasses.replace(matrix, file=str(out_dir / DEFAULT_MATRIX_FILE))


def aa_record(matrix: Matrix, out_dir: Path, runs: int) -> dict[str, Any]:
    """The matrix.json of an A/A folder: one cell, seeds 0..runs-1 and any recorded before (a rerun
    with fewer --runs analyses fewer, it does not forget rows). StoreError when the folder holds
    another matrix's results, which the A/A rows must not join (nor replace their matrix.json)."""
    cell = matrix.cells[0]
    recorded = read_matrix_record(out_dir)
    seeds = sorted({*range(runs), *(recorded["seeds"] if recorded else ())})
    current = matrix_record(dataclasses.replace(matrix, seeds=tuple(seeds), cells=(cell,)))
    where = f"--out {out_dir}: holds the results of another matrix"
    if recorded is not None and (change := matrix_change(recorded, current)):
        raise StoreError(f"{where} ({change}; recorded in {MATRIX_FILE}); choose another --out for the A/A runs")
    stray = {r["cell_id"] for r in read_rows(out_dir / ROWS_FILE, warn=False)} - {cell.cell_id}
    if stray:
        raise StoreError(f"{where} ({len(stray)} other cells in {ROWS_FILE}); choose another --out for the A/A runs")
    return current


def run_aa(matrix: Matrix, out_dir: Path, runs: int) -> list[Row]:
    """Run the matrix's baseline cell with seeds 0..runs−1, each in its own process; resumable."""

    cell = matrix.cells[0]
    rows_path = out_dir / ROWS_FILE
    with exclusive(out_dir), tempfile.TemporaryDirectory(prefix="trickbench-aa-") as work:
        # One cell, one seed per run: recorded so that `report`/`index` read the folder like any other.
        write_atomic(out_dir / MATRIX_FILE, json.dumps(aa_record(matrix, out_dir, runs), indent=1))
        if Path(matrix.file) == out_dir / DEFAULT_MATRIX_FILE:
            write_atomic(out_dir / DEFAULT_MATRIX_FILE, DEFAULT_MATRIX)  # what ran, beside its rows
        end_torn_row(rows_path)
        done = {r["seed"] for r in read_rows(rows_path) if r["cell_id"] == cell.cell_id}
        for seed in (s for s in range(runs) if s not in done):
            row = run_in_child(matrix, cell, seed, Path(work))
            append_row(rows_path, row)
            load = [row.get(f"load_avg_1m_{when}") for when in ("start", "end")]
            print(f"[{seed + 1:>3}/{runs}] {row['status']}: median step {run_step_ms(row) or math.nan:.2f} ms, "
                  f"load {' → '.join('—' if v is None else f'{v:.2f}' for v in load)}", flush=True)
        return [r for r in read_rows(rows_path) if r["cell_id"] == cell.cell_id and r["seed"] < runs]


def cmd_aa(args: argparse.Namespace) -> int:
    if args.runs < 2 * args.per_group:
        print(f"error: --runs {args.runs}: needs at least 2 × --per-group = {2 * args.per_group} runs for "
              "one comparison", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    check_out_dir(out_dir)
    matrix = load_aa_matrix(args.matrix, args.profile, out_dir)
    aa_record(matrix, out_dir, args.runs)  # another matrix's folder is refused before anything is written
    rows = run_aa(matrix, out_dir, args.runs)
    result = analyse(rows, args.per_group, args.splits)
    result.update(matrix=matrix.file, profile=args.profile, runs_requested=args.runs)
    write_atomic(out_dir / "aa.json", json.dumps(result, indent=2))
    text = format_result(result)
    write_atomic(out_dir / "aa.md", text)
    print(text, end="")
    return 0
