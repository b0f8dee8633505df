"""One task of a cluster array: one (cell, seed), trained like the sequential runner trains it.

A task writes the run's row as a file of its own (``<out>/runs/<cell_id>-<seed>.json``, by
rename) and nothing else the submitting side reads. A task that finds that file already written
returns it without training, so a resubmitted or requeued task never runs a finished run twice.

A scheduler's signal is not a failure of the run. SLURM sends SIGTERM to every process of the
job when it preempts or requeues it (or cancels it), and SIGUSR2 before the time limit (or when
asked, ``scancel --signal=USR2``). The task and its worker both take it as "stop and run again":
the worker exits with :data:`bench.training.worker.STOPPED_EXIT` and writes no row, the task
writes no row for the attempt. After SIGUSR2 the task asks to be requeued itself (submitit's
checkpoint protocol: :class:`RunTask` is ``Checkpointable``; ``checkpoint`` resubmits the same
call); after SIGTERM SLURM has already decided (a preemption or a requeue puts the job back in
the queue; a cancelled run is ``lost`` and the next ``trickbench run`` resubmits it). A run
stopped more than ``max_requeues`` times gets a failed row that says so, in one line.

Each attempt trains in a work folder of its own (``cluster/work/<cell>-<seed>.<job>.<attempt>``),
never one another task might be using.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Callable

from bench.config.train_config import TrainConfig
from bench.execution.children import Job, signal_group, worker_command, write_job
from bench.execution.cluster import CLUSTER_DIR, WORK, read_run_file, run_file
from bench.parts.distributed import threads_per_rank
from bench.store.files import make_folder, refuse_linked_folders, write_atomic
from bench.store.results import Row
from bench.training.worker import SCHEDULER_SIGNALS, STOPPED_EXIT

try:  # submitit is needed to submit; without it the rest of this module still imports
    from submitit.helpers import Checkpointable
except ImportError:  # pragma: no cover
    Checkpointable = object  # type: ignore[misc,assignment]


def attempt_tag() -> tuple[str, int]:
    """(this job's id, this attempt's number from 0): SLURM's ids and requeue count, else the pid."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return f"pid{os.getpid()}", 0
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    return f"job{job}", int(restarts) if restarts.isdigit() else 0


def allocation_environment(env: dict[str, str] | None, world_size: int) -> dict[str, str]:
    """The worker's environment with threads sized from this task's CPUs, not the node's cores
    (world_size > 1: ``worker_command`` already divides them among the ranks)."""
    env = dict(os.environ if env is None else env)
    if world_size == 1:
        env["OMP_NUM_THREADS"] = str(threads_per_rank(1))
    return env


class RunTask(Checkpointable):
    """One (cell, seed) as a submitit task. Plain data only, so it pickles to the compute node.

    ``stops``: the signals that stopped earlier attempts (carried through ``checkpoint``).
    ``shared_timing``: the task does not have its node to itself; its row says so.
    """

    # defaults for a task pickled by an older trickbench (requeued after an upgrade)
    max_requeues, shared_timing, stops = 3, False, ()

    def __init__(self, out_dir: str, matrix: str, cell_id: str, seed: int, axes: dict[str, Any],
                 config: dict[str, Any], retry_failed: bool = False, max_requeues: int = 3,
                 shared_timing: bool = False) -> None:
        self.out_dir, self.matrix, self.cell_id, self.seed = out_dir, matrix, cell_id, seed
        self.axes, self.config, self.retry_failed = axes, config, retry_failed
        self.max_requeues, self.shared_timing = max_requeues, shared_timing
        self.stops: tuple[str, ...] = ()

    def __call__(self) -> Row:
        target = run_file(Path(self.out_dir), self.cell_id, self.seed)
        done = read_run_file(target)
        if done is not None and (done["status"] == "ok" or not self.retry_failed):
            return done  # finished before (a resubmitted or requeued task): never run twice
        job_id, restarts = attempt_tag()
        attempt = max(restarts, len(self.stops))
        work = self._work_folder(job_id, attempt)
        try:
            row, stopped_by, on_usr2 = self._train(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if stopped_by is not None:
            row = self._stopped(row, stopped_by, attempt, job_id, on_usr2)
        row["executor"] = os.environ.get("SUBMITIT_EXECUTOR", "submitit")
        if attempt:
            row["requeued"] = attempt  # attempts stopped by the scheduler before this one
        if self.shared_timing:
            row["shared_timing"] = True
        make_folder(target.parent, root=Path(self.out_dir))  # never through a linked runs/
        write_atomic(target, json.dumps(row, default=str), root=Path(self.out_dir))  # whole row or none
        return row

    def _work_folder(self, job_id: str, attempt: int) -> Path:
        """This attempt's folder; earlier attempts of the same job are over (SLURM restarts a job only
        after its processes are gone), so what they left is removed. Other jobs' folders stay."""
        root = Path(self.out_dir) / CLUSTER_DIR / WORK
        stem = f"{self.cell_id}-{self.seed}.{job_id}"
        for old in root.glob(f"{stem}.*"):
            shutil.rmtree(old, ignore_errors=True)
        work = root / f"{stem}.{attempt}"
        refuse_linked_folders(work / "job.json", Path(self.out_dir))  # never write through a linked cluster/
        work.mkdir(parents=True)
        return work

    def _train(self, work: Path) -> tuple[Row, str | None, Callable[..., Any] | None]:
        """Train in a child: (its row, the scheduler signal that stopped it or None, the handler
        SIGUSR2 had before: submitit's, which checkpoints and requeues)."""
        config = TrainConfig.from_dict(self.config, file="<job>")
        job_path = write_job(work, self.matrix, self.cell_id, self.seed, self.axes, self.config)
        command, env = worker_command(config, job_path, f"{self.cell_id}-{self.seed}-{os.getpid()}")
        caught: list[str] = []
        running: list[Job] = []

        def on_signal(signum: int, frame: Any) -> None:  # every process of the job gets it; pass it on anyway
            caught.append(signal.Signals(signum).name)
            for job in running:
                signal_group(job.proc.pid, signal.SIGTERM)

        previous = {signum: signal.signal(signum, on_signal) for signum in SCHEDULER_SIGNALS}
        try:
            job = Job.start(job_path, command, allocation_environment(env, config.world_size),
                            config.time_limit_s, fork_here=True)
            running.append(job)
            if caught:  # arrived while the child was being started
                signal_group(job.proc.pid, signal.SIGTERM)
            row = job.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        # A run that finished before the signal keeps its row; any other outcome is the signal's.
        stopped_by = None if row["status"] == "ok" else (caught[0] if caught else row.get("stopped_by"))
        usr2 = previous.get(signal.SIGUSR2)
        return row, stopped_by, usr2 if callable(usr2) else None

    def _stopped(self, row: Row, signame: str, attempt: int, job_id: str,
                 on_usr2: Callable[..., Any] | None) -> Row:
        """A stopped attempt: no row, and run again; past ``max_requeues``, a failed row saying so."""
        self.stops = (*self.stops, signame)
        if attempt >= self.max_requeues:
            row = {key: value for key, value in row.items() if key != "stopped_by"}
            row["error"] = (f"stopped by the scheduler {attempt + 1} times, last by {signame} ({job_id}); "
                            f"not requeued again (max_requeues={self.max_requeues})")
            return row
        if signame == "SIGUSR2" and on_usr2 is not None:
            on_usr2(signal.SIGUSR2, None)  # submitit: checkpoint() (this task, its stops), requeue, exit
        raise SystemExit(STOPPED_EXIT)  # SIGTERM: SLURM requeues it (preemption, requeue) or it was cancelled
