"""The results store of one output folder, and the one owner of what a results row is.

- ``cells.jsonl``: append-only, one row per finished run (:class:`RunRecord`), fsynced.
- ``matrix.json``: the matrix the rows belong to (cells, seeds, design, baseline), written at run start.
- ``results.csv``: the rows flattened for pandas.

Nothing here writes through a symbolic link: the tool often runs as root on GPU boxes, and a
``cells.jsonl`` pointing at another file must not append to or truncate it. Reading is strict
about what a row is: junk (non-UTF-8, non-object JSON, an unknown schema, missing or mistyped
fields) is skipped with a warning naming ``file:line``, never averaged into a report.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from bench.base.errors import clip
from bench.store.files import (  # the one reader and writer (bench/store/files.py)
    StoreError,
    open_for_writing,
    parse_json,
    read_limited,
    write_atomic,
)
from bench.store.files import refuse_link as refuse_link  # re-exported: the runner checks its files with it

# The parts of a row's memory_breakdown (bench/training/memory.py): what each storage live at the peak is
# counted as, every storage in exactly one. Reports and `compare` take the list from here.
MEMORY_CATEGORIES = (
    "parameters",       # the model's parameters
    "buffers",          # the model's buffers (BatchNorm running statistics)
    "gradients",        # storages that are some parameter's .grad
    "optimizer_state",  # tensors in optimizer.state (momentum, Adam's moments)
    "trick_state",      # held or allocated by trick code: EMA copy, SAM's saved weights, DDP buckets
    "activations",      # allocated while a module's forward ran (incl. checkpoint recomputation)
    "other",            # the batch; temporaries of the loss, backward and the optimizer step
)
# A row's memory_breakdown: the ledger's categories at its peak, and what the allocator held beyond
# them (peak_memory_bytes - the ledger's peak: buffers a kernel allocates and frees inside one op,
# workspaces), so that the parts sum to peak_memory_bytes exactly.
MEMORY_PARTS = (*MEMORY_CATEGORIES, "untracked")
# Where a row's peak_memory_bytes comes from (bench/training/allocator.py): the CPU allocator's
# events replayed, CUDA's max_memory_allocated, or the ledger alone when neither could be read.
PEAK_MEMORY_SOURCES = ("cpu_allocator_events", "cuda_max_memory_allocated", "ledger")


ROWS_FILE = "cells.jsonl"
CSV_FILE = "results.csv"
MATRIX_FILE = "matrix.json"
LOCK_FILE = ".lock"
WORK_DIR = ".work"  # job files and rows of runs in progress; cleared at the start of every run

# 3: peak_memory_bytes is the allocator's (peak_memory_source), memory_breakdown has `untracked`.
# 2: the ledger's peak; memory_breakdown parts sum to it at one instant. 1: parts taken at
# different times. A change in what a measured field means is a new version: `compare` and
# `check` compare exact metrics only within one (bench/regression/cells.py FINGERPRINT).
# Older rows stay readable; anything else is skipped.
SCHEMA_VERSION = 3
READABLE_SCHEMA_VERSIONS = (1, 2, 3)
MAX_ROWS_BYTES = 4 << 30  # cells.jsonl is read whole; a matrix of 100,000 runs with curves stays far below
STATUSES = ("ok", "oom", "diverged", "error", "timeout")
Row = dict[str, Any]


# --- the row ------------------------------------------------------------------------------------------

def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def load_avg_1m() -> Optional[float]:
    """The 1-minute load average, to flag runs timed while the machine was busy; None if unknown."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


@dataclass
class RunRecord:
    """One run of one (cell, seed): what ran, how it ended and what it measured.

    The worker fills it for runs that finish or fail inside the child; the runner for a child
    that died or overran without writing one. ``metrics`` is what ``train()`` returned (empty for
    a failed run); the record's own fields win over a metric of the same name.
    """

    matrix: str
    cell_id: str
    seed: int
    axes: dict[str, Any]
    config: dict[str, Any]
    status: str = "ok"
    error: Optional[str] = None
    failed_at_step: Optional[int] = None
    metrics: dict[str, Any] = field(default_factory=dict)
    wall_time_s: Optional[float] = None
    load_avg_1m_start: Optional[float] = None
    load_avg_1m_end: Optional[float] = None
    started_at: Optional[str] = None
    finished_at: Optional[str] = None
    env: Optional[dict[str, Any]] = None

    @classmethod
    def for_job(cls, job: dict[str, Any]) -> "RunRecord":
        return cls(matrix=job["matrix"], cell_id=job["cell_id"], seed=job["seed"], axes=job["axes"],
                   config=job["config"])

    def start(self) -> None:
        self.started_at, self.load_avg_1m_start = _now(), load_avg_1m()

    def finish(self, wall_time_s: float) -> None:
        self.finished_at, self.load_avg_1m_end, self.wall_time_s = _now(), load_avg_1m(), wall_time_s

    def fail(self, status: str, error: str, failed_at_step: Optional[int] = None) -> "RunRecord":
        if status == "ok" or status not in STATUSES:
            raise ValueError(f"not a failure status: {status!r}")
        self.status, self.error, self.failed_at_step, self.metrics = status, error, failed_at_step, {}
        return self

    def to_row(self) -> Row:
        """The JSON row; key order kept in the file (axes read in the YAML's order)."""
        return {"schema_version": SCHEMA_VERSION, "matrix": self.matrix, "cell_id": self.cell_id,
                "seed": self.seed, "axes": self.axes, "config": self.config, "status": self.status,
                "error": self.error, "failed_at_step": self.failed_at_step, **self.metrics,
                "wall_time_s": self.wall_time_s, "load_avg_1m_start": self.load_avg_1m_start,
                "load_avg_1m_end": self.load_avg_1m_end, "started_at": self.started_at,
                "finished_at": self.finished_at, "env": self.env}


