"""Runs a matrix through submitit: a SLURM job array, or submitit's local executor (for tests).

One task of the array = one (cell, seed) run (:class:`bench.execution.task.RunTask`). A task
trains exactly as the sequential runner does (the worker alone, or torchrun with W ranks inside
the job) and writes its row as its own file, by rename: ``<out>/runs/<cell_id>-<seed>.json``.
Nothing here locks a file on the shared filesystem (``flock`` over NFS is unreliable); the
submitting host merges the run files into ``cells.jsonl`` (``collect``: a row already there is
not added again).

The truth of a run is its run file; what is pending or running is what ``squeue`` lists
(:mod:`bench.execution.queue`), never accounting (``sacct`` needs slurmdbd, and forgets).
This module holds what an array asks for (time, CPUs, GPUs, whole nodes), the refusal of a
request sbatch would refuse (``sbatch --test-only``, before anything is written), the run files
and the job record. The executor and its settings are not part of a cell's config, so they never
change a ``cell_id``.

Folder layout beside ``cells.jsonl``: ``runs/`` (one row per run), ``cluster/jobs.json`` (job
ids, for ``trickbench status``), ``cluster/submitit/`` (submitit's pickles and logs) and
``cluster/work/`` (job files of attempts in progress, one folder per attempt).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from bench.base.errors import ConfigError
from bench.base.safeyaml import shorten
from bench.config.matrix import Cell, Matrix
from bench.config.slurm import (
    SETTING_RANGES,
    ClusterSettings,
    parse_overrides,
    parse_settings,
)
from bench.config.train_config import TrainConfig
from bench.store.files import make_folder, read_optional_json
from bench.store.results import (
    CSV_FILE,
    MATRIX_FILE,
    ROWS_FILE,
    Row,
    StoreError,
    append_row,
    end_torn_row,
    latest_runs,
    read_matrix_record,
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
WORK = "work"  # under CLUSTER_DIR: one folder per attempt of a run
EXECUTORS = ["sequential", "slurm", "local"]  # local: submitit.LocalExecutor, a cluster on this machine
START_UP_MIN = 10  # added to the longest time_limit_s for a task's default SLURM time limit
SIGNAL_LEAD_S = 90  # SIGUSR2 this long before a task's time limit (sbatch --signal): stop, requeue
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
    nodes, or a run limit that with the signal lead (SIGUSR2 before the end) exceeds the task's."""
    minutes = task_minutes(settings, matrix)
    for cell in matrix.cells:
        config = cell.config
        if config.launcher.nnodes > 1:
            raise ConfigError(file, f"axes ({cell.label()})", "launcher.nnodes > 1 is not supported with "
                              "--executor slurm (one task = one node); allowed: nnodes 1")
        if config.device == "cuda" and config.world_size > settings.gpus_per_node:
            raise ConfigError(file, "slurm.gpus_per_node", f"{settings.gpus_per_node} GPUs cannot hold world_size "
                              f"{config.world_size} of cell {cell.cell_id} (one GPU per rank, one node per task)")
        if config.time_limit_s + SIGNAL_LEAD_S > minutes * 60:
            raise ConfigError(file, "slurm.time_limit_min", f"{minutes} min is shorter than time_limit_s "
                              f"{config.time_limit_s:g} of cell {cell.cell_id} + {SIGNAL_LEAD_S} s (SLURM's "
                              "warning signal before the end); raise it or leave it unset")


def cpus_for(settings: ClusterSettings, config: TrainConfig) -> int:
    """CPUs of one task: the setting, or what the run's ranks need (threads and loader workers)."""
    if settings.cpus_per_task is not None:
        return settings.cpus_per_task
    return config.world_size * (settings.threads_per_rank + config.num_workers)


