"""One run in a child process: its job file, the command that starts it (the worker, or torchrun
with W ranks), its time limit, and stopping it and every process under it."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.config.matrix import Cell, Matrix
from bench.config.train_config import TrainConfig
from bench.execution import forkserver
from bench.parts import lifeline
from bench.parts.distributed import threads_per_rank
from bench.store.results import (
    Row,
    RunRecord,
    row_problem,
    write_atomic,
)
from bench.training.worker import STOPPED_EXIT, stopped_marker

WORKER = [sys.executable, "-m", "bench.training.worker"]  # + the job file
THIS_WORKER = tuple(WORKER)  # a test may point WORKER elsewhere; only this command is forked
# How a world_size 1 run of this tree starts: fork (from the warm fork server, the default) or exec
# (a fresh interpreter, as before; kept to measure the difference, see tests/test_startup.py).
START = os.environ.get("TRICKBENCH_START", "fork")


LAUNCHER = [sys.executable, "-m", "torch.distributed.run"]  # torchrun, for world_size > 1


STOP_GRACE_S = 40  # for torchrun to stop its ranks: SIGTERM, then SIGKILL after its own 30 s


def worker_command(config: TrainConfig, job_path: Path, run_id: str) -> tuple[list[str], dict[str, str] | None]:
    """(command, environment) of one run: the worker alone, or under torchrun once per rank."""
    if config.world_size == 1:
        return [*WORKER, str(job_path)], None
    launcher = config.launcher
    per_node = config.world_size // launcher.nnodes
    if launcher.nnodes == 1:
        where = ["--standalone"]  # rendezvous on this machine, on a free port
    else:  # every node runs this same command; the id must differ between runs, not between nodes
        where = ["--nnodes", str(launcher.nnodes), "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", launcher.rdzv_endpoint, "--rdzv-id", f"{launcher.rdzv_id}-{run_id}"]
    command = [*LAUNCHER, *where, "--nproc-per-node", str(per_node), "-m", "bench.training.worker", str(job_path)]
    # Each rank gets its share of the cores (torchrun would otherwise set 1 thread per rank).
    return command, {**os.environ, "OMP_NUM_THREADS": str(threads_per_rank(per_node))}


def stop(proc: subprocess.Popen) -> None:
    """End a child and everything it started (see :func:`stop_all`)."""
    stop_all([proc])


def stop_all(procs: list[subprocess.Popen]) -> None:
    """End children and everything they started, all within one grace period.

    SIGTERM first: torchrun answers it by stopping its ranks, which it starts in sessions of their
    own where killpg cannot reach them. Then SIGKILL to whatever is left of each child's group.
    Ctrl-C and SIGTERM wait until this is done: an interrupted stop would leave children running.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        for proc in procs:
            signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for proc in procs:
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def signal_group(pid: int, signum: int) -> None:
    """Signal a child's process group; the child alone if it has none yet (a forked run that has
    not reached its ``setsid``)."""
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _arm_death_signal() -> None:
    """In the child before exec: SIGTERM when the runner dies, even by SIGKILL (torchrun then stops
    its ranks; a worker re-arms it as SIGKILL for itself)."""
    lifeline.die_with_parent(signal.SIGTERM)


def run_in_child(matrix: Matrix, cell: Cell, seed: int, work_dir: Path) -> Row:
    """Train one (cell, seed) in a fresh interpreter (one per rank); always returns a row."""
    job = start_run(matrix, cell, seed, work_dir, extra_env={}, machine_env=None)
    return job.wait()


def start_run(matrix: Matrix, cell: Cell, seed: int, work_dir: Path, extra_env: dict[str, str],
              machine_env: dict[str, Any] | None) -> "Job":
    """Start one (cell, seed) in its own child with ``extra_env`` (its devices) on top of ours."""
    job_path = write_job(work_dir, matrix.name, cell.cell_id, seed, cell.axes, cell.config.to_dict(),
                         env=machine_env)
    command, env = worker_command(cell.config, job_path, f"{cell.cell_id}-{seed}")
    if extra_env:
        env = {**(env or os.environ), **extra_env}
    return Job.start(job_path, command, env, cell.config.time_limit_s)


def write_job(work_dir: Path, matrix: str, cell_id: str, seed: int, axes: dict[str, Any],
              config: dict[str, Any], tag: str = "", env: dict[str, Any] | None = None) -> Path:
    """The job file a worker reads (``python -m bench.training.worker JOB``): what to train, where the row goes.
    ``env``: the machine as the runner sees it, for a row the runner writes when the child leaves none."""
    stem = f"{cell_id}-{seed}{tag}"
    job = {"matrix": matrix, "cell_id": cell_id, "seed": seed, "axes": axes, "config": config,
           "row_path": str(work_dir / f"{stem}.row.json"), "runner_pid": os.getpid(), "env": env,
           "written_at": time.time()}  # the run's start, as its worker measures it (row phase_s.start)
    job_path = work_dir / f"{stem}.job.json"
    write_atomic(job_path, json.dumps(job))
    return job_path


