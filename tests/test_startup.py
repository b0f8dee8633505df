"""The warm start path (bench.execution.forkserver): isolation proved, speed measured.

The isolation test runs in the default test run. The speed benchmark is skipped there (timing
belongs in benchmarks): run it with
    .venv/bin/python -m pytest tests/test_startup.py -o addopts="" --benchmark-only
"""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.config.train_config import build_train_config
from bench.execution import children, forkserver
from bench.regression import compare as cmp
from bench.regression import sides
from bench.training import worker

PLAIN = {"model": "tiny_cnn", "dataset": "synthetic", "num_samples": 64, "image_size": 8, "batch_size": 16,
         "steps": 5, "warmup_steps": 1, "device": "cpu"}


def job(tmp_path: Path, tag: str) -> Path:
    config = build_train_config(dict(PLAIN), "<test>")
    return children.write_job(tmp_path, "isolation", "plain", 0, {}, config.to_dict(), tag=tag)


def row_of(job_path: Path) -> dict:
    return json.loads(Path(json.loads(job_path.read_text())["row_path"]).read_text())


def pollute_then_run(job_path: str) -> None:
    """A run that changes every piece of process-global state it can, then (as a control) trains
    the plain job in this polluted process."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.mkldnn.enabled = False
    torch.set_float32_matmul_precision("medium")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fills autocast's weight cast cache
        torch.nn.Linear(4, 4)(torch.ones(2, 4))
    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"
    compiled = torch.compile(torch.nn.Linear(2, 2), backend="eager")  # dynamo's modules and caches
    compiled(torch.ones(1, 2))
    raise SystemExit(worker.main([job_path], forked=True))


def test_a_run_after_one_that_changed_every_global_equals_a_run_in_a_new_process(tmp_path):
    # The plain cell in a brand-new interpreter: the start path of every run before the fork server.
    fresh = job(tmp_path, "-fresh")
    subprocess.run([*children.THIS_WORKER, str(fresh)], check=True, timeout=300)
    # A run that changes everything, forked from the server, then the plain cell forked after it.
    polluter = forkserver.context().Process(target=pollute_then_run, args=(str(job(tmp_path, "-polluted")),))
    polluter.start()
    polluter.join(300)
    assert polluter.exitcode == 0
    after = job(tmp_path, "-after")
    assert forkserver.start(after, None).wait(300) == 0

    rows = {name: row_of(tmp_path / f"plain-0-{name}.job.json") for name in ("fresh", "polluted", "after")}
    assert {r["status"] for r in rows.values()} == {"ok"}
    exact = [m.name for m in cmp.METRICS if m.tier == "exact"]

    def verdicts(base: dict, new: dict) -> dict[str, str]:
        found = cmp.compare_cells(sides.cells_from_rows([base]), sides.cells_from_rows([new]), cmp.Policy())
        return {v.metric: v.verdict for v in found if v.metric in exact}

    same = verdicts(rows["fresh"], rows["after"])
    assert set(same.values()) == {cmp.PASS} and "final_train_loss" in same and "flops_per_step" in same
    assert rows["after"]["final_train_loss"] == rows["fresh"]["final_train_loss"]  # bit for bit
    assert rows["after"]["memory_breakdown"] == rows["fresh"]["memory_breakdown"]
    assert rows["after"]["env"]["torch_threads"] == rows["fresh"]["env"]["torch_threads"]
    # The control: the same cell inside the polluted process does differ, so the check can fail.
    polluted = verdicts(rows["fresh"], rows["polluted"])
    assert cmp.PASS != polluted["final_train_loss"] and cmp.PASS != polluted["memory_breakdown.parameters"]


# --- speed -----------------------------------------------------------------------------------------

RUNS = 10


def fixed_costs(tmp_path: Path, start: str, round_: int) -> list[float]:
    """Run RUNS tiny runs one after another; per run, the runner's wall time minus the run's own
    ``wall_time_s``: what starting (and ending) a run costs."""
    monkey = pytest.MonkeyPatch()
    monkey.setattr(children, "START", start)
    costs = []
    try:
        for seed in range(RUNS):
            config = build_train_config(dict(PLAIN), "<bench>")
            path = children.write_job(tmp_path, "startup", f"{start}{round_}", seed, {}, config.to_dict())
            began = time.monotonic()
            row = children.run_job_file(path, [*children.WORKER, str(path)], None, 300)
            costs.append(time.monotonic() - began - row["wall_time_s"])
    finally:
        monkey.undo()
    return costs


@pytest.mark.benchmark(group="fixed cost per run (start + end), 10 tiny runs, interleaved")
def test_fixed_cost_per_run_fork_against_exec(benchmark, tmp_path):
    found: dict[str, list[float]] = {"exec": [], "fork": []}
    rounds = iter(range(100))

    def one_round() -> None:
        r = next(rounds)
        for start in (("exec", "fork") if r % 2 == 0 else ("fork", "exec")):  # interleaved, order alternating
            found[start] += fixed_costs(tmp_path, start, r)

    benchmark.pedantic(one_round, rounds=4, warmup_rounds=1)
    for start, costs in found.items():
        benchmark.extra_info[f"{start}_median_s"] = statistics.median(costs[2 * RUNS:])  # after the warm-up round
    print(json.dumps(benchmark.extra_info))


def report_start_method(path: str) -> None:
    """In a child of the fork server: the default start method after the worker's reset."""
    multiprocessing.set_start_method(None, force=True)  # what forked_main does
    Path(path).write_text(str(multiprocessing.get_start_method(allow_none=True)))


def inherited_start_method(path: str) -> None:
    Path(path).write_text(str(multiprocessing.get_start_method(allow_none=True)))


def test_a_forked_run_starts_its_dataloader_workers_as_a_fresh_process_would(tmp_path):
    """A child of the fork server inherits 'forkserver' as its default start method, so its
    DataLoader workers would start from the server and get the dataset pickled (10x slower
    batches here). The worker resets it to a fresh process's: none set, fork on Linux."""
    for target, expected in ((inherited_start_method, "forkserver"), (report_start_method, "None")):
        out = tmp_path / target.__name__
        child = forkserver.context().Process(target=target, args=(str(out),))
        child.start()
        child.join(120)
        assert out.read_text() == expected
    assert "multiprocessing.set_start_method(None, force=True)" in Path(worker.__file__).read_text()
