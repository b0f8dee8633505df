"""``trickbench run M --executor slurm|local``, ``trickbench collect DIR``, ``trickbench status DIR``.

The submitting side of :mod:`bench.execution.cluster`: checks the folder like the sequential runner (one
matrix per folder, resume, ``--fresh``, ``--retry-failed``), submits the runs without a row as
one job array per world size (a task asks for W GPUs; SLURM arrays share one resource request),
records the job ids, and, for the local executor or with ``--wait``, waits and collects.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.config.matrix import Cell, Matrix
from bench.config.slurm import ClusterSettings
from bench.execution import cluster
from bench.execution.runner import (
    MatrixOutcome,
    check_matrix,
    exclusive,
    move_aside,
    standing_rows,
    termination_as_exception,
)
from bench.store.files import refuse_linked_folders
from bench.store.results import (
    CSV_FILE,
    MATRIX_FILE,
    ROWS_FILE,
    Row,
    StoreError,
    latest_runs,
    read_matrix_record,
    read_rows,
    write_atomic,
)


def todo_runs(matrix: Matrix, rows: list[Row], retry_failed: bool) -> list[tuple[Cell, int]]:
    latest = latest_runs(rows)
    return [(c, s) for c, s in matrix.runs() if (c.cell_id, s) not in latest
            or (retry_failed and latest[c.cell_id, s]["status"] != "ok")]


def prepare(matrix: Matrix, out_dir: Path, fresh: bool, retry_failed: bool) -> list[tuple[Cell, int]]:
    """Under the folder's lock: refuse another matrix, merge finished run files, list what is left."""
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
    return todo


def task_for(out_dir: Path, matrix: Matrix, cell: Cell, seed: int, retry_failed: bool) -> cluster.RunTask:
    return cluster.RunTask(str(out_dir.resolve()), matrix.name, cell.cell_id, seed, cell.axes,
                           cell.config.to_dict(), retry_failed)


def groups_by_world_size(todo: list[tuple[Cell, int]]) -> dict[int, list[tuple[Cell, int]]]:
    groups: dict[int, list[tuple[Cell, int]]] = {}
    for cell, seed in todo:
        groups.setdefault(cell.config.world_size, []).append((cell, seed))
    return groups


def submit_arrays(matrix: Matrix, out_dir: Path, todo: list[tuple[Cell, int]], settings: ClusterSettings,
                  retry_failed: bool) -> list[Any]:
    """One submitit job array per world size; their job ids recorded in the folder."""
    folder = out_dir.resolve() / cluster.CLUSTER_DIR / "submitit"
    minutes = cluster.task_minutes(settings, matrix)
    device = matrix.cells[0].config.device
    jobs, ids = [], {}
    for world_size, runs in groups_by_world_size(todo).items():
        params = cluster.executor_parameters(settings, "slurm", matrix.name, world_size, device, minutes)
        executor = cluster.make_executor("slurm", folder, settings, params)
        # submit_array: one array of Checkpointable tasks (submitit's way to requeue them)
        array = executor.submit_array([task_for(out_dir, matrix, c, s, retry_failed) for c, s in runs])
        jobs += array
        ids.update({f"{c.cell_id}-{s}": job.job_id for (c, s), job in zip(runs, array)})
        print(f"submitted {len(runs)} runs of world_size {world_size} as SLURM job array {array[0].job_id.split('_')[0]}"
              f" ({params.get('gpus_per_node', 0)} GPUs, {minutes} min per task)")
    cluster.record_jobs(out_dir, "slurm", folder, ids)
    return jobs


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
                    task_for(out_dir, matrix, cell, seed, retry_failed))
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
                          fresh: bool = False, retry_failed: bool = False, wait: bool = False) -> MatrixOutcome | None:
    """Submit the runs of ``matrix`` that have no row; None when submitted without waiting."""
    check_cluster_folders(out_dir)
    with termination_as_exception():
        with exclusive(out_dir):
            todo = prepare(matrix, out_dir, fresh, retry_failed)
            if kind == "local":
                run_local(matrix, out_dir, todo, settings, retry_failed)
            elif todo:
                jobs = submit_arrays(matrix, out_dir, todo, settings, retry_failed)
        if kind == "slurm" and todo and not wait:
            print(f"see progress with `trickbench status {out_dir}`; merge rows with `trickbench collect {out_dir}`")
            return None
        if kind == "slurm" and todo:
            while not all(job.done() for job in jobs):
                time.sleep(30)
    with exclusive(out_dir):
        cluster.collect(out_dir)
        rows = read_rows(out_dir / ROWS_FILE, warn=False)
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


