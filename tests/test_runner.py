"""The matrix runner end to end: rows, resume, kills, failures as data, one writer, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bench.cli.main import main
from bench.config.matrix import load_matrix
from bench.execution import children, runner
from bench.store.results import SCHEMA_VERSION, read_rows
from tests.conftest import TINY_MATRIX

REQUIRED = ["schema_version", "matrix", "cell_id", "seed", "axes", "config", "status",
            "throughput_samples_per_s", "step_time_ms_median", "peak_memory_bytes", "accuracy_top1",
            "final_train_loss", "wall_time_s", "env", "load_avg_1m_start", "load_avg_1m_end"]


def keys(rows):
    return sorted((r["cell_id"], r["seed"]) for r in rows)


def test_run_writes_one_row_per_cell_and_seed(write_matrix, tmp_path):
    path = write_matrix(TINY_MATRIX)
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 0
    rows = read_rows(out / "cells.jsonl")
    matrix = load_matrix(path)
    assert keys(rows) == sorted((c.cell_id, s) for c, s in matrix.runs())
    for row in rows:
        assert all(k in row for k in REQUIRED), [k for k in REQUIRED if k not in row]
        assert row["status"] == "ok" and row["accuracy_top1"] is None  # synthetic: no accuracy
        assert row["schema_version"] == SCHEMA_VERSION and row["load_avg_1m_start"] >= 0 and row["load_avg_1m_end"] >= 0
        assert row["env"]["torch"] and row["env"]["device"] == "cpu"
    assert (out / "results.csv").read_text().count("\n") == len(rows) + 1

    # Same command again: everything is there, nothing runs.
    assert main(["run", str(path), "--out", str(out)]) == 0
    assert len(read_rows(out / "cells.jsonl")) == len(rows)

    # --fresh keeps the old rows under another name.
    assert main(["run", str(path), "--out", str(out), "--fresh"]) == 0
    assert len(list(out.glob("cells.jsonl.*.old"))) == 1
    assert len(read_rows(out / "cells.jsonl")) == len(rows)


def test_sigkill_then_resume_loses_and_duplicates_nothing(write_matrix, tmp_path):
    path = write_matrix(TINY_MATRIX.replace("seeds: [0, 1]", "seeds: [0, 1, 2]"))
    out = tmp_path / "out"
    rows_file = out / "cells.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "bench", "run", str(path), "--out", str(out)],
                            start_new_session=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(read_rows(rows_file, warn=False)) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the parent and the child it is running
    proc.wait()
    survived = read_rows(rows_file)
    assert 2 <= len(survived) < 6
    with open(rows_file, "a") as f:  # a write torn by the kill
        f.write('{"cell_id": "abc", "se')

    assert main(["run", str(path), "--out", str(out)]) == 0
    rows = read_rows(rows_file)
    matrix = load_matrix(path)
    assert keys(rows) == sorted((c.cell_id, s) for c, s in matrix.runs())  # complete, no duplicates
    assert all(r in rows for r in survived)


def test_failures_are_recorded_and_the_matrix_goes_on(write_matrix, tmp_path, capsys):
    (tmp_path / "data" / "cifar-10-batches-py").mkdir(parents=True)  # there, so validation passes, but empty
    path = write_matrix(f"""
        name: failing
        base: {{model: tiny_cnn, dataset: synthetic, num_samples: 64, image_size: 8, batch_size: 16,
               steps: 3000, warmup_steps: 1, data_dir: '{tmp_path / "data"}'}}
        design: one_at_a_time
        axes:
          dataset: [synthetic, cifar10]      # cifar10's files are missing and download is off: error
          time_limit_s: [600, 1]             # 3000 steps take longer than 1 s (a warm start does not): timeout
          memory_limit_mb: [null, 1]         # 1 MiB more than start-up: oom
        """)
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 1
    rows = {json.dumps(r["axes"], sort_keys=True): r for r in read_rows(out / "cells.jsonl")}
    by_status = sorted(r["status"] for r in rows.values())
    assert by_status == ["error", "ok", "oom", "timeout"]
    for row in rows.values():
        if row["status"] != "ok":
            assert row["error"]
    cifar = next(r for r in rows.values() if r["axes"]["dataset"] == "cifar10")
    assert cifar["status"] == "error" and "download" in cifar["error"]
    assert "1 ok, 3 failed" in capsys.readouterr().out
    oom = next(r for r in rows.values() if r["status"] == "oom")
    assert "memory_limit_mb=1 is too small to start the run" in oom["error"] and oom["failed_at_step"] == 0


def test_a_memory_cap_just_above_the_libraries_ends_the_run_instead_of_spinning(write_matrix, tmp_path):
    """digits imports scikit-learn (and scipy's OpenBLAS) lazily; under a cap that import used to spin
    at 100% CPU until the time limit. Libraries now load before the cap, so the run ends either way."""
    path = write_matrix("""
        name: capped
        base: {model: tiny_cnn, dataset: digits, image_size: 8, batch_size: 16, steps: 6, warmup_steps: 1,
               memory_limit_mb: 60, time_limit_s: 90}
        axes: {accumulation: [1]}
        """)
    out = tmp_path / "out"
    main(["run", str(path), "--out", str(out)])
    [row] = read_rows(out / "cells.jsonl")
    assert row["status"] in ("ok", "oom"), row["error"]

def test_a_child_that_dies_silently_is_recorded(write_matrix, tmp_path, monkeypatch):
    monkeypatch.setattr(children, "WORKER", [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"])
    out = tmp_path / "out"
    assert main(["run", str(write_matrix(TINY_MATRIX)), "--out", str(out)]) == 1
    rows = read_rows(out / "cells.jsonl")
    assert len(rows) == 4
    assert all(r["status"] == "error" and "SIGSEGV" in r["error"] for r in rows)
    assert all(r["schema_version"] == SCHEMA_VERSION and r["load_avg_1m_end"] is not None and r["wall_time_s"] > 0 for r in rows)


def test_divergence_is_a_status_with_its_step(monkeypatch):
    from bench.config.train_config import build_train_config
    from bench.training import train as train_module
    from bench.training.worker import run_job

    real = train_module.F.cross_entropy
    calls = {"n": 0}

    def nan_from_step_4(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 4 else loss

    monkeypatch.setattr(train_module.F, "cross_entropy", nan_from_step_4)
    config = build_train_config({"model": "tiny_cnn", "dataset": "synthetic", "num_samples": 64, "image_size": 8,
                                 "batch_size": 16, "steps": 8, "warmup_steps": 1, "device": "cpu"}, "t")
    row = run_job({"matrix": "m", "cell_id": "c", "seed": 0, "axes": {}, "config": config.to_dict()})
    assert row["status"] == "diverged"
    assert row["failed_at_step"] == 3  # zero-based index of the first non-finite loss
    assert "non-finite" in row["error"]


def test_second_writer_stops_at_once(write_matrix, tmp_path, capsys):
    out = tmp_path / "out"
    with runner.exclusive(out):
        assert main(["run", str(write_matrix(TINY_MATRIX)), "--out", str(out)]) == 2
    assert "another trickbench run" in capsys.readouterr().err
    assert not (out / "cells.jsonl").exists()


@pytest.mark.parametrize("yaml_text,fragment", [
    ("name: m\nbase: {model: tiny_cnn, dataset: digits, epochs: 1}\naxes: {precision: [fp32, bf17]}",
     "axes.precision[1]: 'bf17' is not one of fp32, tf32, fp16, bf16 (did you mean 'bf16'?)"),
    ("name: m\nbase: {model: tiny_cnn, dataset: digits, epochs: 1}\naxes: {world_size: [1, 3]}",
     "axes (world_size=3): world_size 3 does not divide the global batch size 128"),
])
def test_cli_bad_input_is_one_line_exit_2_nothing_written(tmp_path, yaml_text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "bench", "run", str(path), "--out", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ") and fragment in lines[0]
    assert not out.exists()