def arrays_of(runs: list[tuple[Cell, int]], settings: ClusterSettings) -> dict[tuple[int, int], list[tuple[Cell, int]]]:
    """Runs grouped into job arrays, one per (world_size, CPUs): an array shares one resource request."""
    groups: dict[tuple[int, int], list[tuple[Cell, int]]] = {}
    for cell, seed in runs:
        groups.setdefault((cell.config.world_size, cpus_for(settings, cell.config)), []).append((cell, seed))
    return groups


def executor_parameters(settings: ClusterSettings, kind: str, name: str, world_size: int, device: str,
                        minutes: int, cpus: Optional[int] = None) -> dict[str, Any]:
    """submitit ``AutoExecutor.update_parameters`` arguments for an array of world_size-W runs.

    One node and one task per run; the task starts the W ranks itself (torchrun), so it asks
    for W GPUs on that node, and ``cpus`` CPUs (SLURM; the local executor takes the setting only).
    """
    parallelism = settings.array_parallelism or (1 if kind == "local" else 256)
    params: dict[str, Any] = {"name": f"trickbench-{name}", "timeout_min": minutes, "nodes": 1,
                              "tasks_per_node": 1, "cpus_per_task": settings.cpus_per_task,
                              "mem_gb": settings.mem_gb}
    if device == "cuda":
        params["gpus_per_node"] = world_size
    if kind == "slurm":
        params.update(cpus_per_task=cpus or settings.cpus_per_task, slurm_partition=settings.partition,
                      slurm_array_parallelism=parallelism, slurm_signal_delay_s=SIGNAL_LEAD_S,
                      slurm_exclusive=True if settings.exclusive else None,
                      slurm_additional_parameters=dict(settings.sbatch) or None,
                      slurm_setup=list(settings.setup) or None)
    else:
        params["local_setup"] = list(settings.setup) or None
    return {k: v for k, v in params.items() if v is not None}


def make_executor(kind: str, folder: Path, settings: ClusterSettings, params: dict[str, Any]):
    # lazy: submitit is needed only with --executor slurm|local
    import submitit

    _submitit_log_to_stderr()
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=kind, slurm_max_num_timeout=settings.max_requeues) \
            if kind == "slurm" else submitit.AutoExecutor(folder=folder, cluster=kind,
                                                          local_max_num_timeout=settings.max_requeues)
    except RuntimeError as err:  # no srun here: not a SLURM machine
        raise ConfigError("arguments", "--executor slurm", f"{err} (sbatch/srun not found)") from None
    executor.update_parameters(**params)
    return executor


def _submitit_log_to_stderr() -> None:
    """submitit logs everything to stdout and its warnings to stderr too; here (the submitting
    side) only the warnings, on stderr, so stdout says what trickbench did."""
    logger = logging.getLogger("submitit")
    for handler in list(logger.handlers):
        if handler.get_name() == "submitit_out":
            logger.removeHandler(handler)


