"""Against a real SLURM (scripts/slurm-local.sh: one node, 2 CPUs, no accounting; partitions debug,
low (preemptible by requeue) and high): what only a real scheduler shows. Preemption, requeue and
SIGUSR2 end in one ok row per run; a cancelled pending task is lost, and resubmitted; a second
`run` during an array submits nothing twice; a task gets the CPUs its ranks need and threads
sized from them; sbatch's refusals are one line; the script's stop leaves nothing running.

Without a cluster these tests skip, saying how to start one; with CI=true (.ci/run, which starts
the cluster) a missing cluster fails them. Runs are tiny (tiny_cnn, 8 px, synthetic data).
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from bench.cli.main import main
from bench.execution import queue
from bench.store.results import read_rows

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "slurm-local.sh"
STATE_DIR = Path(os.environ.get("SLURM_LOCAL_DIR", "/tmp/trickbench-slurm"))

MATRIX = """
name: tiny
base: {model: tiny_cnn, dataset: synthetic, num_samples: 64, image_size: 8, batch_size: 16,
       steps: STEPS, warmup_steps: 1, device: cpu}
seeds: SEEDS
axes:
  AXES
"""


def matrix_text(steps: int = 6, seeds: str = "[0]", axes: str = "accumulation: [1, 2]") -> str:
    return MATRIX.replace("STEPS", str(steps)).replace("SEEDS", seeds).replace("AXES", axes)


def cluster_up() -> bool:
    conf = os.environ.get("SLURM_CONF") or str(STATE_DIR / "slurm.conf")
    if not Path(conf).is_file():
        return False
    env = {**os.environ, "SLURM_CONF": conf}
    if subprocess.run(["bash", str(SCRIPT), "status"], env=env, capture_output=True).returncode != 0:
        return False
    os.environ["SLURM_CONF"] = conf
    return True


@pytest.fixture(scope="module", autouse=True)
def slurm():
    if not cluster_up():
        reason = (f"no SLURM cluster: start one with `sudo bash {SCRIPT.relative_to(ROOT)} start` and "
                  f"`export SLURM_CONF={STATE_DIR}/slurm.conf`")
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {reason}")
        pytest.skip(reason)


@pytest.fixture
def grace(monkeypatch):
    """A short grace period before a run out of the queue without a row counts as lost."""
    monkeypatch.setattr(queue, "LOST_GRACE_S", 3.0)


@pytest.fixture
def cancel_afterwards():
    """Folders whose jobs are cancelled after the test, whatever happened."""
    folders: list[Path] = []
    yield folders
    for out in folders:
        for array in array_ids(out):
            subprocess.run(["scancel", array], capture_output=True)


def array_ids(out: Path) -> set[str]:
    path = out / "cluster" / "jobs.json"
    if not path.is_file():
        return set()
    return {job["job_id"].split("_")[0] for job in json.loads(path.read_text())["runs"].values()}


def job_ids(out: Path) -> list[str]:
    return [job["job_id"] for job in json.loads((out / "cluster" / "jobs.json").read_text())["runs"].values()]


def wait_for(condition, timeout_s: float = 120) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def keys(rows):
    return sorted((r["cell_id"], r["seed"], r["status"]) for r in rows)


def slurm_run(path: Path, out: Path, *extra: str) -> int:
    return main(["run", str(path), "--out", str(out), "--executor", "slurm", *extra])


def logs(out: Path, suffix: str) -> str:
    return "".join(p.read_text() for p in sorted((out / "cluster" / "submitit").glob(f"*{suffix}")))


# --- the tests, cheapest first -------------------------------------------------------------------------

def test_a_refusal_of_sbatch_is_one_line_exit_2_and_leaves_nothing(write_matrix, tmp_path, capsys):
    cpu = write_matrix(matrix_text())
    auto = write_matrix(matrix_text().replace(", device: cpu", ""), "auto.yaml")
    for path, extra, said in [
        (cpu, ["--slurm", "partition=nope"], "invalid partition specified: nope"),
        (auto, [], "Invalid generic resource (gres) specification"),  # device auto = cuda: a GPU gres
        (cpu, ["--slurm", "cpus_per_task=64"], "Requested node configuration is not available"),  # pends forever
    ]:
        out = tmp_path / "out"
        assert slurm_run(path, out, *extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and said in err, err
        assert not out.exists()


def test_submit_then_collect_equals_the_sequential_runner(write_matrix, tmp_path, capsys, monkeypatch,
                                                          cancel_afterwards):
    path = write_matrix(matrix_text())
    out, sequential = tmp_path / "out", tmp_path / "sequential"
    cancel_afterwards.append(out)
    assert slurm_run(path, out, "--wait", "--timeout", "240") == 0
    printed = capsys.readouterr()
    assert "submitted 2 runs of world_size 1 as SLURM job array" in printed.out
    assert "submitit" not in printed.out  # submitit's log is not trickbench's output
    ids = job_ids(out)
    # Again: nothing submitted, nothing collected twice.
    assert slurm_run(path, out, "--wait") == 0
    assert "resuming: 2 of 2 runs" in capsys.readouterr().out and job_ids(out) == ids
    assert main(["collect", str(out)]) == 0 and "nothing new" in capsys.readouterr().out
    # The sequential runner with the task's one thread: the same runs, the same losses to the bit.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(["run", str(path), "--out", str(sequential)]) == 0
    cluster_rows, sequential_rows = read_rows(out / "cells.jsonl"), read_rows(sequential / "cells.jsonl")
    assert keys(cluster_rows) == keys(sequential_rows) and len(cluster_rows) == 2
    losses = {(r["cell_id"], r["seed"]): r["final_train_loss"] for r in sequential_rows}
    assert all(r["final_train_loss"] == losses[r["cell_id"], r["seed"]] for r in cluster_rows)
    assert {r["executor"] for r in cluster_rows} == {"slurm"}


def test_two_runs_on_one_folder_during_an_array_submit_each_run_once(write_matrix, tmp_path, capsys,
                                                                     cancel_afterwards):
    path = write_matrix(matrix_text(seeds="[0, 1]", axes="accumulation: [1]"))
    out = tmp_path / "out"
    cancel_afterwards.append(out)
    assert slurm_run(path, out, "--slurm", "array_parallelism=1") == 0
    ids = job_ids(out)
    assert slurm_run(path, out, "--slurm", "array_parallelism=1") == 0  # while the array is in flight
    assert "2 runs are queued or running already: not submitted again" in capsys.readouterr().out
    assert job_ids(out) == ids
    assert slurm_run(path, out, "--wait", "--timeout", "240") == 0
    rows = read_rows(out / "cells.jsonl")
    assert len(rows) == 2 and {r["status"] for r in rows} == {"ok"} and len({(r["cell_id"], r["seed"]) for r in rows}) == 2
    assert logs(out, "_log.out").count("Loading pickle") == 2  # two tasks ran, no duplicate


def test_a_cancelled_pending_task_is_lost_then_resubmitted(write_matrix, tmp_path, capsys, grace, cancel_afterwards):
    path = write_matrix(matrix_text(seeds="[0, 1]", axes="accumulation: [1]"))
    out = tmp_path / "out"
    cancel_afterwards.append(out)
    cancelled = []

    def cancel_the_pending_task() -> None:  # while `run --wait` waits: no accounting will ever know it
        if wait_for(lambda: (out / "cluster" / "jobs.json").is_file(), 60):
            pending = sorted(job_ids(out))[1]
            subprocess.run(["scancel", pending], check=True)
            cancelled.append(pending)

    helper = threading.Thread(target=cancel_the_pending_task)
    helper.start()
    started = time.monotonic()
    code = slurm_run(path, out, "--slurm", "array_parallelism=1", "--wait", "--timeout", "240")
    helper.join()
    assert cancelled and code == 1 and time.monotonic() - started < 200  # --wait returned, one run missing
    printed = capsys.readouterr().out
    assert "1 not run" in printed and "lost: cell" in printed
    assert main(["status", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"{out}: 1 done, 1 lost of 2 runs")
    assert slurm_run(path, out, "--wait", "--timeout", "240") == 0  # resubmits the lost run only
    assert "submitted 1 run of world_size 1 as SLURM job " in capsys.readouterr().out
    rows = read_rows(out / "cells.jsonl")
    assert len(rows) == 2 and {r["status"] for r in rows} == {"ok"}


def test_each_task_gets_the_cpus_its_ranks_need_and_threads_from_them(write_matrix, tmp_path, capsys,
                                                                        cancel_afterwards):
    shared, whole = tmp_path / "shared", tmp_path / "whole"
    cancel_afterwards += [shared, whole]
    assert slurm_run(write_matrix(matrix_text(axes="world_size: [1, 2]")), shared) == 0
    assert slurm_run(write_matrix(matrix_text(axes="accumulation: [1]"), "x.yaml"), whole,
                     "--slurm", "exclusive=true", "--wait", "--timeout", "240") == 0
    assert slurm_run(write_matrix(matrix_text(axes="world_size: [1, 2]")), shared, "--wait", "--timeout", "240") == 0
    rows = {r["config"]["world_size"]: r for r in read_rows(shared / "cells.jsonl")}
    assert {w: (r["status"], r["env"]["cpus"], r["env"]["torch_threads"]) for w, r in rows.items()} == \
        {1: ("ok", 1, 1), 2: ("ok", 2, 1)}  # W=2: two CPUs, one thread per rank
    assert all(r.get("shared_timing") is True for r in rows.values())  # other jobs may share the node
    [alone] = read_rows(whole / "cells.jsonl")
    assert alone["status"] == "ok" and "shared_timing" not in alone  # --slurm exclusive=true: a whole node


def test_requeue_sigusr2_and_preemption_each_end_in_one_ok_row(write_matrix, tmp_path, capsys, cancel_afterwards):
    """Two runs in the preemptible partition: `scontrol requeue` stops one, SIGUSR2 the other (as
    SLURM sends it before a time limit); when both run again, a job in `high` that needs the whole
    node preempts both (SIGTERM to every process). Each run ends with exactly one ok row."""
    path = write_matrix(matrix_text(steps=2500, seeds="[0, 1]", axes="accumulation: [1]"))
    out = tmp_path / "out"
    cancel_afterwards.append(out)
    work = out / "cluster" / "work"

    def attempts_training(attempt: int) -> bool:
        return len(list(work.glob(f"*.{attempt}/*.job.json"))) == 2

    assert slurm_run(path, out, "--slurm", "partition=low") == 0
    first, second = sorted(job_ids(out))
    assert wait_for(lambda: attempts_training(0))
    subprocess.run(["scontrol", "requeue", first], check=True)
    subprocess.run(["scancel", "--signal=USR2", second], check=True)
    assert wait_for(lambda: attempts_training(1), 90)
    high = subprocess.run(["sbatch", "--parsable", "--partition=high", "--cpus-per-task=2", "--output=/dev/null",
                           "--wrap", "sleep 1"], check=True, capture_output=True, text=True).stdout.strip()
    try:
        assert slurm_run(path, out, "--wait", "--timeout", "240") == 0
    finally:
        subprocess.run(["scancel", high], capture_output=True)
    rows = read_rows(out / "cells.jsonl")
    assert len(rows) == 2 and {r["status"] for r in rows} == {"ok"}, [r.get("error") for r in rows]
    assert sorted(r["requeued"] for r in rows) == [2, 2]  # each was stopped twice, and ran a third time
    errors, output = logs(out, "_log.err"), logs(out, "_log.out")
    assert errors.count("Exited with exit code 75") >= 3  # the worker's "stopped, run again"
    assert "DUE TO PREEMPTION" in errors and "Requeued job" in output  # SIGUSR2: the task requeued itself
    assert not list(work.iterdir())  # every attempt's work folder is gone


def test_the_scripts_stop_leaves_no_process_and_no_job():
    """Last: stop the cluster with a job running, check nothing is left, start it again."""
    if os.geteuid() != 0:
        pytest.skip("stopping and starting the cluster needs root")
    job = subprocess.run(["sbatch", "--parsable", "--output=/dev/null", "--wrap", "sleep 317"],
                         check=True, capture_output=True, text=True).stdout.strip()
    assert wait_for(lambda: subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                                           text=True).stdout.strip() == "RUNNING", 60)
    stopped = subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, text=True, timeout=120)
    try:
        assert stopped.returncode == 0, stopped.stderr
        left = [subprocess.run(["pgrep", "-a", "-x", name], capture_output=True, text=True).stdout
                for name in ("slurmctld", "slurmd", "slurmstepd")]
        left += [subprocess.run(["pgrep", "-a", "-f", pattern], capture_output=True, text=True).stdout
                 for pattern in (f"munged --socket={STATE_DIR}/", "^sleep 317$")]
        assert "".join(left).strip() == "", left
    finally:
        assert subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, timeout=180).returncode == 0
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip() == ""
