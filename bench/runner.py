"""Runs a matrix: one child process per (cell, seed), rows appended as each finishes.

The parent only schedules and collects. It resumes by skipping (cell_id, seed) pairs already
in ``cells.jsonl``, holds a lock so two runs never write one folder, and records a child that
dies or overruns its time limit as a failed row, so the matrix always goes on.

The folder belongs to one matrix, recorded in ``matrix.json`` at the start: running an edited
matrix (other cells, design, or fewer seeds) into it is refused before anything runs; more
seeds are allowed. Failed runs stay failed on a rerun unless ``retry_failed`` (the newest row of
a (cell, seed) is the one that counts). SIGTERM and SIGHUP end a run like Ctrl-C: the child and
everything it started are stopped, and no row is written for the run in progress.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from bench import lifeline
from bench.config import Cell, Matrix, TrainConfig
from bench.distributed import threads_per_rank
from bench.results import (CSV_FILE, LOCK_FILE, MATRIX_FILE, ROWS_FILE, WORK_DIR, Row, RunRecord,
                           StoreError, append_row, end_torn_row, latest_runs, matrix_change, matrix_record,
                           open_for_writing, read_matrix_record, read_rows, refuse_link, row_problem,
                           write_atomic, write_csv)
from bench.stats import scaling_efficiency


WORKER = [sys.executable, "-m", "bench.worker"]  # + the job file
LAUNCHER = [sys.executable, "-m", "torch.distributed.run"]  # torchrun, for world_size > 1
STOP_GRACE_S = 40  # for torchrun to stop its ranks: SIGTERM, then SIGKILL after its own 30 s
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class OutputBusy(StoreError):
    """Another trickbench run holds the output folder."""


class MatrixChanged(StoreError):
    """The output folder holds the rows of another matrix."""


class Terminated(BaseException):
    """SIGTERM or SIGHUP (a scheduler, ``timeout``, a closed terminal): stop like Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def termination_as_exception() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into :class:`Terminated` in the main thread, so the cleanup that
    Ctrl-C gets (stop the child, release the lock, remove the work folder) runs for them too."""
    def handler(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    # A signal already ignored stays ignored: under nohup, a closed terminal must not stop the run.
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)
                if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextlib.contextmanager
def exclusive(out_dir: Path) -> Iterator[None]:
    """One writer per output folder (an advisory lock, released if the holder dies)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise StoreError(f"--out {out_dir}: not a folder (a file is in the way)") from None
    except OSError as err:
        raise StoreError(f"--out {out_dir}: cannot create the folder: {err.strerror}") from None
    fd = open_for_writing(out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT)  # never truncates, never follows
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputBusy(f"{out_dir} is being written by another trickbench run; "
                             "wait for it or choose another --out") from None
        yield
    finally:
        os.close(fd)


def move_aside(out_dir: Path) -> list[Path]:
    """For --fresh: keep the old rows and their matrix.json under a timestamped name, not deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for name in (ROWS_FILE, MATRIX_FILE):
        path = out_dir / name
        if os.path.lexists(path):
            target = out_dir / f"{name}.{stamp}.old"
            path.rename(target)
            moved.append(target)
    return moved


def check_matrix(out_dir: Path, matrix: Matrix, rows: list[Row]) -> dict[str, Any]:
    """The record to keep in matrix.json; MatrixChanged when the folder's rows belong to another matrix."""
    current = matrix_record(matrix)
    ask = "run with --fresh to move the old results aside and start over, or choose another --out"
    try:
        recorded = read_matrix_record(out_dir)
    except StoreError as err:
        raise MatrixChanged(f"{err}; {ask}") from None
    if recorded is not None:
        change = matrix_change(recorded, current)
        if change:
            raise MatrixChanged(f"{out_dir} holds results of a different matrix ({change}; recorded in "
                                f"{MATRIX_FILE}); {ask}")
        return current
    stray = {r["cell_id"] for r in rows} - {c.cell_id for c in matrix.cells}
    if stray:
        raise MatrixChanged(f"{out_dir / ROWS_FILE} has rows of {len(stray)} cells that are not in this matrix "
                            f"(written before {MATRIX_FILE} was kept); {ask}")
    return current


def fresh_work_dir(out_dir: Path) -> Path:
    """``out_dir/.work``, emptied: what a run killed with its parent left there is removed here."""
    work = out_dir / WORK_DIR
    with contextlib.suppress(FileNotFoundError):
        mode = os.lstat(work).st_mode
        if not stat.S_ISDIR(mode):  # a link or a file: remove the name, never what it points at
            raise StoreError(f"{work} is not a folder; remove it")
        shutil.rmtree(work)
    work.mkdir()
    return work


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
    Ctrl-C and SIGTERM wait until this is done: an interrupted stop would leave the child running.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_GRACE_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _arm_death_signal() -> None:
    """In the child before exec: SIGTERM when the runner dies, even by SIGKILL (torchrun then stops
    its ranks; a worker re-arms it as SIGKILL for itself)."""
    lifeline.die_with_parent(signal.SIGTERM)


def run_in_child(matrix: Matrix, cell: Cell, seed: int, work_dir: Path) -> Row:
    """Train one (cell, seed) in a fresh interpreter (one per rank); always returns a row."""
    job_path = write_job(work_dir, matrix.name, cell.cell_id, seed, cell.axes, cell.config.to_dict())
    command, env = worker_command(cell.config, job_path, f"{cell.cell_id}-{seed}")
    return run_job_file(job_path, command, env, cell.config.time_limit_s)


