"""Runs side by side: which run goes where (bench.execution.slots), and the runner that starts them
(bench.execution.runner.LocalRuns) on fake GPUs, on shared CPU slots, and when stopped."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from itertools import combinations

import pytest

from bench.cli.main import main
from bench.config.matrix import load_matrix
from bench.execution import runner
from bench.execution.slots import DevicePool, LocalDevices, Placement, Request, child_environment, request_for, too_wide
from bench.store.results import read_rows
from tests.conftest import TINY_MATRIX
from tests.test_results import fake_worker  # noqa: F401 - fixture
from tests.test_signals import SLOW_MATRIX, assert_lock_free, assert_no_child_left, processes_mentioning, wait_for

# --- placement -------------------------------------------------------------------------------------------

def test_one_gpu_runs_get_a_gpu_each_and_wait_when_none_is_free():
    pool = DevicePool(gpus=(0, 1, 2))
    placed = [pool.place(Request(gpus=1)) for _ in range(3)]
    assert sorted(p.gpus for p in placed) == [(0,), (1,), (2,)]
    assert pool.place(Request(gpus=1)) is None  # never two runs on one GPU
    pool.release(placed[1])
    assert pool.place(Request(gpus=1)).gpus == (1,)


def test_a_wide_run_takes_w_free_gpus_or_waits():
    pool = DevicePool(gpus=(3, 5, 7, 9))
    one = pool.place(Request(gpus=1))
    wide = pool.place(Request(gpus=2))
    assert len(set(wide.gpus)) == 2 and not set(wide.gpus) & set(one.gpus)
    assert pool.place(Request(gpus=2)) is None  # one GPU is left: the run waits
    pool.release(one)
    again = pool.place(Request(gpus=2))
    assert len(again.gpus) == 2 and not set(again.gpus) & set(wide.gpus)
    assert pool.place(Request(gpus=5)) is None


def test_a_cpu_run_has_the_machine_to_itself_unless_timing_is_shared():
    pool = DevicePool(gpus=(0, 1))
    gpu_run = pool.place(Request(gpus=1))
    assert pool.place(Request(alone=True)) is None  # waits for the GPU run
    pool.release(gpu_run)
    cpu_run = pool.place(Request(alone=True))
    assert cpu_run is not None and cpu_run.is_cpu
    assert pool.place(Request(gpus=1)) is None and pool.place(Request()) is None  # nothing beside it
    pool.release(cpu_run)

    shared = DevicePool(gpus=(), cpu_slots=2)
    assert shared.place(Request()) and shared.place(Request())
    assert shared.place(Request()) is None  # at most --parallel at once


def test_requests_follow_the_config(write_matrix):
    matrix = load_matrix(write_matrix(TINY_MATRIX.replace("accumulation: [1, 2]", "world_size: [1, 2]")))
    cpu_one, cpu_two = (c.config for c in matrix.cells)
    assert request_for(cpu_one, shared_timing=False) == Request(alone=True)
    assert request_for(cpu_two, shared_timing=True) == Request()
    cuda_two = cpu_two.__class__(**{**cpu_two.__dict__, "device": "cuda"})
    assert request_for(cuda_two, shared_timing=False) == Request(gpus=2)
    assert "cell x needs 2 GPUs per node; --devices lists 1" == too_wide({"cell x": Request(gpus=2)}, (0,))
    assert too_wide({"cell x": Request(gpus=2)}, (0, 1)) is None


def test_the_child_sees_only_its_gpus_by_their_physical_ids(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert child_environment(Placement(gpus=(1, 3)), 1) == {"CUDA_VISIBLE_DEVICES": "5,7"}
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert child_environment(Placement(gpus=(2,)), 1) == {"CUDA_VISIBLE_DEVICES": "2"}
    assert child_environment(Placement(alone=True), 1) == {}
    assert "TRICKBENCH_CORES" in child_environment(Placement(), 2)


# --- the runner on fake GPUs -------------------------------------------------------------------------------

THREE_CELLS = TINY_MATRIX.replace("accumulation: [1, 2]", "accumulation: [1, 2, 4]")


def test_runs_share_no_gpu_and_start_in_round_robin_order(write_matrix, tmp_path, fake_worker, capsys):
    """CPU cells stand in for GPU runs (the runner asks for GPUs as for CUDA cells): accumulation 4
    needs two GPUs. Each child must see its own GPUs only, never one a running neighbour has."""
    matrix = load_matrix(write_matrix(THREE_CELLS))
    wide = {matrix.cells[2].cell_id}
    fake_worker.setattr(runner, "request_for",
                        lambda config, shared: Request(gpus=2 if config.tricks["accumulation"] == 4 else 1))
    fake_worker.setenv("FAKE_WORKER_SLEEP_S", "1.5")
    out = tmp_path / "out"
    runner.run_matrix(matrix, out, devices=LocalDevices(gpus=(0, 1, 2)))
    rows = read_rows(out / "cells.jsonl")
    assert sorted((r["cell_id"], r["seed"]) for r in rows) == sorted((c.cell_id, s) for c, s in matrix.runs())
    placed = [(r["cell_id"], set(r["fake_placement"]["cuda_visible_devices"].split(",")),
               r["fake_placement"]["start"], r["fake_placement"]["end"]) for r in rows]
    for cell_id, gpus, _, _ in placed:
        assert len(gpus) == (2 if cell_id in wide else 1) and gpus <= {"0", "1", "2"}
    overlapping = [(a, b) for a, b in combinations(placed, 2) if a[2] < b[3] and b[2] < a[3]]
    assert overlapping, "no two runs ran at once"
    assert all(not a[1] & b[1] for a, b in overlapping), "two runs at once on one GPU"
    assert not any(r.get("shared_timing") for r in rows)  # each had its own device
    started = [line.split("] ", 1)[1].split(" on ")[0] for line in capsys.readouterr().out.splitlines()
               if line.startswith("[")]
    assert started == [f"{c.label()} seed={s}" for c, s in matrix.runs()]


def test_a_failing_run_does_not_stop_the_others(write_matrix, tmp_path, fake_worker):
    matrix = load_matrix(write_matrix(THREE_CELLS))
    fake_worker.setattr(runner, "request_for", lambda config, shared: Request(gpus=1))
    fake_worker.setenv("FAKE_WORKER_FAIL", matrix.cells[0].cell_id)
    out = tmp_path / "out"
    runner.run_matrix(matrix, out, devices=LocalDevices(gpus=(0, 1)))
    statuses = sorted(r["status"] for r in read_rows(out / "cells.jsonl"))
    assert statuses == ["error"] * 2 + ["ok"] * 4


# --- shared CPU timing, end to end ---------------------------------------------------------------------------

def test_parallel_needs_shared_timing_and_devices_need_cuda_cells(write_matrix, tmp_path, capsys):
    path = write_matrix(TINY_MATRIX)
    out = tmp_path / "out"
    for args, says in ((["--parallel", "2"], "add --shared-timing"),
                       (["--shared-timing"], "needs --parallel N"),
                       (["--devices", "0,1"], "no cell of tiny runs on cuda"),
                       (["--devices", "0,0"], "distinct GPU indices")):
        assert main(["run", str(path), "--out", str(out), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and says in err[0], err
        assert not out.exists()


def test_parallel_cpu_runs_give_the_sequential_rows_marked_as_shared(write_matrix, tmp_path):
    path = write_matrix(TINY_MATRIX)
    alone, shared = tmp_path / "alone", tmp_path / "shared"
    assert main(["run", str(path), "--out", str(alone)]) == 0
    assert main(["run", str(path), "--out", str(shared), "--parallel", "2", "--shared-timing"]) == 0
    by_key = {name: {(r["cell_id"], r["seed"]): r for r in read_rows(folder / "cells.jsonl")}
              for name, folder in (("alone", alone), ("shared", shared))}
    assert by_key["alone"].keys() == by_key["shared"].keys()
    for key, row in by_key["shared"].items():
        assert row["status"] == "ok"
        for exact in ("flops_per_step", "peak_memory_bytes", "steps"):
            assert row[exact] == by_key["alone"][key][exact], (key, exact)
    assert not any(r.get("shared_timing") for r in by_key["alone"].values())
    assert any(r.get("shared_timing") for r in by_key["shared"].values())
    # Two runs at once on two cores: each got one core.
    assert {r["env"]["torch_threads"] for r in by_key["shared"].values() if r.get("shared_timing")} == {1}


def test_an_interrupt_stops_every_child_before_the_runner_returns(write_matrix, tmp_path, fake_worker):
    """In-process, so no death signal of a dying parent can do the runner's work for it."""
    matrix = load_matrix(write_matrix(THREE_CELLS))
    fake_worker.setattr(runner, "request_for", lambda config, shared: Request(gpus=1))
    fake_worker.setenv("FAKE_WORKER_SLEEP_S", "600")
    seen = []

    def interrupted_wait(self):
        if len(self.flights) < 2:
            return
        seen.extend(f.job.proc for f in self.flights)
        raise KeyboardInterrupt

    fake_worker.setattr(runner.LocalRuns, "_wait", interrupted_wait)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        runner.run_matrix(matrix, out, devices=LocalDevices(gpus=(0, 1)))
    assert len(seen) == 2 and all(proc.poll() is not None for proc in seen)  # ended and reaped
    assert not processes_mentioning(str(out / ".work"))
    assert read_rows(out / "cells.jsonl") == []


