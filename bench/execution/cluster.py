"""Runs a matrix through submitit: a SLURM job array, or submitit's local executor (for tests).

One task of the array = one (cell, seed) run. A task trains exactly as the sequential runner
does (``runner.worker_command``: the worker alone, or torchrun with W ranks inside the job) and
writes its row as its own file, by rename: ``<out>/runs/<cell_id>-<seed>.json``. Nothing here
locks a file on the shared filesystem (``flock`` over NFS is unreliable); the submitting host
merges the run files into ``cells.jsonl`` (``collect``: a row already there is not added again).

A preempted or timed-out task is requeued through submitit's checkpointing protocol
(:class:`RunTask` is ``Checkpointable``): the run starts again from its first step, since a
half-measured run cannot be resumed. A task that finds its run file already written returns it
without training, so a resubmitted array skips finished runs. The executor and its settings are
not part of a cell's config, so they never change a ``cell_id``.

Folder layout beside ``cells.jsonl``: ``runs/`` (one row per run), ``cluster/jobs.json`` (job
ids, for ``trickbench status``), ``cluster/submitit/`` (submitit's pickles and logs) and
``cluster/work/`` (job files of runs in progress).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from bench.base.errors import ConfigError
from bench.base.safeyaml import shorten
from bench.config.matrix import Matrix
from bench.config.slurm import (
    SETTING_RANGES,
    ClusterSettings,
    parse_overrides,
    parse_settings,
)
from bench.config.train_config import TrainConfig
from bench.execution.children import run_job_file, worker_command, write_job
from bench.store.files import make_folder, read_optional_json, refuse_linked_folders
from bench.store.results import (
    CSV_FILE,
    ROWS_FILE,
    Row,
    StoreError,
    append_row,
    end_torn_row,
    latest_runs,
    read_rows,
    refuse_link,
    row_problem,
    write_atomic,
    write_csv,
)

MAX_RUN_FILE_BYTES = 16 << 20  # one row: its curve and step times are the bulk

RUNS_DIR = "runs"
CLUSTER_DIR = "cluster"
JOBS_FILE = "jobs.json"
EXECUTORS = ["sequential", "slurm", "local"]  # local: submitit.LocalExecutor, a cluster on this machine
START_UP_MIN = 10  # added to the longest time_limit_s for a task's default SLURM time limit
POLL_S = 1.0


# --- settings (bench.config.slurm) -------------------------------------------------------------------------------------------


def settings_for(matrix: Matrix, overrides: list[str]) -> ClusterSettings:
    """The matrix's ``slurm:`` section with the command line's pairs merged over it, validated."""
    raw = dict(matrix.slurm or {})
    for key, value in parse_overrides(overrides).items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) \
            else value
    return parse_settings(raw, "--slurm" if overrides else matrix.file)


@contextlib.contextmanager
def compute_node_view(executor: str) -> Iterator[None]:
    """Validate a matrix for ``--executor slurm`` as on a GPU node, not as on this login node.

    Device checks (``device: auto``/``cuda``, one GPU per rank) ask torch what is visible here;
    the runs happen on nodes that have GPUs. Inside this block torch reports CUDA with as many
    devices as any task may ask for; ``check_fits`` then holds each run to ``gpus_per_node``.
    ``device: auto`` thus means cuda on a cluster: CPU runs say ``device: cpu`` (or ``--device cpu``).
    """
    if executor != "slurm":
        yield
        return

    saved = torch.cuda.is_available, torch.cuda.device_count
    torch.cuda.is_available, torch.cuda.device_count = (lambda: True), (lambda: SETTING_RANGES["gpus_per_node"][1])
    try:
        yield
    finally:
        torch.cuda.is_available, torch.cuda.device_count = saved


# --- what each array asks for ------------------------------------------------------------------------------

def task_minutes(settings: ClusterSettings, matrix: Matrix) -> int:
    """A task's time limit: the setting, or the longest run's own limit plus start-up time."""
    if settings.time_limit_min is not None:
        return settings.time_limit_min
    longest_s = max(cell.config.time_limit_s for cell in matrix.cells)
    return math.ceil(longest_s / 60) + START_UP_MIN


def check_fits(settings: ClusterSettings, matrix: Matrix, file: str) -> None:
    """Refuse, before submitting, runs a task cannot hold: more ranks than a node's GPUs, several
    nodes, or a run limit longer than the task's."""
    minutes = task_minutes(settings, matrix)
    for cell in matrix.cells:
        config = cell.config
        if config.launcher.nnodes > 1:
            raise ConfigError(file, f"axes ({cell.label()})", "launcher.nnodes > 1 is not supported with "
                              "--executor slurm (one task = one node); allowed: nnodes 1")
        if config.device == "cuda" and config.world_size > settings.gpus_per_node:
            raise ConfigError(file, "slurm.gpus_per_node", f"{settings.gpus_per_node} GPUs cannot hold world_size "
                              f"{config.world_size} of cell {cell.cell_id} (one GPU per rank, one node per task)")
        if config.time_limit_s > minutes * 60:
            raise ConfigError(file, "slurm.time_limit_min", f"{minutes} min is shorter than time_limit_s "
                              f"{config.time_limit_s:g} of cell {cell.cell_id}; raise it or leave it unset")


