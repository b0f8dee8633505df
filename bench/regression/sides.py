"""Reading one side of a comparison: a results folder or cells.jsonl, a baseline JSON file, or
pytest-benchmark JSON (a file, or a folder of them: one file = one run), as one CellRecord per cell."""
from __future__ import annotations

import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable

from bench.base.errors import clip
from bench.execution import machine
from bench.regression import pytest_bench
from bench.regression.cells import (
    BASELINE_FORMAT,
    BASELINE_FORMAT_VERSION,
    ENV_KEYS,
    METRICS,
    BadInput,
    CellRecord,
    common_value,
    lookup,
)
from bench.reports.stats import cell_label, ran_under_load  # the report's rules, shared
from bench.store.files import read_json
from bench.store.results import ROWS_FILE, read_rows


def _as_dict(row: Any) -> dict[str, Any]:
    if isinstance(row, dict):
        return row
    return row.to_dict() if hasattr(row, "to_dict") else asdict(row)


def cells_from_rows(rows: Iterable[Any], source: str = "<rows>") -> dict[str, CellRecord]:
    """Group rows by cell; ok runs give values, failed runs are listed; env fields of a cell's
    runs that disagree become ``MIXED`` (a folder resumed on another machine). Labels read as in
    the report: the axis values that differ from the baseline, the cell of the first row."""
    cells: dict[str, CellRecord] = {}
    envs: dict[str, list[dict[str, Any]]] = {}
    baseline_axes: dict[str, Any] = {}
    for number, raw in enumerate(rows, 1):
        row = _as_dict(raw)
        if "cell_id" not in row or "seed" not in row:
            raise BadInput(f"{source}: row {number}: no 'cell_id'/'seed' (not a trickbench results row)")
        axes = row.get("axes") or {}
        baseline_axes = baseline_axes if cells else axes
        cell = cells.setdefault(row["cell_id"], CellRecord(
            row["cell_id"], cell_label(axes, baseline_axes) if axes else row["cell_id"], axes, {}))
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
        cells[cell_id].env = {k: common_value(e.get(k) for e in cell_envs) for k in ENV_KEYS
                              if any(k in e for e in cell_envs)}
    return cells


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _entry_problem(entry: Any) -> str | None:
    """Why one cell of a baseline file is malformed ("key: what is wrong"), or None."""
    if not isinstance(entry, dict):
        return f": expected a mapping with seeds, metrics and env, got {type(entry).__name__}"
    seeds = entry.get("seeds")
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, (int, str)) and not isinstance(s, bool)
                                                     for s in seeds) and len(set(map(str, seeds))) == len(seeds)):
        return ".seeds: expected a non-empty list of distinct seeds"
    for key, kind in (("metrics", dict), ("env", dict), ("axes", dict), ("spreads", dict), ("label", str),
                      ("failed", list)):
        if key in entry and not isinstance(entry[key], kind) or key in ("metrics", "env") and key not in entry:
            return f".{key}: missing or not a {'mapping' if kind is dict else kind.__name__}"
    judged = {m.name for m in METRICS}
    for name, value in entry["metrics"].items():
        if name not in judged:
            return f".metrics.{clip(name, 40)}: not a metric trickbench judges (e.g. {', '.join(sorted(judged)[:3])})"
        per_seed = value if isinstance(value, dict) else {"": value}
        if not per_seed or not all(_finite(v) for v in per_seed.values()):
            return f".metrics.{name}: expected a finite number or a mapping of seed to finite number"
        if isinstance(value, dict) and set(value) - set(map(str, seeds)):
            return f".metrics.{name}: values of seeds {sorted(set(value) - set(map(str, seeds)))[:3]} not in its seeds"
    for name, value in entry.get("spreads", {}).items():
        if name not in entry["metrics"] or not _finite(value) or value < 0:
            return f".spreads.{clip(name, 40)}: expected a finite spread >= 0 of one of its metrics"
    if not all(isinstance(note, str) for note in entry.get("failed", [])):
        return ".failed: expected a list of strings"
    return None


def cells_from_baseline(data: Any, source: str) -> dict[str, CellRecord]:
    """A baseline file's cells, its schema checked whole first; a scalar value stands for every recorded seed."""
    if not isinstance(data, dict) or data.get("format") != BASELINE_FORMAT:
        raise BadInput(f"{source}: format: not a trickbench baseline (expected '{BASELINE_FORMAT}')")
    version = data.get("format_version")
    if isinstance(version, bool) or version != BASELINE_FORMAT_VERSION:
        raise BadInput(f"{source}: format_version: {clip(repr(version), 40)} is not a version this trickbench "
                       f"reads ({BASELINE_FORMAT_VERSION}); record the baseline again with it")
    if not isinstance(data.get("cells"), dict) or not data["cells"]:
        raise BadInput(f"{source}: cells: missing, empty or not a mapping of cell_id to entries")
    for key in ("matrix", "recorded_by"):
        if key in data and not isinstance(data[key], str):
            raise BadInput(f"{source}: {key}: expected a string")
    cells = {}
    for cell_id, entry in data["cells"].items():
        if problem := _entry_problem(entry):
            raise BadInput(f"{source}: cells.{clip(cell_id, 40)}{problem}")
        seeds = [str(s) for s in entry["seeds"]]
        values = {name: dict(v) if isinstance(v, dict) else {s: v for s in seeds}
                  for name, v in entry["metrics"].items()}
        cells[cell_id] = CellRecord(cell_id, entry.get("label", cell_id), entry.get("axes", {}), entry["env"],
                                    values, failed=list(entry.get("failed", [])),
                                    spreads={k: float(v) for k, v in entry.get("spreads", {}).items()})
    return cells


def read_baseline(path: str | Path) -> dict[str, Any]:
    """A baseline file's JSON, read and checked whole (cells_from_baseline's schema)."""
    data = read_json(path, "trickbench baseline file")
    cells_from_baseline(data, str(path))
    return data


def load_side(path: str | Path) -> dict[str, CellRecord]:
    """A results folder (its cells.jsonl), a cells.jsonl file, a baseline JSON file, or
    pytest-benchmark JSON: one file, or a folder of them (one file = one run)."""

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
        data = read_json(path, "baseline or pytest-benchmark JSON file")
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

    found = machine.machines(rows)
    if len(found) <= 1:
        return rows
    latest = machine.latest_machine(rows)
    left = {key: text for key, text in found.items() if key != latest}
    print(f"warning: {source}: comparing the rows of machine {latest} ({found[latest]}); rows of "
          f"{len(left)} other machine(s) left out: {'; '.join(f'{k} ({t})' for k, t in left.items())}",
          file=sys.stderr)
    return machine.rows_of(rows, latest)
