"""The results store: ``cells.jsonl`` (append-only, one row per finished run) and ``results.csv``."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

ROWS_FILE = "cells.jsonl"
CSV_FILE = "results.csv"


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one row and make it durable before returning: a kill after this loses nothing."""
    line = json.dumps(row, default=str) + "\n"  # key order kept: axes read in the YAML's order
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def end_torn_row(path: Path) -> None:
    """Terminate a last line left unfinished by a kill, so the next row starts on its own line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())


def read_rows(path: Path, warn: bool = True) -> list[dict[str, Any]]:
    """Every complete row; a torn or corrupt line (a kill mid-write) is reported and skipped."""
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if warn:
                print(f"warning: {path}:{number}: incomplete row ignored (interrupted write)", file=sys.stderr)
    return rows


def to_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Rows flattened for pandas: nested dicts become dotted columns, lists stay JSON text."""
    frame = pd.json_normalize(list(rows), sep=".")
    for column in frame.columns:
        if frame[column].map(lambda v: isinstance(v, list)).any():
            frame[column] = frame[column].map(lambda v: json.dumps(v) if isinstance(v, list) else v)
    return frame


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    tmp = path.with_suffix(".csv.tmp")
    to_frame(rows).to_csv(tmp, index=False)
    tmp.replace(path)