def executor_parameters(settings: ClusterSettings, kind: str, name: str, world_size: int, device: str,
                        minutes: int) -> dict[str, Any]:
    """submitit ``AutoExecutor.update_parameters`` arguments for the array of world_size-W runs.

    One node and one task per run; the task starts the W ranks itself (torchrun), so it asks
    for W GPUs on that node.
    """
    parallelism = settings.array_parallelism or (1 if kind == "local" else 256)
    params: dict[str, Any] = {"name": f"trickbench-{name}", "timeout_min": minutes, "nodes": 1,
                              "tasks_per_node": 1, "cpus_per_task": settings.cpus_per_task,
                              "mem_gb": settings.mem_gb}
    if device == "cuda":
        params["gpus_per_node"] = world_size
    if kind == "slurm":
        params.update(slurm_partition=settings.partition, slurm_array_parallelism=parallelism,
                      slurm_additional_parameters=dict(settings.sbatch) or None,
                      slurm_setup=list(settings.setup) or None)
    else:
        params["local_setup"] = list(settings.setup) or None
    return {k: v for k, v in params.items() if v is not None}


def make_executor(kind: str, folder: Path, settings: ClusterSettings, params: dict[str, Any]):
    # lazy: submitit is needed only with --executor slurm|local
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster=kind, slurm_max_num_timeout=settings.max_requeues) \
        if kind == "slurm" else submitit.AutoExecutor(folder=folder, cluster=kind,
                                                      local_max_num_timeout=settings.max_requeues)
    executor.update_parameters(**params)
    return executor


# --- one task ------------------------------------------------------------------------------------------

def run_file(out_dir: Path, cell_id: str, seed: int) -> Path:
    return Path(out_dir) / RUNS_DIR / f"{cell_id}-{seed}.json"


def read_run_file(path: Path) -> Optional[Row]:
    """The row in a run file, or None when there is none or it is not a usable row (the store's
    reader: a FIFO or a device is never opened, the size is bounded, NaN is refused)."""
    with contextlib.suppress(StoreError):
        row = read_optional_json(path, "run file", MAX_RUN_FILE_BYTES)
        if row is not None and row_problem(row) is None:
            return row
    return None


try:  # submitit is needed to submit; without it the rest of this module (collect, status) still works
    from submitit.helpers import Checkpointable
except ImportError:  # pragma: no cover
    Checkpointable = object  # type: ignore[misc,assignment]