_NUMBER = (int, float)
_NONE = type(None)
# field → accepted types. Required in every row, then in ok rows, then checked only when present.
REQUIRED_FIELDS = {"schema_version": int, "matrix": str, "cell_id": str, "seed": int, "axes": dict,
                   "status": str}
REQUIRED_OK_FIELDS = {"throughput_samples_per_s": _NUMBER, "peak_memory_bytes": _NUMBER,
                      "step_time_ms_median": _NUMBER}
OPTIONAL_FIELDS = {"config": dict, "error": (str, _NONE), "failed_at_step": (int, _NONE),
                   "step_times_ms": list, "memory_breakdown": dict, "curve": list, "env": (dict, _NONE),
                   "accuracy_top1": (*_NUMBER, _NONE), "final_train_loss": (*_NUMBER, _NONE),
                   "wall_time_s": (*_NUMBER, _NONE), "load_avg_1m_start": (*_NUMBER, _NONE),
                   "load_avg_1m_end": (*_NUMBER, _NONE), "shared_timing": bool,
                   "peak_memory_source": str}


def _type_problem(row: Row, name: str, types: Any, required: bool) -> Optional[str]:
    if name not in row:
        return f"missing field {name!r}" if required else None
    value = row[name]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        return f"field {name!r} has type bool"
    if not isinstance(value, types):
        return f"field {name!r} has type {type(value).__name__}"
    return None


def row_problem(row: Any) -> Optional[str]:
    """Why ``row`` is not a usable results row, or None when it is."""
    if not isinstance(row, dict):
        return f"not a JSON object but {type(row).__name__}"
    version = row.get("schema_version")
    if isinstance(version, bool) or version not in READABLE_SCHEMA_VERSIONS:
        readable = ", ".join(map(str, READABLE_SCHEMA_VERSIONS))
        return f"unknown schema_version {clip(repr(version), 40)} (this trickbench reads {readable})"
    checks = [(REQUIRED_FIELDS, True), (OPTIONAL_FIELDS, False)]
    if row.get("status") == "ok":
        checks.insert(1, (REQUIRED_OK_FIELDS, True))
    for fields, required in checks:
        for name, types in fields.items():
            if problem := _type_problem(row, name, types, required):
                return problem
    if row["status"] not in STATUSES:
        return f"status {clip(repr(row['status']), 40)} is not one of {', '.join(STATUSES)}"
    return _content_problem(row)


def _is_number(value: Any) -> bool:
    return isinstance(value, _NUMBER) and not isinstance(value, bool)


def _content_problem(row: Row) -> Optional[str]:
    """Inside the containers a report computes with: lists of numbers, dicts of numbers."""
    if not all(_is_number(v) for v in row.get("step_times_ms") or []):
        return "field 'step_times_ms' holds a value that is not a number"
    if not all(isinstance(p, dict) for p in row.get("curve") or []):
        return "field 'curve' holds a point that is not an object"
    if not all(v is None or _is_number(v) for v in (row.get("memory_breakdown") or {}).values()):
        return "field 'memory_breakdown' holds a value that is not a number"
    if row.get("peak_memory_source", PEAK_MEMORY_SOURCES[0]) not in PEAK_MEMORY_SOURCES:
        return f"field 'peak_memory_source' is not one of {', '.join(PEAK_MEMORY_SOURCES)}"
    world_size = (row.get("config") or {}).get("world_size", 1)
    if not (isinstance(world_size, int) and not isinstance(world_size, bool)):
        return "field 'config.world_size' is not an integer"
    return None


def print_warning(message: str) -> None:
    print(f"warning: {clip(message, 300)}", file=sys.stderr)


def read_rows(path: Path, warn: bool = True) -> list[Row]:
    """Every usable row of a ``cells.jsonl``, in file order; every other line is skipped with a
    warning naming ``file:line``: a torn last line (a kill mid-write), bytes that are not UTF-8,
    JSON that is not a row. A missing file has no rows; a FIFO, a device or a folder is refused
    (StoreError) before it is opened."""
    if not os.path.lexists(path):
        return []
    data = read_limited(path, "results file (cells.jsonl)", MAX_ROWS_BYTES)
    rows = []
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        problem, row = _parse_line(raw, torn=number == len(lines))
        if problem is None:
            rows.append(row)
        elif warn:
            print_warning(f"{path}:{number}: {problem}; row skipped")
    return rows