def run_job_file(job_path: Path, command: list[str], env: dict[str, str] | None, limit: float) -> Row:
    """Run the worker ``command`` on a job file; its row, or a failed row if it left none."""
    return Job.start(job_path, command, env, limit).wait()


@dataclass
class Job:
    """One run's child process, from its start until its row is collected."""

    proc: subprocess.Popen
    record: RunRecord  # for a row the runner writes itself
    row_path: Path
    started: float
    limit: float

    @classmethod
    def start(cls, job_path: Path, command: list[str], env: dict[str, str] | None, limit: float,
              fork_here: bool = False) -> "Job":
        """``fork_here``: fork a world_size-1 run from this process, not the fork server
        (:func:`bench.execution.forkserver.start`)."""
        job = json.loads(job_path.read_text(encoding="utf-8"))
        record = RunRecord.for_job(job)
        record.env = job.get("env")
        record.start()
        started = time.monotonic()  # the run's time limit and its total include its start
        if command == [*THIS_WORKER, str(job_path)] and START != "exec":  # this tree's worker: fork it, warm
            proc = forkserver.start(job_path, env, here=fork_here)
        else:  # torchrun, or another revision's worker (compare --against): a fresh interpreter
            # Own process group, so a timeout kills the child and anything it started.
            proc = subprocess.Popen(command, start_new_session=True, env=env, preexec_fn=_arm_death_signal)
        return cls(proc, record, Path(job["row_path"]), started, limit)

    @property
    def deadline(self) -> float:
        return self.started + self.limit

    def wait(self) -> Row:
        """Block until the child ends or overruns; its row. Ctrl-C stops the child too."""
        try:
            while True:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
                if (row := self.collect()) is not None:
                    return row
        except BaseException:  # Ctrl-C or a kill of the parent: take the child down too
            stop(self.proc)
            raise

    def collect(self) -> Row | None:
        """The row of a child that has ended (an overrunning child is stopped first); None while
        it still runs within its time limit."""
        code = self.proc.poll()
        if code is None:
            if time.monotonic() < self.deadline:
                return None
            stop(self.proc)
            failure = ("timeout", f"exceeded time_limit_s={self.limit:g}")
        else:
            failure = None if code == 0 else _describe_exit(code)
        rows = rows_written(self.row_path)
        # The first rank to fail names the cause (those after it mostly report a peer that went away),
        # and says more than the exit code of the launcher that stopped the others.
        failed_rows = [r for r in rows if r["status"] != "ok"]
        if failed_rows:
            return failed_rows[0]
        stopped = _stop_signal(self.row_path)
        if stopped is not None and failure is not None and failure[0] != "timeout":
            # a signal from outside (a scheduler's; our own stop at a time limit aside), not a
            # failure of the run: the worker left no row, only the marker
            self.record.fail("error", f"stopped by {stopped} (a scheduler's preemption, requeue or cancel, "
                             "or a kill from outside); run it again")
            self.record.finish(time.monotonic() - self.started)
            return {**self.record.to_row(), "stopped_by": stopped}
        if failure is None and rows:
            return rows[0]
        status, error = failure or ("error", "child exited without writing a row")
        self.record.fail(status, error)
        self.record.finish(time.monotonic() - self.started)
        return self.record.to_row()


def rows_written(row_path: Path) -> list[Row]:
    """The rows written for one run, oldest first: rank 0's and those of other ranks that failed
    (``row_path.rankR``). A rank writes its row before it exits, so before any failure it causes."""
    paths = [p for p in [row_path, *row_path.parent.glob(f"{row_path.name}.rank*")] if p.is_file()]
    rows = []
    for path in sorted(paths, key=lambda p: p.stat().st_mtime_ns):
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            row = json.loads(path.read_text(encoding="utf-8"))
            if row_problem(row) is None:
                rows.append(row)
    return rows


def _stop_signal(row_path: Path) -> str | None:
    """The signal named by a stopped worker's marker (any rank's), or None."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return stopped_marker(row_path).read_text(encoding="utf-8").strip() or "a signal"
    return None


def _describe_exit(code: int) -> tuple[str, str]:
    if code == STOPPED_EXIT:
        return ("error", f"child stopped by a scheduler signal (exit code {STOPPED_EXIT})")
    if code < 0:
        name = signal.Signals(-code).name
        # The kernel's OOM killer sends SIGKILL; without a row we cannot tell it from other kills.
        return ("error", f"child killed by {name}")
    return ("error", f"child exited with code {code}")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