def test_ctrl_c_stops_every_run_in_flight(write_matrix, tmp_path):
    path = write_matrix(SLOW_MATRIX)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "bench", "run", str(path), "--out", str(out),
                             "--parallel", "2", "--shared-timing"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "TRICKBENCH_FAULT": "hang@0"})
    wait_for(lambda: len(processes_mentioning(str(out / ".work"))) >= 2, 120, "two training children")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 130 and "Traceback" not in stderr
    assert_no_child_left(out)
    assert_lock_free(out)
    assert read_rows(out / "cells.jsonl") == []  # runs in progress write no row


def test_shared_timing_is_never_compared(tmp_path, monkeypatch):
    """Rows timed side by side: the report shows their speed but makes no call, and compare says
    NOT COMPARABLE for timing while still judging the exact counters."""
    from bench.regression.compare import NOT_COMPARABLE, PASS, compare_cells
    from bench.regression.sides import load_side
    from bench.reports.report import build_report
    from tests.test_report import toy_rows, write_rows

    monkeypatch.setattr("bench.reports.report.write_figures", lambda stats, design, folder: ([], []))
    plain = write_rows(tmp_path / "plain", toy_rows())
    shared = write_rows(tmp_path / "shared", [{**r, "shared_timing": True} for r in toy_rows()])
    plain_text, shared_text = build_report(plain).read_text(), build_report(shared).read_text()
    assert "5.02*" in plain_text and "2.00× [" in plain_text  # bf16's call and interval without sharing
    assert "5.02*" not in shared_text and "not comparable (shared timing)" in shared_text
    assert "3 shared timing" in shared_text
    verdicts = {(v.cell_id, v.metric): v for v in compare_cells(load_side(plain), load_side(shared))}
    assert verdicts["bf16", "step_time_ms_median"].verdict == NOT_COMPARABLE
    assert verdicts["bf16", "peak_memory_bytes"].verdict == PASS