class RunTask(Checkpointable):
    """One (cell, seed) as a submitit task: train in a child like the sequential runner, write the
    row file. Plain data only, so it pickles to the compute node. Requeue: submitit calls
    ``checkpoint()`` on preemption or timeout (the default re-submits this same call)."""

    def __init__(self, out_dir: str, matrix: str, cell_id: str, seed: int, axes: dict[str, Any],
                 config: dict[str, Any], retry_failed: bool = False) -> None:
        self.out_dir, self.matrix, self.cell_id, self.seed = out_dir, matrix, cell_id, seed
        self.axes, self.config, self.retry_failed = axes, config, retry_failed

    def __call__(self) -> Row:
        target = run_file(Path(self.out_dir), self.cell_id, self.seed)
        done = read_run_file(target)
        if done is not None and (done["status"] == "ok" or not self.retry_failed):
            return done  # finished before (a resubmitted or requeued task): never run twice
        work = Path(self.out_dir) / CLUSTER_DIR / "work" / f"{self.cell_id}-{self.seed}"
        refuse_linked_folders(work / "job.json", Path(self.out_dir))  # never write through a linked cluster/
        shutil.rmtree(work, ignore_errors=True)  # what a killed attempt left
        work.mkdir(parents=True)
        config = TrainConfig.from_dict(self.config, file="<job>")
        job = write_job(work, self.matrix, self.cell_id, self.seed, self.axes, self.config)
        command, env = worker_command(config, job, f"{self.cell_id}-{self.seed}-{os.getpid()}")
        row = run_job_file(job, command, env, config.time_limit_s)
        row["executor"] = os.environ.get("SUBMITIT_EXECUTOR", "submitit")
        make_folder(target.parent, root=Path(self.out_dir))
        write_atomic(target, json.dumps(row, default=str), root=Path(self.out_dir))  # a reader sees the whole row or none
        shutil.rmtree(work, ignore_errors=True)
        return row


# --- collecting --------------------------------------------------------------------------------------------

def _same(a: Row, b: Row) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def collect(out_dir: Path) -> list[Row]:
    """Append to ``cells.jsonl`` every run file's row not already there; return the rows added.

    Idempotent: collecting twice adds nothing the second time. A rerun's newer row is a different
    row and is added (the newest row of a (cell, seed) counts)."""
    out_dir = Path(out_dir)
    rows_path = out_dir / ROWS_FILE
    for name in (ROWS_FILE, CSV_FILE):
        refuse_link(out_dir / name)
    existing = latest_runs(read_rows(rows_path))
    added = []
    for path in sorted((out_dir / RUNS_DIR).glob("*.json")):
        row = read_run_file(path)
        if row is None:
            print(f"warning: {path}: not a results row; skipped", file=sys.stderr)
            continue
        known = existing.get((row["cell_id"], row["seed"]))
        if known is not None and _same(known, row):
            continue
        if not added:
            end_torn_row(rows_path)
        append_row(rows_path, row)
        existing[row["cell_id"], row["seed"]] = row
        added.append(row)
    if added or not (out_dir / CSV_FILE).exists():
        write_csv(read_rows(rows_path, warn=False), out_dir / CSV_FILE)
    return added


# --- job ids -----------------------------------------------------------------------------------------------

def read_jobs(out_dir: Path) -> dict[str, Any]:
    path = Path(out_dir) / CLUSTER_DIR / JOBS_FILE
    record = read_optional_json(path, "job record")
    if record is None:
        return {"executor": None, "folder": None, "runs": {}}
    if not isinstance(record, dict) or not isinstance(record.get("runs"), dict):
        raise StoreError(f"{path}: not a job record (no 'runs' mapping)")
    if record.get("executor") not in (None, "slurm", "local") or not isinstance(record.get("folder"), (str, type(None))):
        raise StoreError(f"{path}: 'executor' is not slurm or local, or 'folder' is not a path")
    for key, job in record["runs"].items():
        if not (isinstance(job, dict) and isinstance(job.get("job_id"), str) and isinstance(job.get("submitted_at"), str)):
            raise StoreError(f"{path}: runs.{shorten(key, 40)[1:-1]}: expected {{job_id: string, submitted_at: string}}")
    return record


def record_jobs(out_dir: Path, kind: str, folder: Path, jobs: dict[str, str]) -> None:
    """Remember which job runs which (cell, seed): ``status`` asks the scheduler about them."""
    record = read_jobs(out_dir)
    if record.get("executor") not in (None, kind):
        record["runs"] = {}  # ids of another executor mean nothing to this one
    record.update(executor=kind, folder=str(folder))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    record["runs"].update({key: {"job_id": job_id, "submitted_at": stamp} for key, job_id in jobs.items()})
    make_folder(Path(out_dir) / CLUSTER_DIR, root=Path(out_dir))
    write_atomic(Path(out_dir) / CLUSTER_DIR / JOBS_FILE, json.dumps(record, indent=1), root=Path(out_dir))