def write_job(work_dir: Path, matrix: str, cell_id: str, seed: int, axes: dict[str, Any],
              config: dict[str, Any], tag: str = "") -> Path:
    """The job file a worker reads (``python -m bench.worker JOB``): what to train, where the row goes."""
    stem = f"{cell_id}-{seed}{tag}"
    job = {"matrix": matrix, "cell_id": cell_id, "seed": seed, "axes": axes, "config": config,
           "row_path": str(work_dir / f"{stem}.row.json"), "runner_pid": os.getpid()}
    job_path = work_dir / f"{stem}.job.json"
    write_atomic(job_path, json.dumps(job))
    return job_path


def run_job_file(job_path: Path, command: list[str], env: dict[str, str] | None, limit: float) -> Row:
    """Run the worker ``command`` on a job file; its row, or a failed row if it left none."""
    job = json.loads(job_path.read_text(encoding="utf-8"))
    row_path = Path(job["row_path"])
    record = RunRecord(matrix=job["matrix"], cell_id=job["cell_id"], seed=job["seed"], axes=job["axes"],
                       config=job["config"])
    record.start()
    started = time.monotonic()
    # Own process group, so a timeout kills the child and anything it started.
    proc = subprocess.Popen(command, start_new_session=True, env=env, preexec_fn=_arm_death_signal)
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
    record.fail(status, error)
    record.finish(time.monotonic() - started)
    return record.to_row()


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


def _describe_exit(code: int) -> tuple[str, str]:
    if code < 0:
        name = signal.Signals(-code).name
        # The kernel's OOM killer sends SIGKILL; without a row we cannot tell it from other kills.
        return ("error", f"child killed by {name}")
    return ("error", f"child exited with code {code}")


@dataclass
class MatrixOutcome:
    """What a run of a matrix leaves: the rows written now, and the standing row of every run."""

    written: list[Row]
    standing: list[Row]  # the latest row of each (cell, seed) of the matrix that has one
    total: int  # runs in the matrix

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.standing if r["status"] != "ok"]


def run_matrix(matrix: Matrix, out_dir: Path, fresh: bool = False, retry_failed: bool = False) -> MatrixOutcome:
    """Run every (cell, seed) of ``matrix`` without a row in ``out_dir`` (and, with ``retry_failed``,
    those whose latest row is a failure). Refuses, writing nothing, a folder of another matrix."""
    with termination_as_exception(), exclusive(out_dir):
        rows_path = out_dir / ROWS_FILE
        for name in (ROWS_FILE, CSV_FILE, MATRIX_FILE):
            refuse_link(out_dir / name)
        if fresh and (moved := move_aside(out_dir)):
            print(f"moved previous results aside to {', '.join(map(str, moved))}")
        rows = read_rows(rows_path)
        write_atomic(out_dir / MATRIX_FILE, json.dumps(check_matrix(out_dir, matrix, rows), indent=1))
        end_torn_row(rows_path)
        latest = latest_runs(rows)
        todo = [(c, s) for c, s in matrix.runs() if (c.cell_id, s) not in latest
                or (retry_failed and latest[c.cell_id, s]["status"] != "ok")]
        _print_resume(matrix, latest, todo, rows_path, retry_failed)
        work = fresh_work_dir(out_dir)
        try:
            written = _run_all(matrix, todo, work, rows_path)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        rows = read_rows(rows_path, warn=False)
        write_csv(rows, out_dir / CSV_FILE)
    outcome = MatrixOutcome(written, standing_rows(matrix, rows), len(matrix.runs()))
    _print_scaling(matrix, outcome.standing)
    return outcome


def standing_rows(matrix: Matrix, rows: list[Row]) -> list[Row]:
    """The latest row of every (cell, seed) of ``matrix``, in run order; runs without a row are left out."""
    latest = latest_runs(rows)
    return [latest[c.cell_id, s] for c, s in matrix.runs() if (c.cell_id, s) in latest]


def _print_resume(matrix: Matrix, latest: dict, todo: list, rows_path: Path, retry_failed: bool) -> None:
    total = len(matrix.runs())
    if len(todo) == total:
        return
    print(f"resuming: {total - len(todo)} of {total} runs already in {rows_path}")
    kept = sum(latest[c.cell_id, s]["status"] != "ok" for c, s in matrix.runs()
               if (c.cell_id, s) in latest and (c, s) not in todo)
    if kept and not retry_failed:
        print(f"  {kept} of them failed and are not run again (--retry-failed reruns them)")


def _run_all(matrix: Matrix, todo: list[tuple[Cell, int]], work: Path, rows_path: Path) -> list[Row]:
    total = len(matrix.runs())
    written = []
    started = time.monotonic()
    for index, (cell, seed) in enumerate(todo, 1):
        print(f"[{total - len(todo) + index:>3}/{total}] {cell.label()} seed={seed}", flush=True)
        row = run_in_child(matrix, cell, seed, work)
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
    return written


def _print_scaling(matrix: Matrix, rows: list[Row]) -> None:
    efficiencies = scaling_efficiency(rows)
    for cell in matrix.cells:
        world, efficiency = efficiencies.get(cell.cell_id, (1, None))
        if world > 1:
            print(f"scaling efficiency {efficiency:.2f} (throughput / {world} x world_size 1's): {cell.label()}")
