"""Runs a matrix: one child process per (cell, seed), rows appended as each finishes.

The parent only schedules and collects. It resumes by skipping (cell_id, seed) pairs already
in ``cells.jsonl``, holds a lock so two runs never write one folder, and records a child that
dies or overruns its time limit as a failed row, so the matrix always goes on.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from bench.config import SCHEMA_VERSION, Cell, Matrix, TrainConfig
from bench.distributed import threads_per_rank
from bench.results import CSV_FILE, ROWS_FILE, append_row, end_torn_row, read_rows, write_csv
from bench.stats import scaling_efficiency


WORKER = [sys.executable, "-m", "bench.worker"]  # + the job file
LAUNCHER = [sys.executable, "-m", "torch.distributed.run"]  # torchrun, for world_size > 1
STOP_GRACE_S = 40  # for torchrun to stop its ranks: SIGTERM, then SIGKILL after its own 30 s


class OutputBusy(Exception):
    """Another trickbench run holds the output folder."""


@contextlib.contextmanager
def exclusive(out_dir: Path) -> Iterator[None]:
    """One writer per output folder (an advisory lock, released if the holder dies)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputBusy(f"{out_dir} is being written by another trickbench run; "
                             "wait for it or choose another --out") from None
        yield


def move_aside(out_dir: Path) -> Path | None:
    """For --fresh: keep the old rows under a timestamped name instead of deleting them."""
    rows = out_dir / ROWS_FILE
    if not rows.exists():
        return None
    target = out_dir / f"{ROWS_FILE}.{time.strftime('%Y%m%d-%H%M%S')}.old"
    rows.rename(target)
    return target


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


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
    command = [*LAUNCHER, *where, "--nproc-per-node", str(per_node), "-m", "bench.worker", str(job_path)]
    # Each rank gets its share of the cores (torchrun would otherwise set 1 thread per rank).
    return command, {**os.environ, "OMP_NUM_THREADS": str(threads_per_rank(per_node))}


def stop(proc: subprocess.Popen) -> None:
    """End a child and everything it started.

    SIGTERM first: torchrun answers it by stopping its ranks, which it starts in sessions of their
    own where killpg cannot reach them. Then SIGKILL to whatever is left of the child's group.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=STOP_GRACE_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_in_child(matrix: Matrix, cell: Cell, seed: int, work_dir: Path) -> dict[str, Any]:
    """Train one (cell, seed) in a fresh interpreter (one per rank); always returns a row."""
    row_path = work_dir / f"{cell.cell_id}-{seed}.row.json"
    job = {"matrix": matrix.name, "cell_id": cell.cell_id, "seed": seed, "axes": cell.axes,
           "config": cell.config.to_dict(), "row_path": str(row_path)}
    job_path = work_dir / f"{cell.cell_id}-{seed}.job.json"
    job_path.write_text(json.dumps(job))
    limit = cell.config.time_limit_s
    started = time.monotonic()
    command, env = worker_command(cell.config, job_path, f"{cell.cell_id}-{seed}")
    # Own process group, so a timeout kills the child and anything it started.
    proc = subprocess.Popen(command, start_new_session=True, env=env)
    try:
        code = proc.wait(timeout=limit)
        failure = None if code == 0 else _describe_exit(code)
    except subprocess.TimeoutExpired:
        stop(proc)
        failure = ("timeout", f"exceeded time_limit_s={limit:g}")
    except BaseException:  # Ctrl-C or a kill of the parent: take the child down too
        stop(proc)
        raise
    rows = rows_written(row_path)
    # The first rank to fail names the cause (those after it mostly report a peer that went away),
    # and says more than the exit code of the launcher that stopped the others.
    failed_rows = [r for r in rows if r["status"] != "ok"]
    if failed_rows:
        return failed_rows[0]
    if failure is None and rows:
        return rows[0]
    status, error = failure or ("error", "child exited without writing a row")
    return {"schema_version": SCHEMA_VERSION, "matrix": matrix.name, "cell_id": cell.cell_id, "seed": seed,
            "axes": cell.axes, "config": cell.config.to_dict(), "status": status, "error": error,
            "failed_at_step": None, "wall_time_s": time.monotonic() - started}


def rows_written(row_path: Path) -> list[dict[str, Any]]:
    """The rows written for one run, oldest first: rank 0's and those of other ranks that failed
    (``row_path.rankR``). A rank writes its row before it exits, so before any failure it causes."""
    paths = [p for p in [row_path, *row_path.parent.glob(f"{row_path.name}.rank*")]
             if p.exists() and p.suffix != ".tmp"]
    return [json.loads(p.read_text()) for p in sorted(paths, key=lambda p: p.stat().st_mtime_ns)]


def _describe_exit(code: int) -> tuple[str, str]:
    if code < 0:
        name = signal.Signals(-code).name
        # The kernel's OOM killer sends SIGKILL; without a row we cannot tell it from other kills.
        return ("error", f"child killed by {name}")
    return ("error", f"child exited with code {code}")


def run_matrix(matrix: Matrix, out_dir: Path, fresh: bool = False) -> list[dict[str, Any]]:
    """Run every (cell, seed) not yet in ``out_dir``; returns the rows written this time."""
    with exclusive(out_dir):
        if fresh and (old := move_aside(out_dir)):
            print(f"moved previous results aside to {old}")
        rows_path = out_dir / ROWS_FILE
        end_torn_row(rows_path)
        done = {(r["cell_id"], r["seed"]) for r in read_rows(rows_path)}
        todo = [(c, s) for c, s in matrix.runs() if (c.cell_id, s) not in done]
        total = len(matrix.runs())
        if len(todo) < total:
            print(f"resuming: {total - len(todo)} of {total} runs already in {rows_path}")
        written = []
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="trickbench-") as work:
            for index, (cell, seed) in enumerate(todo, 1):
                print(f"[{total - len(todo) + index:>3}/{total}] {cell.label()} seed={seed}", flush=True)
                row = run_in_child(matrix, cell, seed, Path(work))
                append_row(rows_path, row)
                written.append(row)
                elapsed = time.monotonic() - started
                eta = elapsed / index * (len(todo) - index)
                detail = row["error"]
                if row["status"] == "ok":
                    accuracy = row.get("accuracy_top1")
                    detail = (f"{row['throughput_samples_per_s']:.1f} samples/s, peak "
                              f"{row['peak_memory_bytes'] / 2**20:.1f} MiB, top-1 "
                              + ("-" if accuracy is None else f"{accuracy:.3f}"))
                print(f"      {row['status']}: {detail} | {_format_duration(row.get('wall_time_s') or 0)}"
                      f" | ETA {_format_duration(eta)}", flush=True)
        rows = read_rows(rows_path, warn=False)
        write_csv(rows, out_dir / CSV_FILE)
    efficiencies = scaling_efficiency(rows)
    for cell in matrix.cells:
        world, efficiency = efficiencies.get(cell.cell_id, (1, None))
        if world > 1:
            print(f"scaling efficiency {efficiency:.2f} (throughput / {world} x world_size 1's): {cell.label()}")
    return written
