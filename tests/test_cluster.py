"""Cluster runs through submitit: settings, the sbatch script it writes, per-run files, collect,
status, and end to end with submitit's local executor (kill, resubmit, preemption)."""
import json
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.base.errors import ConfigError
from bench.cli.main import main
from bench.config.matrix import load_matrix
from bench.config.slurm import parse_settings
from bench.execution import cluster, queue, submit
from bench.execution.task import RunTask
from bench.store.results import matrix_record, read_rows
from bench.training.worker import STOPPED_EXIT
from tests.conftest import TINY_MATRIX

pytest.importorskip("submitit")

# world_size 2 runs under torchrun inside the task, as on a GPU node.
CLUSTER_MATRIX = """
name: tiny
base: {model: tiny_cnn, dataset: synthetic, num_samples: 64, image_size: 8, batch_size: 16,
       steps: 6, warmup_steps: 1, time_limit_s: 300}
seeds: [0, 1]
axes:
  world_size: [1, 2]
"""


def keys(rows):
    return sorted((r["cell_id"], r["seed"], r["status"]) for r in rows)


# --- settings ----------------------------------------------------------------------------------------

def test_slurm_section_is_validated_like_the_rest(write_matrix, tmp_path, capsys):
    path = write_matrix(TINY_MATRIX + "slurm: {partition: gpu, gpu_per_node: 4}\n")
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "slurm.gpu_per_node: unknown key (did you mean 'gpus_per_node'?)" in err
    assert "allowed: partition, gpus_per_node" in err and not out.exists()

    for bad, key in [("time_limit_min: 0", "slurm.time_limit_min"), ("sbatch: {array: 1-3}", "slurm.sbatch.array"),
                     ("setup: module load x", "slurm.setup"), ("array_parallelism: two", "slurm.array_parallelism")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_matrix(write_matrix(TINY_MATRIX + f"slurm: {{{bad}}}\n"))


def test_local_placement_options_are_refused_with_a_cluster_executor(write_matrix, tmp_path, capsys):
    out = tmp_path / "out"
    for extra in (["--parallel", "2", "--shared-timing"], ["--devices", "0"]):
        assert main(["run", str(write_matrix(TINY_MATRIX)), "--out", str(out), "--executor", "local", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "with --executor the scheduler places them" in err and not out.exists()


def test_command_line_overrides_merge_and_are_validated(write_matrix):
    matrix = load_matrix(write_matrix(TINY_MATRIX + "slurm: {partition: gpu, sbatch: {account: a}}\n"))
    settings = cluster.settings_for(matrix, ["time_limit_min=30", "sbatch.qos=high"])
    assert settings.partition == "gpu" and settings.time_limit_min == 30
    assert settings.sbatch == {"account": "a", "qos": "high"}
    with pytest.raises(ConfigError, match=r"--slurm: slurm\.partiton: unknown key"):
        cluster.settings_for(matrix, ["partiton=gpu"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        cluster.settings_for(matrix, ["partition"])


def test_executor_settings_do_not_change_cell_ids(write_matrix):
    plain = load_matrix(write_matrix(TINY_MATRIX))
    with_slurm = load_matrix(write_matrix(TINY_MATRIX + "slurm: {partition: gpu, time_limit_min: 5}\n", "s.yaml"))
    assert [c.cell_id for c in plain.cells] == [c.cell_id for c in with_slurm.cells]


def test_runs_a_task_cannot_hold_are_refused(write_matrix):
    matrix = load_matrix(write_matrix(TINY_MATRIX.replace("warmup_steps: 1}", "warmup_steps: 1, time_limit_s: 7200}")))
    with pytest.raises(ConfigError, match=r"slurm\.time_limit_min: 60 min is shorter than time_limit_s 7200"):
        cluster.check_fits(parse_settings({"time_limit_min": 60}, "m"), matrix, "m")
    # SLURM's warning signal comes 90 s before the end: a run must fit before it, not before the end.
    tight = load_matrix(write_matrix(TINY_MATRIX.replace("warmup_steps: 1}", "warmup_steps: 1, time_limit_s: 3550}"),
                                     "tight.yaml"))
    with pytest.raises(ConfigError, match=r"time_limit_s 3550 of cell \w+ \+ 90 s"):
        cluster.check_fits(parse_settings({"time_limit_min": 60}, "m"), tight, "m")
    cluster.check_fits(parse_settings({"time_limit_min": 61}, "m"), tight, "m")
    # Unset, the task's limit follows the longest run: 7200 s + 10 min of start-up.
    assert cluster.task_minutes(parse_settings({}, "m"), matrix) == 130


# --- the job array's parameters ----------------------------------------------------------------------

def test_executor_parameters_per_world_size():
    settings = parse_settings({"partition": "gpu", "gpus_per_node": 8, "array_parallelism": 3,
                                       "cpus_per_task": 16, "sbatch": {"account": "proj"},
                                       "setup": ["module load cuda"]}, "m")
    params = cluster.executor_parameters(settings, "slurm", "core", 4, "cuda", 70)
    assert params == {"name": "trickbench-core", "timeout_min": 70, "nodes": 1, "tasks_per_node": 1,
                      "cpus_per_task": 16, "gpus_per_node": 4, "slurm_partition": "gpu",
                      "slurm_array_parallelism": 3, "slurm_signal_delay_s": 90,
                      "slurm_additional_parameters": {"account": "proj"}, "slurm_setup": ["module load cuda"]}
    assert "gpus_per_node" not in cluster.executor_parameters(settings, "slurm", "core", 2, "cpu", 70)
    local = cluster.executor_parameters(parse_settings({}, "m"), "local", "core", 1, "cpu", 70)
    assert local == {"name": "trickbench-core", "timeout_min": 70, "nodes": 1, "tasks_per_node": 1}


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """srun, sbatch and squeue stand-ins: sbatch keeps each script it is given and answers with a job
    id (``--test-only``: accepts; a script with ``refuse-me`` in it: refused as a real sbatch does);
    squeue prints ``squeue.txt`` and counts its calls in ``squeue.calls``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = tmp_path / "sbatch-scripts"
    scripts.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(
        "#!/bin/sh\n"
        "if [ \"$1\" = --test-only ]; then cat >/dev/null; echo 'sbatch: Job 7 to start now' >&2; exit 0; fi\n"
        "if grep -q refuse-me \"$1\"; then echo 'sbatch: error: Batch job submission failed: Invalid account' >&2;"
        " exit 1; fi\n"
        f"n=$(ls {scripts} | wc -l)\ncp \"$1\" {scripts}/$n.sh\n"
        "echo \"Submitted batch job $((4200 + n))\"\n")
    (bin_dir / "squeue").write_text(f"#!/bin/sh\necho x >> {tmp_path}/squeue.calls\n"
                                    f"cat {tmp_path}/squeue.txt 2>/dev/null\nexit 0\n")
    for tool in bin_dir.iterdir():
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return scripts


def test_slurm_submission_writes_one_array_per_world_size(write_matrix, tmp_path, fake_slurm, capsys, monkeypatch):
    path = write_matrix(CLUSTER_MATRIX + "slurm: {partition: gpu, array_parallelism: 1, time_limit_min: 20,"
                        " sbatch: {account: proj, exclusive: true}, setup: ['source venv/bin/activate']}\n")
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--executor", "slurm", "--slurm", "sbatch.qos=high"]) == 0
    scripts = sorted(fake_slurm.iterdir())
    assert len(scripts) == 2  # world_size 1 and 2: an array each (one resource request per array)
    # Validated as on a GPU node although this machine has none: device auto is cuda there,
    # and a world_size-W run asks for W GPUs.
    assert sorted(re.search(r"--gpus-per-node=(\d+)", s.read_text()).group(1) for s in scripts) == ["1", "2"]
    for script in scripts:
        text = script.read_text()
        for line in ["#SBATCH --partition=gpu", "#SBATCH --array=0-1%1", "#SBATCH --time=20",
                     "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --account=proj",
                     "#SBATCH --qos=high", "#SBATCH --exclusive", "#SBATCH --signal=USR2@90",
                     "source venv/bin/activate"]:
            assert line in text, (line, text)
    jobs = json.loads((out / "cluster" / "jobs.json").read_text())
    with cluster.compute_node_view("slurm"):
        matrix = load_matrix(path)
    assert torch.cuda.device_count() < 1024  # the real count again after the block
    assert jobs["executor"] == "slurm"
    assert sorted(jobs["runs"]) == sorted(f"{c.cell_id}-{s}" for c, s in matrix.runs())
    assert {j["job_id"] for j in jobs["runs"].values()} == {"4200_0", "4200_1", "4201_0", "4201_1"}
    assert "trickbench status" in capsys.readouterr().out
    assert main(["run", str(path), "--out", str(out), "--executor", "slurm", "--slurm", "partiton=x"]) == 2

    # status: the queue (one squeue call for both arrays) for runs without a row file, the row files
    # for the others; a run in neither is lost (after the grace period, none here).
    by_job = {j["job_id"]: key for key, j in jobs["runs"].items()}
    (tmp_path / "squeue.txt").write_text("4200_0|PENDING|JobArrayTaskLimit\n4200_1|RUNNING|None\n")
    monkeypatch.setattr(queue, "LOST_GRACE_S", 0.0)
    cell_id, seed = by_job["4201_1"].rsplit("-", 1)
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    cluster.run_file(out, cell_id, int(seed)).parent.mkdir()
    cluster.run_file(out, cell_id, int(seed)).write_text(json.dumps(fake_row(cell_id, int(seed), "oom", now)))
    capsys.readouterr()
    (tmp_path / "squeue.calls").unlink(missing_ok=True)
    assert main(["status", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == f"{out}: 1 failed, 1 running, 1 queued, 1 lost of 4 runs", printed
    assert f"failed: cell {cell_id} seed {seed}: oom: boom" in printed
    assert f"lost: cell {by_job['4201_0'].rsplit('-', 1)[0]}" in printed and "run` again resubmits it" in printed
    assert (tmp_path / "squeue.calls").read_text().count("x") == 1

    # Submitting again while the array is in flight submits only the lost run, not the queued ones.
    capsys.readouterr()
    assert main(["run", str(path), "--out", str(out), "--executor", "slurm"]) == 0
    assert "2 runs are queued or running already: not submitted again" in capsys.readouterr().out
    assert len(list(fake_slurm.iterdir())) == 3
    assert "#SBATCH --array" not in sorted(fake_slurm.iterdir())[-1].read_text()  # one run: a plain job
    assert json.loads((out / "cluster" / "jobs.json").read_text())["runs"][by_job["4201_0"]]["job_id"] == "4202"


def test_a_refusal_of_sbatch_is_one_line_and_leaves_no_file(write_matrix, tmp_path, fake_slurm, capsys):
    """A refusal that --test-only could not foresee: sbatch's own words, exit 2, submitit's files gone."""
    path = write_matrix(CLUSTER_MATRIX + "slurm: {sbatch: {comment: refuse-me}}\n")
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--executor", "slurm", "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "Traceback" not in captured.out, captured
    assert "sbatch refused the array of world_size 1: sbatch: error: Batch job submission failed: Invalid account" in err
    assert not (out / "cluster").exists() and not list(fake_slurm.iterdir())


def test_submitit_warnings_go_to_stderr(tmp_path, fake_slurm):
    """submitit logs to stdout (everything) and stderr (warnings); submitting, only the latter."""
    cluster.make_executor("slurm", tmp_path / "sub", parse_settings({}, "m"), {"timeout_min": 5})
    handlers = logging.getLogger("submitit").handlers
    assert [h.get_name() for h in handlers] == ["submitit_err"] and handlers[0].level == logging.WARNING


def test_each_task_asks_for_the_cpus_its_ranks_need(write_matrix):
    matrix = load_matrix(write_matrix(CLUSTER_MATRIX.replace("time_limit_s: 300}", "time_limit_s: 300, device: cpu}")))
    settings = parse_settings({}, "m")
    assert sorted(cluster.arrays_of(matrix.runs(), settings)) == [(1, 1), (2, 2)]
    assert sorted(cluster.arrays_of(matrix.runs(), parse_settings({"threads_per_rank": 3}, "m"))) == [(1, 3), (2, 6)]
    assert sorted(cluster.arrays_of(matrix.runs(), parse_settings({"cpus_per_task": 4}, "m"))) == [(1, 4), (2, 4)]
    params = cluster.executor_parameters(parse_settings({"exclusive": True}, "m"), "slurm", "t", 2, "cpu", 9, 2)
    assert params["cpus_per_task"] == 2 and params["slurm_exclusive"] is True
    assert parse_settings({"sbatch": {"exclusive": True}}, "m").whole_nodes and not settings.whole_nodes


def test_cpu_runs_on_slurm_ask_for_no_gpu_and_big_worlds_are_refused(write_matrix, tmp_path, fake_slurm, capsys):
    path = write_matrix(CLUSTER_MATRIX)
    assert main(["run", str(path), "--out", str(tmp_path / "cpu"), "--executor", "slurm", "--device", "cpu"]) == 0
    assert not any("--gpus-per-node" in s.read_text() for s in fake_slurm.iterdir())
    cell_id, seed = next(iter(json.loads((tmp_path / "cpu" / "cluster" / "jobs.json").read_text())["runs"])).split("-")
    cluster.run_file(tmp_path / "cpu", cell_id, int(seed)).parent.mkdir()
    cluster.run_file(tmp_path / "cpu", cell_id, int(seed)).write_text(json.dumps(fake_row(cell_id, int(seed))))
    assert main(["run", str(path), "--out", str(tmp_path / "cpu"), "--executor", "slurm", "--device", "cpu",
                 "--fresh"]) == 0  # the old run file and job ids are moved aside with the rows
    assert len(list((tmp_path / "cpu").glob("runs.*.old"))) == 1 and not (tmp_path / "cpu" / "runs").exists()
    assert len(list((tmp_path / "cpu" / "cluster").glob("jobs.json.*.old"))) == 1
    big = write_matrix(CLUSTER_MATRIX.replace("world_size: [1, 2]", "world_size: [1, 16]"), "big.yaml")
    assert main(["run", str(big), "--out", str(tmp_path / "big"), "--executor", "slurm"]) == 2
    assert "slurm.gpus_per_node: 8 GPUs cannot hold world_size 16" in capsys.readouterr().err
    assert not (tmp_path / "big").exists()


def test_gpu_array_asks_for_one_gpu_per_rank(tmp_path, fake_slurm):
    settings = parse_settings({"partition": "a100"}, "m")
    params = cluster.executor_parameters(settings, "slurm", "core", 2, "cuda", 30)
    executor = cluster.make_executor("slurm", tmp_path / "sub", settings, params)
    text = executor._executor._make_submission_file_text("python -m x", "uid")  # the sbatch script, unsent
    assert "#SBATCH --gpus-per-node=2" in text and "#SBATCH --partition=a100" in text
    assert "#SBATCH --time=30" in text and "#SBATCH --job-name=trickbench-core" in text


# --- per-run files and collect -------------------------------------------------------------------------

def fake_row(cell_id, seed, status="ok", started="2026-01-01T00:00:00+0000"):
    row = {"schema_version": 2, "matrix": "tiny", "cell_id": cell_id, "seed": seed, "axes": {}, "config": {},
           "status": status, "error": None if status == "ok" else "boom", "started_at": started}
    if status == "ok":
        row.update(throughput_samples_per_s=1.0, peak_memory_bytes=1, step_time_ms_median=1.0)
    return row


def test_collect_is_idempotent_and_takes_a_rerun_once(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    for seed in (0, 1):
        (runs / f"abc-{seed}.json").write_text(json.dumps(fake_row("abc", seed, "error" if seed else "ok")))
    (runs / "junk-0.json").write_text("{not json")
    assert len(cluster.collect(tmp_path)) == 2
    assert "junk-0.json: not a results row" in capsys.readouterr().err
    assert cluster.collect(tmp_path) == [] and len(read_rows(tmp_path / "cells.jsonl")) == 2
    # --retry-failed rewrote seed 1's file with a newer row: added once, and it is the latest.
    (runs / "abc-1.json").write_text(json.dumps(fake_row("abc", 1, "ok", "2026-01-02T00:00:00+0000")))
    assert len(cluster.collect(tmp_path)) == 1 and cluster.collect(tmp_path) == []
    rows = read_rows(tmp_path / "cells.jsonl")
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    assert main(["collect", str(tmp_path)]) == 0 and "nothing new" in capsys.readouterr().out


def test_collect_takes_no_stale_run_file_and_no_run_of_another_matrix(write_matrix, tmp_path, capsys):
    """A run file older than the row cells.jsonl holds (an earlier attempt's) must not come back
    as the latest row; a row of a run that is not in matrix.json is named and left out."""
    matrix = load_matrix(write_matrix(TINY_MATRIX))
    (tmp_path / "matrix.json").write_text(json.dumps(matrix_record(matrix)))
    cell = matrix.cells[0].cell_id
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / f"{cell}-0.json").write_text(json.dumps(fake_row(cell, 0, "ok", "2026-01-02T00:00:00+0000")))
    assert len(cluster.collect(tmp_path)) == 1
    (runs / f"{cell}-0.json").write_text(json.dumps(fake_row(cell, 0, "error", "2026-01-01T00:00:00+0000")))
    (runs / "zzz-0.json").write_text(json.dumps(fake_row("zzz", 0)))
    assert cluster.collect(tmp_path) == []
    assert "zzz-0.json: cell zzz seed 0 is not a run of this folder's matrix" in capsys.readouterr().err
    assert [r["status"] for r in read_rows(tmp_path / "cells.jsonl")] == ["ok"]


def test_a_task_skips_a_finished_run(tmp_path):
    target = cluster.run_file(tmp_path, "abc", 0)
    target.parent.mkdir()
    target.write_text(json.dumps(fake_row("abc", 0)))
    config = {"model": "no-such-model"}  # would fail if the task trained
    assert RunTask(str(tmp_path), "tiny", "abc", 0, {}, config)()["status"] == "ok"
    failed = cluster.run_file(tmp_path, "abc", 1)
    failed.write_text(json.dumps(fake_row("abc", 1, "error")))
    assert RunTask(str(tmp_path), "tiny", "abc", 1, {}, config)()["status"] == "error"


def test_a_stopped_attempt_writes_no_row_and_asks_for_a_requeue_until_max_requeues(tmp_path):
    task = RunTask(str(tmp_path), "tiny", "abc", 0, {}, {"model": "tiny_cnn"}, max_requeues=2)
    stopped = {**fake_row("abc", 0, "error"), "stopped_by": "SIGTERM"}
    with pytest.raises(SystemExit) as leaving:  # SIGTERM: SLURM requeues the job itself (or it was cancelled)
        task._stopped(dict(stopped), "SIGTERM", 0, "job7", None)
    assert leaving.value.code == STOPPED_EXIT and task.stops == ("SIGTERM",)
    asked = []  # SIGUSR2: submitit's handler checkpoints this task (with its stops) and requeues it
    with pytest.raises(SystemExit):
        task._stopped(dict(stopped), "SIGUSR2", 1, "job7", lambda signum, frame: asked.append(task.checkpoint()))
    assert asked[0].function.stops == ("SIGTERM", "SIGUSR2")
    last = task._stopped(dict(stopped), "SIGTERM", 2, "job7", None)  # the third stop: a row, in one line
    assert last["status"] == "error" and "stopped_by" not in last
    assert last["error"] == ("stopped by the scheduler 3 times, last by SIGTERM (job7); "
                             "not requeued again (max_requeues=2)")


def test_checkpoint_resubmits_the_same_run():
    task = RunTask("/x", "tiny", "abc", 3, {"a": 1}, {"model": "tiny_cnn"})
    delayed = task.checkpoint()
    assert delayed.function is task and delayed.args == () and delayed.kwargs == {}


# --- end to end with submitit's local executor --------------------------------------------------------

def wait_for(condition, timeout_s=240):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_local_executor_killed_then_resubmitted_matches_sequential_runner(write_matrix, tmp_path, capsys):
    path = write_matrix(CLUSTER_MATRIX)
    out, sequential = tmp_path / "out", tmp_path / "sequential"
    command = [sys.executable, "-m", "bench", "run", str(path), "--out", str(out), "--executor", "local"]
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = out / "cluster" / "work"
    # Stop the runner while its second task is training (the first one's row file is written).
    assert wait_for(lambda: len(list((out / "runs").glob("*.json"))) == 1
                    and any(work.glob("*/*.job.json")))
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert len(list((out / "runs").glob("*.json"))) == 1  # the task in flight wrote nothing
    assert subprocess.run(["pgrep", "-f", f"bench.training.worker {work}"], capture_output=True).stdout == b""

    assert main(["run", str(path), "--out", str(out), "--executor", "local"]) == 0
    assert "resuming: 1 of 4 runs" in capsys.readouterr().out
    assert main(["collect", str(out)]) == 0  # collecting again duplicates nothing
    assert main(["run", str(path), "--out", str(sequential)]) == 0
    cluster_rows, sequential_rows = read_rows(out / "cells.jsonl"), read_rows(sequential / "cells.jsonl")
    assert keys(cluster_rows) == keys(sequential_rows) and len(cluster_rows) == 4
    assert {r["executor"] for r in cluster_rows} == {"local"}
    assert all(r["config"]["world_size"] in (1, 2) for r in cluster_rows)

    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"{out}: 4 done of 4 runs")


def test_preempted_task_is_requeued_and_finishes(write_matrix, tmp_path):
    matrix = load_matrix(write_matrix(TINY_MATRIX.replace("seeds: [0, 1]", "seeds: [0]")))
    cell = matrix.cells[0]
    settings = parse_settings({}, "m")
    params = cluster.executor_parameters(settings, "local", matrix.name, 1, "cpu", 10)
    executor = cluster.make_executor("local", tmp_path / "submitit", settings, params)
    job = executor.submit(submit.task_for(tmp_path, matrix, cell, 0, False, settings, False))
    assert wait_for(lambda: any((tmp_path / "cluster" / "work").glob("*/*.job.json")))
    # SIGUSR2 to the task, as SLURM sends it before a preemption or the time limit (submitit's
    # local controller passes it on only at its own time limit).
    controller = job._process.pid
    task = int(Path(f"/proc/{controller}/task/{controller}/children").read_text().split()[0])
    os.kill(task, signal.SIGUSR2)
    # The requeued task's row, then the job's end: done() alone can turn true between the first
    # attempt's exit and the requeued start on a loaded machine.
    assert wait_for(lambda: cluster.read_run_file(cluster.run_file(tmp_path, cell.cell_id, 0)) is not None,
                    timeout_s=300)
    assert wait_for(lambda: job.done(), timeout_s=300)
    log = Path(job.paths.stdout).read_text() + Path(job.paths.stderr).read_text()
    assert "Calling checkpoint method" in log and "Requeued job" in log, log
    assert log.count("Loading pickle") == 2  # the requeued task started again
    row = cluster.read_run_file(cluster.run_file(tmp_path, cell.cell_id, 0))
    assert row is not None and row["status"] == "ok"
