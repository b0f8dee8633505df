"""The results store under hostile conditions: junk rows, links planted in the folder, an edited
matrix, reruns after failures. Runs use tests/fake_worker.py (no training) where what a run
measures does not matter."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli.main import main
from bench.config.matrix import load_matrix
from bench.execution import children
from bench.reports.report import build_report, load_results, write_index
from bench.reports.stats import all_cell_stats
from bench.store.results import (
    SCHEMA_VERSION,
    RunRecord,
    append_row,
    matrix_record,
    read_rows,
    row_problem,
    write_atomic,
)
from tests.conftest import TINY_MATRIX
from tests.test_report import toy_rows

ROOT = Path(__file__).resolve().parents[1]
THREE_CELLS = TINY_MATRIX.replace("accumulation: [1, 2]", "accumulation: [1, 2, 4]")


@pytest.fixture
def fake_worker(monkeypatch):
    """Runs train nothing; FAKE_WORKER_FAIL=<cell ids> makes those cells fail."""
    monkeypatch.setattr(children, "WORKER", [sys.executable, str(ROOT / "tests" / "fake_worker.py")])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return monkeypatch


def good_row(cell_id="c", seed=0, **extra):
    row = RunRecord(matrix="m", cell_id=cell_id, seed=seed, axes={"a": 1}, config={"world_size": 1})
    row.metrics = {"throughput_samples_per_s": 10.0, "peak_memory_bytes": 1.0, "step_time_ms_median": 1.0}
    return {**row.to_row(), **extra}


# --- the row --------------------------------------------------------------------------------------------

def test_record_owns_the_row():
    record = RunRecord(matrix="m", cell_id="c", seed=3, axes={"a": 1}, config={})
    record.metrics = {"throughput_samples_per_s": 1.0, "wall_time_s": -1.0}
    record.start()
    record.finish(2.5)
    row = record.to_row()
    assert row["schema_version"] == SCHEMA_VERSION == 3
    assert row["wall_time_s"] == 2.5  # the record's field wins over a metric of the same name
    assert isinstance(row["load_avg_1m_start"], float) and isinstance(row["load_avg_1m_end"], float)
    assert row_problem(good_row()) is None
    record.fail("oom", "MemoryError")
    assert "throughput_samples_per_s" not in record.to_row() and record.to_row()["status"] == "oom"
    with pytest.raises(ValueError):
        record.fail("ok", "not a failure")


JUNK_LINES = {
    "unknown schema": json.dumps(good_row(schema_version=99)),
    "schema as text": json.dumps(good_row(schema_version="2")),
    "schema as bool": json.dumps(good_row(schema_version=True)),
    "no schema": json.dumps({k: v for k, v in good_row().items() if k != "schema_version"}),
    "a list": "[1, 2, 3]",
    "a string": '"row"',
    "a number": "42",
    "null": "null",
    "not JSON": "{cell_id: c}",
    "deep nesting": "[" * 100000 + "]" * 100000,
    "missing cell_id": json.dumps({k: v for k, v in good_row().items() if k != "cell_id"}),
    "missing status": json.dumps({k: v for k, v in good_row().items() if k != "status"}),
    "ok without throughput": json.dumps({k: v for k, v in good_row().items() if k != "throughput_samples_per_s"}),
    "seed as text": json.dumps(good_row(seed="0")),
    "seed as bool": json.dumps(good_row(seed=True)),
    "axes as list": json.dumps(good_row(axes=[1])),
    "unknown status": json.dumps(good_row(status="fine")),
    "throughput as text": json.dumps(good_row(throughput_samples_per_s="fast")),
    "step times as text": json.dumps(good_row(step_times_ms=["1.0"])),
    "curve of numbers": json.dumps(good_row(curve=[1, 2])),
    "breakdown of text": json.dumps(good_row(memory_breakdown={"activations": "1 MiB"})),
    "world_size as text": json.dumps(good_row(config={"world_size": "2"})),
    "env as list": json.dumps(good_row(env=["cpu"])),
    "unknown peak source": json.dumps(good_row(peak_memory_source="guessed")),
}


def test_rows_of_the_ledger_s_schema_stay_readable():
    """Version 2: the ledger's peak, no `untracked` part, no peak_memory_source."""
    old = good_row(schema_version=2, memory_breakdown={"activations": 1.0})
    assert row_problem(old) is None and row_problem(good_row(schema_version=1)) is None
    assert row_problem(good_row(peak_memory_source="cpu_allocator_events",
                                memory_breakdown={"activations": 0.75, "untracked": 0.25})) is None


