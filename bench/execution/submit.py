"""``trickbench run M --executor slurm|local``, ``trickbench collect DIR``, ``trickbench status DIR``.

The submitting side of :mod:`bench.execution.cluster`: checks the folder like the sequential runner (one
matrix per folder, resume, ``--fresh``, ``--retry-failed``), submits the runs that have no row and
are not queued or running (one submission at a time per folder: its lock) as one job array per
(world size, CPUs) (a task asks for W GPUs; SLURM arrays share one resource request), records
the job ids, and, for the local executor or with ``--wait``, waits (until every run is done or
lost, or ``--timeout``) and collects.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.config.matrix import Cell, Matrix
from bench.config.slurm import ClusterSettings
from bench.execution import cluster, queue
from bench.execution.runner import (
    MatrixOutcome,
    check_matrix,
    exclusive,
    move_aside,
    standing_rows,
    termination_as_exception,
)
from bench.execution.task import RunTask
from bench.store.files import refuse_linked_folders
from bench.store.results import (
    CSV_FILE,
    MATRIX_FILE,
    ROWS_FILE,
    Row,
    StoreError,
    latest_runs,
    read_rows,
    write_atomic,
)


def todo_runs(matrix: Matrix, rows: list[Row], retry_failed: bool) -> list[tuple[Cell, int]]:
    latest = latest_runs(rows)
    return [(c, s) for c, s in matrix.runs() if (c.cell_id, s) not in latest
            or (retry_failed and latest[c.cell_id, s]["status"] != "ok")]


def prepare(matrix: Matrix, out_dir: Path, fresh: bool, retry_failed: bool) -> list[tuple[Cell, int]]:
    """Under the folder's lock: refuse another matrix, merge finished run files, list what is left
    (runs without a row that no job of this folder has in the queue)."""
    if fresh and (moved := move_aside(out_dir)):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for old in (out_dir / cluster.RUNS_DIR, out_dir / cluster.CLUSTER_DIR / cluster.JOBS_FILE):
            if old.exists():  # the old runs' row files and job ids go with their rows
                old.rename(old.with_name(f"{old.name}.{stamp}.old"))
        print(f"moved previous results aside to {', '.join(map(str, moved))}")
    rows = read_rows(out_dir / ROWS_FILE)
    write_atomic(out_dir / MATRIX_FILE, json.dumps(check_matrix(out_dir, matrix, rows), indent=1))
    if cluster.collect(out_dir):
        rows = read_rows(out_dir / ROWS_FILE, warn=False)
    todo = todo_runs(matrix, rows, retry_failed)
    if len(todo) < len(matrix.runs()):
        print(f"resuming: {len(matrix.runs()) - len(todo)} of {len(matrix.runs())} runs already in {out_dir / ROWS_FILE}")
    flying = {s.key: s for s in queue.run_states(out_dir) if s.state in queue.IN_FLIGHT}
    if unknown := sum(s.state == "unknown" for s in flying.values()):
        print(f"warning: squeue did not answer; {unknown} runs with a job are not resubmitted", file=sys.stderr)
    waiting = [(c, s) for c, s in todo if (c.cell_id, s) in flying]
    if waiting:
        print(f"{len(waiting)} runs are queued or running already: not submitted again "
              f"(`trickbench status {out_dir}`)")
    return [(c, s) for c, s in todo if (c.cell_id, s) not in flying]


def task_for(out_dir: Path, matrix: Matrix, cell: Cell, seed: int, retry_failed: bool,
             settings: ClusterSettings, shared_timing: bool) -> RunTask:
    return RunTask(str(out_dir.resolve()), matrix.name, cell.cell_id, seed, cell.axes, cell.config.to_dict(),
                   retry_failed, settings.max_requeues, shared_timing)


def submit_arrays(matrix: Matrix, out_dir: Path, todo: list[tuple[Cell, int]], settings: ClusterSettings,
                  retry_failed: bool) -> None:
    """One submitit job array per (world size, CPUs); the job ids of each recorded as it is accepted.
    A refusal: one ConfigError with sbatch's words, and nothing of that array left behind."""
    folder = out_dir.resolve() / cluster.CLUSTER_DIR / "submitit"
    minutes = cluster.task_minutes(settings, matrix)
    device = matrix.cells[0].config.device
    for (world_size, cpus), runs in cluster.arrays_of(todo, settings).items():
        params = cluster.executor_parameters(settings, "slurm", matrix.name, world_size, device, minutes, cpus)
        executor = cluster.make_executor("slurm", folder, settings, params)
        tasks = [task_for(out_dir, matrix, c, s, retry_failed, settings, not settings.whole_nodes) for c, s in runs]
        with cluster.refusal_leaves_nothing(folder, matrix.file, f"the array of world_size {world_size}"):
            # submit_array: one array of Checkpointable tasks (submitit's way to requeue them)
            array = executor.submit_array(tasks)
        cluster.record_jobs(out_dir, "slurm", folder, {f"{c.cell_id}-{s}": job.job_id
                                                       for (c, s), job in zip(runs, array)})
        batch = f"job array {array[0].job_id.split('_')[0]}" if len(runs) > 1 else f"job {array[0].job_id}"
        print(f"submitted {plural(len(runs), 'run')} of world_size {world_size} as SLURM {batch}"
              f" ({plural(cpus, 'CPU')}, {plural(params.get('gpus_per_node', 0), 'GPU')}, {minutes} min per task"
              + (", whole nodes)" if settings.whole_nodes else "; timing shared with other jobs)"))