def sbatch_refusal(text: str) -> Optional[str]:
    """What sbatch says against a batch script, checked without submitting it (``--test-only``), on
    one line; None when it would be accepted. Catches what SLURM accepts and then pends forever
    (more CPUs than a node has) as well as what it refuses (partition, gres, account, limits)."""
    try:
        done = subprocess.run(["sbatch", "--test-only"], input=text, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        return "sbatch not found: not a SLURM login node"
    except subprocess.TimeoutExpired:
        return "sbatch --test-only did not answer within 120 s (is slurmctld up?)"
    if done.returncode == 0:
        return None
    return one_line(done.stderr or done.stdout) or f"sbatch --test-only exited with code {done.returncode}"


def one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def check_with_scheduler(settings: ClusterSettings, matrix: Matrix) -> None:
    """Ask sbatch (``--test-only``) about each array this matrix would submit, before anything is
    written or submitted; ConfigError with sbatch's own words on a refusal."""
    # lazy: submitit is needed only with --executor slurm|local
    from submitit.slurm.slurm import _make_sbatch_string

    minutes = task_minutes(settings, matrix)
    device = matrix.cells[0].config.device
    with tempfile.TemporaryDirectory(prefix="trickbench-sbatch-") as folder:
        for (world_size, cpus), runs in arrays_of(matrix.runs(), settings).items():
            params = executor_parameters(settings, "slurm", matrix.name, world_size, device, minutes, cpus)
            executor = make_executor("slurm", Path(folder), settings, params)
            text = _make_sbatch_string(command="true", folder=folder, map_count=len(runs),
                                       **executor._executor.parameters)
            if (refusal := sbatch_refusal(text)) is not None:
                gpus = params.get("gpus_per_node", 0)
                raise ConfigError(matrix.file, "slurm", f"sbatch refuses the array of world_size {world_size} "
                                  f"({cpus} CPU{'s' * (cpus != 1)}, {gpus} GPU{'s' * (gpus != 1)} per task): {refusal}")


@contextlib.contextmanager
def refusal_leaves_nothing(folder: Path, file: str, what: str) -> Iterator[None]:
    """Submit inside: a refusal of sbatch (or submitit) removes the pickles and scripts submitit
    wrote for it and becomes one ConfigError with sbatch's message; submitit's own printing of it
    is swallowed."""
    new = folder  # the outermost folder this submission creates
    while not new.parent.exists():
        new = new.parent
    before = set(folder.iterdir()) if folder.exists() else None
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    except Exception as err:  # noqa: BLE001 - submitit's FailedJobError and whatever sbatch's failure raised
        if before is None:
            shutil.rmtree(new, ignore_errors=True)
        else:
            for path in set(folder.iterdir()) - before:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        raise ConfigError(file, "slurm", f"sbatch refused {what}: {one_line(str(err)) or type(err).__name__}") \
            from None


# --- run files -------------------------------------------------------------------------------------------

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


# --- collecting --------------------------------------------------------------------------------------------

def _same(a: Row, b: Row) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _older(row: Row, than: Row) -> bool:
    """Whether ``row`` is from before ``than`` (ISO times of one format compare as text)."""
    def when(r: Row) -> str:
        return str(r.get("finished_at") or r.get("started_at") or "")
    return when(row) < when(than)


def collect(out_dir: Path) -> list[Row]:
    """Append to ``cells.jsonl`` every run file's row not already there; return the rows added.

    Idempotent: collecting twice adds nothing the second time. A rerun's newer row is a different
    row and is added (the newest row of a (cell, seed) counts). A run file older than the row
    ``cells.jsonl`` already holds for its run (left from an earlier attempt) is not, and neither is a
    row of a run that is not in the folder's matrix (``matrix.json``): it is named on stderr."""
    out_dir = Path(out_dir)
    rows_path = out_dir / ROWS_FILE
    for name in (ROWS_FILE, CSV_FILE):
        refuse_link(out_dir / name)
    existing = latest_runs(read_rows(rows_path))
    record = read_matrix_record(out_dir)
    runs = None if record is None else {(c["cell_id"], s) for c in record["cells"] for s in record["seeds"]}
    added = []
    for path in sorted((out_dir / RUNS_DIR).glob("*.json")):
        row = read_run_file(path)
        if row is None:
            print(f"warning: {path}: not a results row; skipped", file=sys.stderr)
            continue
        if runs is not None and (row["cell_id"], row["seed"]) not in runs:
            print(f"warning: {path}: cell {row['cell_id']} seed {row['seed']} is not a run of this folder's "
                  f"matrix ({MATRIX_FILE}); skipped", file=sys.stderr)
            continue
        known = existing.get((row["cell_id"], row["seed"]))
        if known is not None and (_same(known, row) or _older(row, known)):
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
    stamp, now = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.time()
    record["runs"].update({key: {"job_id": job_id, "submitted_at": stamp, "submitted_s": now}
                           for key, job_id in jobs.items()})
    make_folder(Path(out_dir) / CLUSTER_DIR, root=Path(out_dir))
    write_atomic(Path(out_dir) / CLUSTER_DIR / JOBS_FILE, json.dumps(record, indent=1), root=Path(out_dir))