def _parse_line(raw: bytes, torn: bool) -> tuple[Optional[str], Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8 text", None
    try:
        row = json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError, or an integer of too many digits
        return ("incomplete row (interrupted write)" if torn else "not valid JSON"), None
    return row_problem(row), row


def latest_runs(rows: Iterable[Row]) -> dict[tuple[str, int], Row]:
    """(cell_id, seed) → its latest row: a rerun of a failed run supersedes the failure."""
    return {(r["cell_id"], r["seed"]): r for r in rows}


# --- appending rows ------------------------------------------------------------------------------------

def append_row(path: Path, row: Row) -> None:
    """Append one row and make it durable before returning: a kill after this loses nothing."""
    line = json.dumps(row, default=str) + "\n"
    fd = open_for_writing(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with os.fdopen(fd, "wb") as f:
        f.write(line.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def end_torn_row(path: Path) -> None:
    """Terminate a last line left unfinished by a kill, so the next row starts on its own line."""
    if not os.path.lexists(path):
        return
    fd = open_for_writing(path, os.O_RDWR)
    with os.fdopen(fd, "rb+") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())


def to_frame(rows: Iterable[Row]):
    """Rows flattened for pandas: nested dicts become dotted columns, lists stay JSON text."""
    # lazy: pandas costs ~0.5 s and only the CSV/figures need it
    import pandas as pd

    frame = pd.json_normalize(list(rows), sep=".")
    for column in frame.columns:
        if frame[column].map(lambda v: isinstance(v, list)).any():
            frame[column] = frame[column].map(lambda v: json.dumps(v) if isinstance(v, list) else v)
    return frame


def write_csv(rows: list[Row], path: Path) -> None:
    write_atomic(path, to_frame(rows).to_csv(index=False))


# --- matrix.json ---------------------------------------------------------------------------------------

def matrix_record(matrix: Any) -> dict[str, Any]:
    """What ``matrix.json`` holds: enough to tell the rows that belong to this matrix and its baseline."""
    return {"schema_version": SCHEMA_VERSION, "name": matrix.name, "source_file": str(matrix.file),
            "design": matrix.design, "axes": {k: list(v) for k, v in matrix.axes.items()},
            "seeds": list(matrix.seeds), "baseline_cell_id": matrix.cells[0].cell_id,
            "cells": [{"cell_id": c.cell_id, "axes": c.axes} for c in matrix.cells]}


def read_matrix_record(out_dir: Path) -> Optional[dict[str, Any]]:
    """The recorded matrix of ``out_dir``; None when there is none; StoreError when it is unusable."""
    path = Path(out_dir) / MATRIX_FILE
    if not os.path.lexists(path):
        return None
    record = parse_json(read_limited(path, "matrix record"), path, "matrix record")
    problem = _matrix_record_problem(record)
    if problem:
        raise StoreError(f"{path}: {problem}")
    return record


def _matrix_record_problem(record: Any) -> Optional[str]:
    if not isinstance(record, dict):
        return "not a JSON object"
    version = record.get("schema_version")
    if isinstance(version, bool) or version not in READABLE_SCHEMA_VERSIONS:
        readable = ", ".join(map(str, READABLE_SCHEMA_VERSIONS))
        return f"unknown schema_version {clip(repr(version), 40)} (this trickbench reads {readable})"
    cells = record.get("cells")
    if not (isinstance(cells, list) and cells and all(
            isinstance(c, dict) and isinstance(c.get("cell_id"), str) and isinstance(c.get("axes"), dict)
            for c in cells)):
        return "'cells' is not a non-empty list of {cell_id, axes}"
    if record.get("baseline_cell_id") not in {c["cell_id"] for c in cells}:
        return "'baseline_cell_id' is not one of its cells"
    seeds = record.get("seeds")
    if not (isinstance(seeds, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        return "'seeds' is not a list of integers"
    if not isinstance(record.get("design"), str):
        return "'design' is not a string"
    return None


def matrix_change(recorded: dict[str, Any], current: dict[str, Any]) -> Optional[str]:
    """How ``current`` differs from the matrix the folder's rows were run for, or None when the
    rows still belong to it. Adding seeds is not a change: the same cells get more runs."""
    if recorded["design"] != current["design"]:
        return f"design {recorded['design']} → {current['design']}"
    before = [c["cell_id"] for c in recorded["cells"]]
    after = [c["cell_id"] for c in current["cells"]]
    if before != after:
        added, removed = len(set(after) - set(before)), len(set(before) - set(after))
        return f"cells changed ({added} added, {removed} removed{', reordered' if not added + removed else ''})"
    dropped = [s for s in recorded["seeds"] if s not in current["seeds"]]
    if dropped:
        return f"seeds {dropped} removed"
    return None