def wait_for_runs(out_dir: Path, timeout_s: float | None) -> list[queue.RunState]:
    """Until no run of the folder is queued or running (each done, failed or lost), or ``timeout_s``;
    one squeue call per look, looking less often as the wait grows. The runs still open at the end."""
    started = time.monotonic()
    gone_since: dict[tuple[str, int], float] = {}
    while True:
        states = queue.run_states(out_dir, gone_since)
        flying = [s for s in states if s.state in queue.IN_FLIGHT]
        waited = time.monotonic() - started
        if not flying or (timeout_s is not None and waited >= timeout_s):
            return flying
        pause = min(30.0, 2.0 + waited / 10)
        time.sleep(pause if timeout_s is None else max(0.1, min(pause, timeout_s - waited)))


def run_local(matrix: Matrix, out_dir: Path, todo: list[tuple[Cell, int]], settings: ClusterSettings,
              retry_failed: bool) -> None:
    """submitit's local executor starts every job at once; keep ``array_parallelism`` (default 1:
    never two timed runs on one device) in flight, and cancel them all on Ctrl-C or SIGTERM."""
    folder = out_dir.resolve() / cluster.CLUSTER_DIR / "submitit"
    minutes = cluster.task_minutes(settings, matrix)
    parallelism = settings.array_parallelism or 1
    device = matrix.cells[0].config.device
    pending, running = list(todo), []
    total, finished = len(matrix.runs()), len(matrix.runs()) - len(todo)
    try:
        while pending or running:
            while pending and len(running) < parallelism:
                cell, seed = pending.pop(0)
                params = cluster.executor_parameters(settings, "local", matrix.name, cell.config.world_size,
                                                     device, minutes)
                job = cluster.make_executor("local", folder, settings, params).submit(
                    task_for(out_dir, matrix, cell, seed, retry_failed, settings, parallelism > 1))
                cluster.record_jobs(out_dir, "local", folder, {f"{cell.cell_id}-{seed}": job.job_id})
                running.append((cell, seed, job))
            time.sleep(cluster.POLL_S)
            for entry in [r for r in running if r[2].done()]:
                running.remove(entry)
                finished += 1
                _print_finished(out_dir, entry[0], entry[1], entry[2], finished, total)
    except BaseException:
        for _, _, job in running:
            _cancel_local(job)
        raise


def _cancel_local(job: Any) -> None:
    """SIGINT to the job's controller, which stops its task (and the task its worker)."""
    job.cancel()
    process = getattr(job, "_process", None)
    if process is not None:
        try:
            process.wait(timeout=60)
        except Exception:  # noqa: BLE001 - last resort: the controller did not stop
            process.kill()
            process.wait()