SLURM_QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "SUSPENDED", "RESV_DEL_HOLD"}
SLURM_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING"}


def job_state(kind: str, folder: str, job_id: str) -> str:
    """queued, running, ended (without a row) or unknown, from the scheduler."""
    if kind == "local":
        return "running" if _local_controller_alive(job_id) else "ended"
    try:
        # lazy: submitit is needed only with --executor slurm|local
        import submitit

        state = submitit.SlurmJob(folder=folder, job_id=job_id).state.split()[0]
    except Exception:  # noqa: BLE001 - no sacct here, or the scheduler forgot the job
        return "unknown"
    if state in SLURM_QUEUED:
        return "queued"
    return "running" if state in SLURM_RUNNING else ("unknown" if state == "UNKNOWN" else "ended")


def _local_controller_alive(job_id: str) -> bool:
    """The local executor's job id is its controller's pid (reused pids are told apart by name)."""
    try:
        cmdline = Path(f"/proc/{int(job_id)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return b"submitit" in cmdline


def run_states(out_dir: Path) -> list[tuple[str, str, int, str]]:
    """(state, cell_id, seed, detail) of every run of the folder's matrix."""
    record = cluster.read_jobs(out_dir)
    matrix = read_matrix_record(out_dir)  # the store's reader: schema, size and finiteness checked
    latest = latest_runs(read_rows(out_dir / ROWS_FILE))
    states = []
    for seed in matrix["seeds"]:
        for cell in matrix["cells"]:
            cell_id = cell["cell_id"]
            row = cluster.read_run_file(cluster.run_file(out_dir, cell_id, seed)) or latest.get((cell_id, seed))
            job = record["runs"].get(f"{cell_id}-{seed}")
            if row is not None and row["status"] == "ok":
                states.append(("done", cell_id, seed, ""))
            elif row is not None and (job is None or row.get("started_at", "") >= job["submitted_at"]):
                states.append(("failed", cell_id, seed, f"{row['status']}: {row['error']}"))
            elif job is None:
                states.append(("not submitted", cell_id, seed, ""))
            else:
                state = job_state(record["executor"], record["folder"], job["job_id"])
                detail = f"job {job['job_id']}" + (" ended without a row; run again to resubmit"
                                                   if state == "ended" else "")
                states.append(("lost" if state == "ended" else state, cell_id, seed, detail))
    return states


def cmd_status(args: argparse.Namespace) -> int:
    out_dir = Path(args.dir)
    if not os.path.lexists(out_dir / MATRIX_FILE):
        raise StoreError(f"{args.dir}: no {MATRIX_FILE}; not an output folder of `trickbench run`")
    states = run_states(out_dir)
    counts = Counter(state for state, *_ in states)
    order = ["done", "failed", "running", "queued", "lost", "unknown", "not submitted"]
    print(f"{out_dir}: " + ", ".join(f"{counts[s]} {s}" for s in order if counts[s]) + f" of {len(states)} runs")
    for state, cell_id, seed, detail in states:
        if state not in ("done", "queued", "running"):
            print(f"  {state}: cell {cell_id} seed {seed}" + (f": {detail}" if detail else ""))
    not_collected = sum(1 for s, c, sd, _ in states if s == "done"
                        and (c, sd) not in latest_runs(read_rows(out_dir / ROWS_FILE, warn=False)))
    if not_collected:
        print(f"{not_collected} finished runs are not in {ROWS_FILE} yet: `trickbench collect {out_dir}`")
    return 0