@pytest.mark.parametrize("case", list(JUNK_LINES))
def test_junk_row_is_skipped_with_file_and_line(tmp_path, capsys, case):
    path = tmp_path / "cells.jsonl"
    path.write_text(json.dumps(good_row(seed=0)) + "\n" + JUNK_LINES[case] + "\n" + json.dumps(good_row(seed=1)) + "\n")
    rows = read_rows(path)
    assert [r["seed"] for r in rows] == [0, 1]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {path}:2: ") and len(err[0]) < 400


def test_binary_junk_and_torn_row(tmp_path, capsys):
    path = tmp_path / "cells.jsonl"
    path.write_bytes(json.dumps(good_row(seed=0)).encode() + b"\n\xff\xfe\x00\x81junk\n"
                     + json.dumps(good_row(seed=1)).encode() + b"\n" + b'{"cell_id": "c", "se')
    assert [r["seed"] for r in read_rows(path)] == [0, 1]
    err = capsys.readouterr().err
    assert f"{path}:2: not UTF-8 text" in err and f"{path}:4: incomplete row" in err


def write_rows(folder: Path, rows: list[dict], junk: list[str] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in rows] + list(junk)
    (folder / "cells.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_junk_rows_change_nothing_in_a_report(tmp_path, no_figures):
    clean = build_report(write_rows(tmp_path / "clean", toy_rows())).read_text()
    # A row of the same cell with an unknown schema, and one with a mistyped field: both far off.
    alien = {**toy_rows()[0], "schema_version": 7, "throughput_samples_per_s": 1e9, "seed": 9}
    mistyped = {**toy_rows()[0], "seed": "9", "throughput_samples_per_s": 1e9}
    junk = [json.dumps(alien), json.dumps(mistyped), "[]"]
    dirty = build_report(write_rows(tmp_path / "dirty", toy_rows(), junk)).read_text()
    assert dirty == clean


@pytest.fixture
def no_figures(monkeypatch):
    import bench.reports.report

    monkeypatch.setattr(bench.reports.report, "write_figures", lambda stats, design, folder: ([], []))


def test_report_and_index_on_non_utf8_file_exit_0_with_warnings(tmp_path):
    folder = write_rows(tmp_path / "a", toy_rows())
    with open(folder / "cells.jsonl", "ab") as f:
        f.write(b"\xc3\x28 not utf-8\n")
    for command in (["report", str(folder)], ["index", str(tmp_path)]):
        result = subprocess.run([sys.executable, "-m", "bench", *command], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr and "not UTF-8 text" in result.stderr


def test_one_bad_folder_does_not_abort_the_index(tmp_path, capsys, no_figures):
    write_rows(tmp_path / "good", toy_rows())
    (tmp_path / "dir_named_rows" / "cells.jsonl").mkdir(parents=True)  # a folder where the file should be
    linked = write_rows(tmp_path / "linked", toy_rows())
    outside = tmp_path / "outside.md"
    outside.write_text("precious")
    os.utime(outside, (0, 0))  # older than the rows: the index rebuilds the report, and must refuse
    (linked / "report.md").symlink_to(outside)
    text = write_index(tmp_path).read_text()
    assert "good/report.md" in text and "dir_named_rows" not in text and "linked/report.md" not in text
    err = capsys.readouterr().err
    assert "dir_named_rows: left out of the index" in err and "symbolic link" in err
    assert outside.read_text() == "precious"


# --- matrix.json, report restricted to the recorded matrix ----------------------------------------------

def record_for(rows, baseline, design="one_at_a_time"):
    cells = list(dict.fromkeys(r["cell_id"] for r in rows))
    cells.sort(key=lambda c: c != baseline)
    axes = {r["cell_id"]: r["axes"] for r in rows}
    return {"schema_version": 2, "name": "toy", "source_file": "toy.yaml", "design": design, "axes": {},
            "seeds": sorted({r["seed"] for r in rows}), "baseline_cell_id": baseline,
            "cells": [{"cell_id": c, "axes": axes[c]} for c in cells]}


def test_report_takes_baseline_and_cells_from_matrix_json(tmp_path, capsys):
    rows = toy_rows()
    rows = [r for r in rows if r["cell_id"] != "base"] + [r for r in rows if r["cell_id"] == "base"]  # base last
    stray = {**rows[0], "cell_id": "stray", "axes": {"precision": "fp16", "checkpointing": False}}
    folder = write_rows(tmp_path / "f", rows + [stray])
    write_atomic(folder / "matrix.json", json.dumps(record_for(rows, "base")))
    results = load_results(folder)
    assert {r["cell_id"] for r in results.rows} == {"base", "bf16", "ckpt"}
    assert "1 rows of cells or seeds not in matrix.json left out" in capsys.readouterr().err
    stats = all_cell_stats(results.rows, results.baseline_cell_id)
    assert stats[0]["cell_id"] == "base" and stats[0]["is_base"] and stats[0]["label"] == "baseline"
    # The inference the folder falls back to without matrix.json takes the first row's cell.
    (folder / "matrix.json").unlink()
    fallback = load_results(folder)
    assert all_cell_stats(fallback.rows)[0]["cell_id"] == "bf16"
    assert "no matrix.json" in capsys.readouterr().err


def test_latest_row_of_a_run_counts_in_reports(tmp_path):
    rows = toy_rows()
    retried = {**next(r for r in rows if r["status"] != "ok"), "status": "ok", "error": None,
               **{k: v for k, v in rows[0].items() if k not in ("cell_id", "axes", "seed", "config")}}
    folder = write_rows(tmp_path / "f", rows + [retried])
    results = load_results(folder, warn=False)
    assert len(results.rows) == 9 and all(r["status"] == "ok" for r in results.rows)


def test_matrix_json_records_the_matrix(write_matrix, tmp_path, fake_worker):
    path = write_matrix(THREE_CELLS)
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 0
    recorded = json.loads((out / "matrix.json").read_text())
    matrix = load_matrix(path)
    assert recorded == json.loads(json.dumps(matrix_record(matrix)))
    assert recorded["baseline_cell_id"] == matrix.cells[0].cell_id and matrix.cells[0].axes == {"accumulation": 1}
    assert [c["cell_id"] for c in recorded["cells"]] == [c.cell_id for c in matrix.cells]
    assert recorded["seeds"] == [0, 1] and recorded["design"] == "one_at_a_time"
    assert recorded["source_file"] == str(path)
    assert not (out / ".work").exists()


def test_edited_matrix_is_refused_and_nothing_written(write_matrix, tmp_path, fake_worker, capsys):
    out = tmp_path / "out"
    assert main(["run", str(write_matrix(TINY_MATRIX)), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    for edited in (THREE_CELLS, TINY_MATRIX.replace("seeds: [0, 1]", "seeds: [0]"),
                   TINY_MATRIX + "design: full_factorial\n", TINY_MATRIX.replace("steps: 6", "steps: 7")):
        assert main(["run", str(write_matrix(edited, "edited.yaml")), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "different matrix" in err[0] and "--fresh" in err[0]
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # --fresh moves the rows and their matrix.json aside together and starts over.
    assert main(["run", str(write_matrix(THREE_CELLS, "edited.yaml")), "--out", str(out), "--fresh"]) == 0
    assert len(list(out.glob("cells.jsonl.*.old"))) == 1 and len(list(out.glob("matrix.json.*.old"))) == 1
    assert len(read_rows(out / "cells.jsonl")) == 6


def test_adding_seeds_runs_only_the_new_ones(write_matrix, tmp_path, fake_worker, capsys):
    out = tmp_path / "out"
    assert main(["run", str(write_matrix(TINY_MATRIX)), "--out", str(out)]) == 0
    more = TINY_MATRIX.replace("seeds: [0, 1]", "seeds: [0, 1, 2]")
    assert main(["run", str(write_matrix(more, "more.yaml")), "--out", str(out)]) == 0
    rows = read_rows(out / "cells.jsonl")
    assert sorted(r["seed"] for r in rows) == [0, 0, 1, 1, 2, 2]
    assert json.loads((out / "matrix.json").read_text())["seeds"] == [0, 1, 2]


def test_rows_of_an_older_folder_from_another_matrix_are_refused(write_matrix, tmp_path, fake_worker, capsys):
    out = tmp_path / "out"
    write_rows(out, [good_row(cell_id="not-in-this-matrix")])
    assert main(["run", str(write_matrix(TINY_MATRIX)), "--out", str(out)]) == 2
    assert "not in this matrix" in capsys.readouterr().err
    assert not (out / "matrix.json").exists()


# --- exit code and summary over the whole matrix --------------------------------------------------------

def test_rerun_after_failures_reports_them_and_exits_1(write_matrix, tmp_path, fake_worker, capsys):
    path = write_matrix(TINY_MATRIX)
    out = tmp_path / "out"
    failing = load_matrix(path).cells[1].cell_id
    fake_worker.setenv("FAKE_WORKER_FAIL", failing)
    assert main(["run", str(path), "--out", str(out)]) == 1
    capsys.readouterr()
    fake_worker.delenv("FAKE_WORKER_FAIL")
    assert main(["run", str(path), "--out", str(out)]) == 1  # nothing runs, the failures stand
    text = capsys.readouterr().out
    assert "done: 2 ok, 2 failed of 4 runs in the matrix (0 run now)" in text
    assert text.count(f"error: cell {failing}") == 2 and "--retry-failed" in text
    assert len(read_rows(out / "cells.jsonl")) == 4

    assert main(["run", str(path), "--out", str(out), "--retry-failed"]) == 0
    assert "done: 4 ok, 0 failed of 4 runs in the matrix (2 run now)" in capsys.readouterr().out
    rows = read_rows(out / "cells.jsonl")
    assert len(rows) == 6  # failures kept in the file; the newer rows supersede them
    assert main(["run", str(path), "--out", str(out)]) == 0


# --- links in the results folder ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cells.jsonl", ".lock", "results.csv", "matrix.json"])
def test_run_never_writes_through_a_link(write_matrix, tmp_path, fake_worker, capsys, name):
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "outside.txt"
    target.write_bytes(b"precious\nbytes")
    (out / name).symlink_to(target)
    assert main(["run", str(write_matrix(TINY_MATRIX)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "symbolic link" in err[0] and name in err[0]
    assert target.read_bytes() == b"precious\nbytes"
    assert not (out / "cells.jsonl").is_file() or name == "cells.jsonl"


@pytest.mark.parametrize("name", ["report.md", "results.csv", "figures", "figures/accuracy.png"])
def test_report_never_writes_through_a_link(tmp_path, name, capsys):
    folder = write_rows(tmp_path / "f", toy_rows())
    if name.startswith("figures/"):
        (folder / "figures").mkdir()
    target = tmp_path / "outside"
    target.write_bytes(b"precious")
    (folder / name).symlink_to(target)
    assert main(["report", str(folder)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning: ")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and name.split("/")[0] in errors[0]
    assert target.read_bytes() == b"precious"


def test_atomic_write_does_not_follow_a_planted_temporary_name(tmp_path):
    target = tmp_path / "outside"
    target.write_bytes(b"precious")
    path = tmp_path / "matrix.json"
    (tmp_path / f".matrix.json.{os.getpid()}.tmp").symlink_to(target)
    write_atomic(path, "{}")
    assert path.read_text() == "{}" and not path.is_symlink() and target.read_bytes() == b"precious"


def test_a_fifo_for_cells_jsonl_is_refused_not_waited_on(tmp_path):
    path = tmp_path / "cells.jsonl"
    os.mkfifo(path)
    with pytest.raises(Exception, match="not a regular file"):
        append_row(path, good_row())


# --- the committed reference results --------------------------------------------------------------------

REPO_RESULTS = Path(__file__).resolve().parent.parent / "results"


@pytest.mark.parametrize("rows_file", sorted(REPO_RESULTS.glob("*/cells.jsonl")), ids=lambda p: p.parent.name)
def test_committed_results_come_from_a_committed_tree(rows_file):
    """Reference rows measured from uncommitted code cannot be reproduced from any commit."""
    rows = read_rows(rows_file)
    assert rows, f"{rows_file}: no usable rows"
    dirty = [(r["cell_id"], r["seed"]) for r in rows if (r.get("env") or {}).get("git_dirty") is not False]
    assert not dirty, f"{rows_file}: rows from a dirty or unknown tree: {dirty[:5]}"
    assert all(r["schema_version"] == SCHEMA_VERSION for r in rows), f"{rows_file}: rows of an older schema"