def _print_finished(out_dir: Path, cell: Cell, seed: int, job: Any, finished: int, total: int) -> None:
    row = cluster.read_run_file(cluster.run_file(out_dir, cell.cell_id, seed))
    if row is None:
        detail = f"no row (job {job.job_id} ended {job.state}); see {job.paths.stderr}"
    else:
        detail = row["status"] + ("" if row["status"] == "ok" else f": {row['error']}")
    print(f"[{finished:>3}/{total}] {cell.label()} seed={seed}: {detail}", flush=True)


def check_cluster_folders(out_dir: Path) -> None:
    """Refuse (StoreError) a linked ``runs/`` or ``cluster/`` in the output folder, before anything
    is written: per-run files and job ids are never written through a link."""
    for name in (cluster.RUNS_DIR, cluster.CLUSTER_DIR):
        refuse_linked_folders(out_dir / name / "x", out_dir)


def run_matrix_on_cluster(matrix: Matrix, out_dir: Path, kind: str, settings: ClusterSettings,
                          fresh: bool = False, retry_failed: bool = False, wait: bool = False,
                          timeout_s: float | None = None) -> MatrixOutcome | None:
    """Submit the runs of ``matrix`` that have no row and no job in the queue; None when submitted
    without waiting. ``wait``: until every run is done or lost (or ``timeout_s``), then collect."""
    with termination_as_exception():
        with exclusive(out_dir):
            todo = prepare(matrix, out_dir, fresh, retry_failed)
            if kind == "local":
                run_local(matrix, out_dir, todo, settings, retry_failed)
            elif todo:
                submit_arrays(matrix, out_dir, todo, settings, retry_failed)
        if kind == "slurm" and not wait:
            if todo:
                print(f"see progress with `trickbench status {out_dir}`; merge rows with `trickbench collect {out_dir}`")
            return None
        if kind == "slurm":
            open_runs = wait_for_runs(out_dir, timeout_s)
            if open_runs:
                print(f"timeout: {len(open_runs)} runs still queued or running after {timeout_s:g} s; they go on "
                      f"(`trickbench status {out_dir}`, then `trickbench collect {out_dir}`)", file=sys.stderr)
    with exclusive(out_dir):
        cluster.collect(out_dir)
        rows = read_rows(out_dir / ROWS_FILE, warn=False)
    if kind == "slurm":
        for state in queue.run_states(out_dir):
            if state.state == "lost":
                print(f"  lost: cell {state.cell_id} seed {state.seed}: {state.detail}")
    standing = standing_rows(matrix, rows)
    asked = {(c.cell_id, s) for c, s in todo}
    written = [r for r in standing if (r["cell_id"], r["seed"]) in asked]
    return MatrixOutcome(written=written, standing=standing, total=len(matrix.runs()))


# --- collect and status ------------------------------------------------------------------------------------

def cmd_collect(args: argparse.Namespace) -> int:
    out_dir = Path(args.dir)
    if not out_dir.is_dir():
        raise StoreError(f"{args.dir}: not a folder")
    with exclusive(out_dir):
        added = cluster.collect(out_dir)
    print(f"collected {len(added)} new rows into {out_dir / ROWS_FILE}; {CSV_FILE} rewritten" if added
          else f"nothing new: every run file's row is already in {out_dir / ROWS_FILE}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    out_dir = Path(args.dir)
    if not os.path.lexists(out_dir / MATRIX_FILE):
        raise StoreError(f"{args.dir}: no {MATRIX_FILE}; not an output folder of `trickbench run`")
    states = queue.run_states(out_dir)
    counts = Counter(s.state for s in states)
    order = ["done", "failed", "running", "queued", "lost", "unknown", "not submitted"]
    print(f"{out_dir}: " + ", ".join(f"{counts[s]} {s}" for s in order if counts[s]) + f" of {len(states)} runs")
    for s in states:
        if s.state not in ("done", "queued", "running") or "may never start" in s.detail:
            print(f"  {s.state}: cell {s.cell_id} seed {s.seed}" + (f": {s.detail}" if s.detail else ""))
    collected = latest_runs(read_rows(out_dir / ROWS_FILE, warn=False))
    not_collected = sum(1 for s in states if s.state == "done" and s.key not in collected)
    if not_collected:
        print(f"{not_collected} finished runs are not in {ROWS_FILE} yet: `trickbench collect {out_dir}`")
    return 0


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
