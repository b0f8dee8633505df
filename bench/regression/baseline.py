"""Baselines kept in a repository, and the commands around them.

``trickbench compare BASE NEW`` · ``trickbench baseline record MATRIX -o FILE`` ·
``trickbench baseline update FILE SOURCE`` · ``trickbench check MATRIX --baseline FILE``.

A baseline file holds, per cell, the exact counters, the run-level timing samples (one value
per seed) and the environment fingerprint: small JSON with a fixed key order, one value per
line where it varies, so that an update shows up in review as the few lines that moved.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from bench.base.errors import MAX_ERROR_CHARS, clip
from bench.config.matrix import load_matrix
from bench.execution.runner import run_matrix
from bench.regression import pytest_bench
from bench.regression.ab import cmd_against
from bench.regression.cells import BASELINE_FORMAT, BASELINE_FORMAT_VERSION, BadInput, CellRecord
from bench.regression.compare import (
    CELL,
    IMPROVED,
    METRICS,
    MISSING,
    NEW,
    NOT_COMPARABLE,
    REGRESSED,
    Policy,
    compare_cells,
    exit_code,
    stale_reason,
    to_json,
    to_markdown,
)
from bench.regression.instructions import METRIC, measure_cells
from bench.regression.sides import cells_from_baseline, load_side, read_baseline
from bench.store.files import StoreError, open_for_writing, write_atomic
from bench.store.paths import check_out_dir, check_out_file, check_out_files
from bench.training.feasibility import load_runnable_matrix

MOVED = (REGRESSED, IMPROVED, NEW, MISSING)  # verdicts that make `baseline update` rewrite a value


# ---- the file ----------------------------------------------------------------------------------

def _seed_order(seed: str) -> tuple[int, str]:
    return (int(seed), seed) if seed.lstrip("-").isdigit() else (0, seed)


def baseline_entry(cell: CellRecord) -> dict[str, Any]:
    """One cell of a baseline file. A value equal on every seed (a counter) is stored once."""
    seeds = sorted({s for values in cell.values.values() for s in values}, key=_seed_order)
    metrics: dict[str, Any] = {}
    for metric in METRICS:
        values = cell.values.get(metric.name)
        if not values:
            continue
        if set(values) == set(seeds) and len(set(values.values())) == 1:
            metrics[metric.name] = next(iter(values.values()))
        else:
            metrics[metric.name] = {s: values[s] for s in sorted(values, key=_seed_order)}
    entry = {"label": cell.label, "axes": cell.axes, "seeds": [int(s) if s.lstrip("-").isdigit() else s for s in seeds],
             "env": cell.env, "metrics": metrics}
    spreads = {name: cell.spreads[name] for name in metrics if name in cell.spreads}
    return {**entry, "spreads": spreads} if spreads else entry


def baseline_document(cells: dict[str, CellRecord], matrix: str, command: str) -> dict[str, Any]:
    return {"format": BASELINE_FORMAT, "format_version": BASELINE_FORMAT_VERSION, "matrix": matrix,
            "recorded_by": command, "cells": {cid: baseline_entry(c) for cid, c in cells.items()}}


def write_baseline(document: dict[str, Any], path: Path) -> None:
    """Whole or not at all, and never through a link (the file is committed to the repository)."""
    write_atomic(path, json.dumps(document, indent=2) + "\n")


def updated_document(document: dict[str, Any], base: dict[str, CellRecord], new: dict[str, CellRecord],
                     policy: Policy) -> tuple[dict[str, Any], list[str]]:
    """The baseline with only what moved beyond its margin rewritten; and a line per change.

    A cell whose environment no longer matches is re-recorded whole (its old numbers describe
    another machine); a new cell is added; a cell the new results lack is kept.
    """
    cells = dict(document["cells"])
    changes = []
    verdicts = compare_cells(base, new, policy)
    by_cell: dict[str, list] = {}
    for v in verdicts:
        by_cell.setdefault(v.cell_id, []).append(v)
    for cell_id, cell_verdicts in by_cell.items():
        if cell_id not in new or not new[cell_id].values:
            continue  # missing or failed now: keep what the baseline says
        fresh = baseline_entry(new[cell_id])
        if cell_id not in cells or any(v.verdict == NOT_COMPARABLE for v in cell_verdicts):
            cells[cell_id] = fresh
            changes.append(f"{cell_id} ({fresh['label']}): whole cell recorded")
            continue
        entry = json.loads(json.dumps(cells[cell_id]))
        for v in cell_verdicts:
            if v.verdict in MOVED and v.metric != CELL:
                if v.metric in fresh["metrics"]:
                    entry["metrics"][v.metric] = fresh["metrics"][v.metric]
                else:
                    entry["metrics"].pop(v.metric, None)
                if v.metric in fresh.get("spreads", {}):  # a count's margin moves with it
                    entry.setdefault("spreads", {})[v.metric] = fresh["spreads"][v.metric]
                entry["seeds"] = fresh["seeds"]
                changes.append(f"{cell_id} ({entry['label']}): {v.metric} {v.base or '-'} -> {v.new or '-'}")
        cells[cell_id] = entry
    return {**document, "cells": cells}, changes


# ---- running a matrix --------------------------------------------------------------------------

def run_into(matrix_path: str, profile: str | None, out: str | None) -> Path:
    """Run the matrix from scratch into ``out`` (default: a new temporary folder, kept)."""

    matrix = load_runnable_matrix(matrix_path, profile=profile)  # bad input stops us before any run
    if out:
        check_out_dir(Path(out))
    out_dir = Path(out) if out else Path(tempfile.mkdtemp(prefix=f"trickbench-{matrix.name}-"))
    print(f"{matrix.name}: {len(matrix.cells)} cells x {len(matrix.seeds)} seeds -> {out_dir}", flush=True)
    run_matrix(matrix, out_dir, fresh=True)  # a check measures this tree: no resumed rows
    return out_dir


def load_source(source: str, profile: str | None, out: str | None,
                instruction_repeats: int | None = None) -> tuple[dict[str, CellRecord], str]:
    """Results to judge: a results folder / cells.jsonl as is, or a matrix YAML run now (and,
    with ``instruction_repeats``, each cell's step counted under valgrind)."""
    if Path(source).suffix in (".yaml", ".yml"):
        out_dir = run_into(source, profile, out)
        cells = load_side(out_dir)
        if instruction_repeats:
            matrix = load_runnable_matrix(source, profile=profile)
            measure_cells(cells, {c.cell_id: c.config for c in matrix.cells}, matrix.seeds[0], instruction_repeats,
                          log=lambda line: print(line, file=sys.stderr, flush=True))
        return cells, str(out_dir)
    if instruction_repeats:
        raise BadInput(f"{source}: --instructions counts a matrix's steps: give the matrix YAML, not results")
    return load_side(source), source


def instruction_repeats(args: argparse.Namespace) -> int | None:
    return args.instruction_repeats if args.instructions else None


def without_instructions(cells: dict[str, CellRecord]) -> dict[str, CellRecord]:
    """A baseline's cells minus instruction counts, when this check does not measure them (so
    they are not reported missing, nor dropped by an update)."""

    for cell in cells.values():
        cell.values.pop(METRIC, None)
    return cells


# ---- commands ----------------------------------------------------------------------------------

def one_line_errors(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    @functools.wraps(command)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except BadInput as err:
            print(f"error: {clip(str(err), MAX_ERROR_CHARS)}", file=sys.stderr)
            return 2
    return wrapped


def _policy(args: argparse.Namespace) -> Policy:
    if not 1 < args.factor < math.inf:  # the argument type refuses it first; a direct call lands here
        raise BadInput(f"--factor: {args.factor:g} must be above 1 (e.g. 1.10)")
    return Policy(factor=args.factor, strict=args.strict)


def emit(verdicts: list, base_name: str, new_name: str, args: argparse.Namespace) -> int:
    """Markdown on stdout (and in the GitHub job summary when there is one), files on request:
    each written whole or not at all (their paths were checked before any work started)."""
    markdown = to_markdown(verdicts, base_name, new_name)
    print(markdown)
    if args.markdown:
        write_atomic(Path(args.markdown), markdown)
    if args.json:
        write_atomic(Path(args.json), to_json(verdicts, base_name, new_name) + "\n")
    if summary := os.environ.get("GITHUB_STEP_SUMMARY"):
        try:  # CI's page, not a result: a summary that cannot be written warns, the verdict stands
            fd = open_for_writing(Path(summary), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            with os.fdopen(fd, "a", encoding="utf-8") as f:
                f.write(markdown + "\n")
        except StoreError as err:
            print(f"warning: GITHUB_STEP_SUMMARY: {err}; job summary not written", file=sys.stderr)
    return exit_code(verdicts)


@one_line_errors
def cmd_compare(args: argparse.Namespace) -> int:
    check_out_files(markdown=args.markdown, json=args.json)
    policy = _policy(args)
    if args.against:
        return emit(*cmd_against(args, policy), args)  # SIGTERM: the CLI's one handler (bench.cli.main)
    if args.new is None:
        raise BadInput("compare needs BASE and NEW (or --against REV MATRIX)")
    if args.profile or args.out or args.runs_per_side:
        raise BadInput("--profile, --out and --runs-per-side go with --against REV MATRIX only")
    base, new = load_side(args.base), load_side(args.new)
    _check_pytest_benchmark_sides(base, new, args, policy)
    return emit(compare_cells(base, new, policy), args.base, args.new, args)


def _check_pytest_benchmark_sides(base: dict[str, CellRecord], new: dict[str, CellRecord],
                                  args: argparse.Namespace, policy: Policy) -> None:
    """Refuse pytest-benchmark results against trickbench's; say why a timing verdict is only ``~``."""

    kinds = [pytest_bench.is_kind(side) for side in (base, new)]
    if kinds[0] != kinds[1]:
        raise BadInput(f"{args.base if kinds[0] else args.new}: pytest-benchmark results compare only with "
                       "pytest-benchmark results, not with trickbench rows or baselines")
    if kinds[0] and min(map(pytest_bench.runs_per_side, (base, new))) < policy.min_runs:
        print(f"note: one pytest-benchmark JSON is one run (its rounds share one process); a timing verdict "
              f"needs {policy.min_runs} files a side: give a folder of them (e.g. .benchmarks/<machine>/)",
              file=sys.stderr)


def _refuse_pytest_benchmark(cells: dict[str, CellRecord], source: str, what: str) -> None:
    if pytest_bench.is_kind(cells):
        raise BadInput(f"{source}: pytest-benchmark results cannot be {what}: a trickbench baseline holds "
                       "trickbench rows (compare pytest-benchmark files with `trickbench compare A B`)")


@one_line_errors
def cmd_check(args: argparse.Namespace) -> int:
    check_out_files(markdown=args.markdown, json=args.json)
    policy = _policy(args)
    base = load_side(args.baseline)  # a missing or broken baseline stops us before any run
    _refuse_pytest_benchmark(base, args.baseline, "the baseline of a check")
    if not args.instructions:
        base = without_instructions(base)
    recorded_by = (read_baseline(args.baseline).get("recorded_by", "trickbench baseline record")
                   if Path(args.baseline).suffix == ".json" else "trickbench baseline record MATRIX -o FILE")
    new, new_name = load_source(args.matrix, args.profile, args.out, instruction_repeats(args))
    verdicts = compare_cells(base, new, policy)
    code = emit(verdicts, args.baseline, new_name, args)
    if reason := stale_reason(verdicts):
        print(f"error: {args.baseline}: no exact counter is comparable ({reason}); "
              f"re-record the baseline: {recorded_by}", file=sys.stderr)
        return 2
    if code:
        print(f"to accept these numbers: trickbench baseline update {args.baseline} {new_name}", file=sys.stderr)
    return code


@one_line_errors
def cmd_record(args: argparse.Namespace) -> int:
    check_out_file(args.output, "--output")
    if Path(args.matrix).suffix not in (".yaml", ".yml"):
        raise BadInput(f"{args.matrix}: expected a matrix YAML file")
    cells, source = load_source(args.matrix, args.profile, args.out, instruction_repeats(args))
    failed = [f"{cid}: {note}" for cid, c in cells.items() for note in c.failed]
    if failed:
        print(f"error: baseline not written: {len(failed)} runs failed ({failed[0]})", file=sys.stderr)
        return 1
    command = shlex.join(["trickbench", "baseline", "record", args.matrix, "-o", args.output]
                         + (["--profile", args.profile] if args.profile else [])
                         + (["--instructions", "--instruction-repeats", str(args.instruction_repeats)]
                            if args.instructions else []))

    matrix_name = load_matrix(args.matrix, profile=args.profile).name
    write_baseline(baseline_document(cells, matrix_name, command), Path(args.output))
    print(f"baseline of {len(cells)} cells written to {args.output} (from {source})")
    return 0


def refuse_fewer_seeds(document: dict[str, Any], seeds: dict[str, set[str]], path: Path, source: str) -> None:
    """``baseline update`` refuses new results that lack a seed the baseline holds for a cell:
    rewriting from fewer seeds would silently drop the others' values (a cell missing from the
    new results is kept whole, as before). ``seeds``: cell_id → the seeds the new side ran (ok)."""
    for cell_id, entry in document["cells"].items():
        if cell_id not in seeds:
            continue
        lost = [str(s) for s in entry["seeds"] if str(s) not in seeds[cell_id]]
        if lost:
            raise BadInput(f"{clip(source, 80)}: cell {clip(cell_id, 40)} has no successful run of seeds "
                           f"{', '.join(lost[:5])}, which the baseline holds; updating from fewer seeds would drop "
                           "them (refused: the baseline is unchanged)")


@one_line_errors
def cmd_update(args: argparse.Namespace) -> int:
    policy = _policy(args)
    path = Path(args.baseline)
    if path.suffix != ".json":
        raise BadInput(f"{path}: expected a baseline .json file")
    document = read_baseline(path)  # refuses pytest-benchmark JSON: not a trickbench baseline
    check_out_file(path, "baseline FILE")  # rewritten in place at the end
    base = cells_from_baseline(document, str(path))
    if not args.instructions:
        base = without_instructions(base)
    if Path(args.source).suffix in (".yaml", ".yml"):  # before running it: would its seeds cover the baseline's?
        matrix = load_runnable_matrix(args.source, profile=args.profile)
        refuse_fewer_seeds(document, {c.cell_id: {str(s) for s in matrix.seeds} for c in matrix.cells}, path,
                           args.source)
    new, source = load_source(args.source, args.profile, args.out, instruction_repeats(args))
    _refuse_pytest_benchmark(new, args.source, "merged into a trickbench baseline")
    refuse_fewer_seeds(document, {cid: {s for v in c.values.values() for s in v} for cid, c in new.items()},
                       path, args.source)
    document, changes = updated_document(document, base, new, policy)
    for line in changes:
        print(f"  {line}")
    if changes:
        write_baseline(document, path)
    print(f"{len(changes)} entries rewritten in {path} (from {source})" if changes
          else f"{path}: nothing moved beyond its margin; unchanged")
    return 0
