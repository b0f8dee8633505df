"""Runs a matrix: one child process per (cell, seed), rows appended as each finishes.

The parent only schedules and collects. It starts runs in round-robin order, as many at once as
the devices allow (one per GPU, see :mod:`bench.execution.slots`), and is the only writer of
``cells.jsonl``: each child leaves its row in a file of its own, which the parent appends. It
resumes by skipping (cell_id, seed) pairs that have a row measured on this machine
(:mod:`bench.execution.machine`), holds a lock so two runs never write one folder, and records a child that
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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from bench.config.matrix import Cell, Matrix
from bench.execution import machine
from bench.execution.children import Job, start_run, stop_all
from bench.execution.slots import (
    DevicePool,
    LocalDevices,
    Placement,
    child_environment,
    request_for,
)
from bench.store.results import (
    CSV_FILE,
    LOCK_FILE,
    MATRIX_FILE,
    ROWS_FILE,
    WORK_DIR,
    Row,
    StoreError,
    append_row,
    end_torn_row,
    latest_runs,
    matrix_change,
    matrix_record,
    open_for_writing,
    read_matrix_record,
    read_rows,
    refuse_link,
    write_atomic,
    write_csv,
)


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


@dataclass
class MatrixOutcome:
    """What a run of a matrix leaves: the rows written now, and the standing row of every run."""

    written: list[Row]
    standing: list[Row]  # the latest row of each (cell, seed) of the matrix that has one
    total: int  # runs in the matrix

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.standing if r["status"] != "ok"]


def run_matrix(matrix: Matrix, out_dir: Path, fresh: bool = False, retry_failed: bool = False,
               devices: LocalDevices | None = None, timings: bool = False) -> MatrixOutcome:
    """Run every (cell, seed) of ``matrix`` without a row from this machine in ``out_dir`` (and, with
    ``retry_failed``, those whose latest row here is a failure), side by side on ``devices``
    (default: every visible GPU for CUDA cells, one CPU run at a time). Refuses, writing nothing,
    a folder of another matrix. Rows of other machines stay in the file and are not resumed.
    ``timings``: print where each run's wall time went (:func:`format_phases`)."""
    devices = devices or default_devices(matrix)
    with termination_as_exception(), exclusive(out_dir):
        rows_path = out_dir / ROWS_FILE
        for name in (ROWS_FILE, CSV_FILE, MATRIX_FILE):
            refuse_link(out_dir / name)
        if fresh and (moved := move_aside(out_dir)):
            print(f"moved previous results aside to {', '.join(map(str, moved))}")
        rows = read_rows(rows_path)
        write_atomic(out_dir / MATRIX_FILE, json.dumps(check_matrix(out_dir, matrix, rows), indent=1))
        end_torn_row(rows_path)
        envs = machine.environments_here({c.config.device for c in matrix.cells}, devices.gpus)
        here = {machine.fingerprint(env) for env in envs.values()}
        _print_other_machines(rows, here, rows_path)
        latest = latest_runs(r for r in rows if machine.row_machine(r) in here)
        todo = [(c, s) for c, s in matrix.runs() if (c.cell_id, s) not in latest
                or (retry_failed and latest[c.cell_id, s]["status"] != "ok")]
        _print_resume(matrix, latest, todo, rows_path, retry_failed)
        work = fresh_work_dir(out_dir)
        try:
            written = LocalRuns(matrix, work, rows_path, devices, envs, timings).run(todo)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        rows = read_rows(rows_path, warn=False)
        write_csv(rows, out_dir / CSV_FILE)
    outcome = MatrixOutcome(written, standing_rows(matrix, [r for r in rows if machine.row_machine(r) in here]),
                            len(matrix.runs()))
    return outcome


def default_devices(matrix: Matrix) -> LocalDevices:
    """Every visible GPU when some cell runs on CUDA; CPU runs one at a time."""
    if any(c.config.device == "cuda" for c in matrix.cells):

        return LocalDevices(gpus=tuple(range(torch.cuda.device_count())))
    return LocalDevices()


def standing_rows(matrix: Matrix, rows: list[Row]) -> list[Row]:
    """The latest row of every (cell, seed) of ``matrix``, in run order; runs without a row are left out."""
    latest = latest_runs(rows)
    return [latest[c.cell_id, s] for c, s in matrix.runs() if (c.cell_id, s) in latest]


def _print_other_machines(rows: list[Row], here: set[str], rows_path: Path) -> None:
    others = {key: text for key, text in machine.machines(rows).items() if key not in here}
    for key, text in others.items():
        count = sum(machine.row_machine(r) == key for r in rows)
        print(f"note: {count} rows in {rows_path} were measured on another machine ({key}: {text}); "
              "kept as reference, not resumed: this machine measures its own")


def _print_resume(matrix: Matrix, latest: dict, todo: list, rows_path: Path, retry_failed: bool) -> None:
    total = len(matrix.runs())
    if len(todo) == total:
        return
    print(f"resuming: {total - len(todo)} of {total} runs already in {rows_path}")
    kept = sum(latest[c.cell_id, s]["status"] != "ok" for c, s in matrix.runs()
               if (c.cell_id, s) in latest and (c, s) not in todo)
    if kept and not retry_failed:
        print(f"  {kept} of them failed and are not run again (--retry-failed reruns them)")


@dataclass
class Flight:
    """A run in progress: what it is, where it runs, and whether another run shared its timing."""

    cell: Cell
    seed: int
    job: Job
    placement: Placement
    shared: bool = False


class LocalRuns:
    """Runs (cell, seed) pairs in round-robin order, as many at once as the devices allow.

    The runner is the only writer of ``cells.jsonl``: children write their row to a file of their
    own in the work folder, and the runner appends it when the child has ended. A failed run is a
    row like any other and the others go on; Ctrl-C or SIGTERM stops every child before leaving.
    """

    POLL_S = 0.05  # how often to look at children when several run

    def __init__(self, matrix: Matrix, work: Path, rows_path: Path, devices: LocalDevices,
                 envs: dict[int | None, dict[str, Any]], timings: bool = False) -> None:
        self.matrix, self.work, self.rows_path, self.devices, self.envs = matrix, work, rows_path, devices, envs
        self.timings = timings
        self.pool = DevicePool(devices.gpus, devices.cpu_slots)
        self.flights: list[Flight] = []
        self.written: list[Row] = []
        self.total = len(matrix.runs())
        self.done_before = self.todo_count = 0
        self.started = time.monotonic()

    def run(self, todo: list[tuple[Cell, int]]) -> list[Row]:
        queue = list(todo)
        self.done_before, self.todo_count = self.total - len(todo), len(todo)
        try:
            while queue or self.flights:
                while queue and (placement := self.pool.place(request_for(queue[0][0].config,
                                                                          self.devices.shared_timing))):
                    self._launch(*queue.pop(0), placement)
                if not self.flights and queue:  # the CLI refuses such a matrix before anything runs
                    raise RuntimeError(f"{queue[0][0].label()}: needs more GPUs than {self.devices.gpus}")
                self._wait()
                for flight in list(self.flights):
                    if (row := flight.job.collect()) is not None:
                        self._finish(flight, row)
        except BaseException:
            stop_all([f.job.proc for f in self.flights])
            raise
        return self.written

    def _launch(self, cell: Cell, seed: int, placement: Placement) -> None:
        env = self.envs.get(placement.gpus[0] if placement.gpus else None)
        job = start_run(self.matrix, cell, seed, self.work, child_environment(placement, self.devices.cpu_slots), env)
        flight = Flight(cell, seed, job, placement)
        for other in self.flights:  # a CPU run beside any other run: neither one's clock is its own
            if placement.is_cpu or other.placement.is_cpu:
                other.shared = flight.shared = True
        self.flights.append(flight)
        where = f" on cuda:{','.join(map(str, placement.gpus))}" if placement.gpus else ""
        print(f"[{self._position():>3}/{self.total}] {cell.label()} seed={seed}{where}"
              + (f" | {len(self.flights)} in flight" if len(self.flights) > 1 else ""), flush=True)

    def _wait(self) -> None:
        """Until some child may have ended: block on the only one, or poll several."""
        if len(self.flights) == 1:
            job = self.flights[0].job
            with contextlib.suppress(subprocess.TimeoutExpired):
                job.proc.wait(timeout=max(0.0, job.deadline - time.monotonic()))
        elif self.flights:
            time.sleep(self.POLL_S)

    def _finish(self, flight: Flight, row: Row) -> None:
        self.flights.remove(flight)
        self.pool.release(flight.placement)
        if flight.shared:
            row = {**row, "shared_timing": True}
        append_row(self.rows_path, row)
        self.written.append(row)
        done = len(self.written)
        eta = (time.monotonic() - self.started) / done * (self.todo_count - done)
        detail = row["error"]
        if row["status"] == "ok":
            accuracy = row.get("accuracy_top1")
            detail = (f"{row['throughput_samples_per_s']:.1f} samples/s, peak "
                      f"{row['peak_memory_bytes'] / 2**20:.1f} MiB, top-1 "
                      + ("-" if accuracy is None else f"{accuracy:.3f}"))
        label = f"{flight.cell.label()} seed={flight.seed}: " if self.may_overlap() else ""
        print(f"      {label}{row['status']}: {detail} | {_format_duration(row.get('wall_time_s') or 0)}"
              f" | done {self.done_before + done}/{self.total}"
              + (f", {len(self.flights)} in flight" if self.flights else "")
              + f" | ETA {_format_duration(eta)}", flush=True)
        if self.timings:
            print(f"      {format_phases(row, time.monotonic() - flight.job.started)}", flush=True)

    def may_overlap(self) -> bool:
        """Whether runs may overlap, so that the line of a finished run must name it."""
        return len(self.devices.gpus) > 1 or self.devices.cpu_slots > 1

    def _position(self) -> int:
        return self.done_before + len(self.written) + len(self.flights)


def format_phases(row: Row, total_s: float) -> str:
    """Where one run's wall time went, from its row's ``phase_s`` and the runner's own clock:
    ``start`` is the job file's writing to the worker reading it (fork or exec, and imports);
    ``other`` what no phase covers (the row's writing, the process's exit, the runner's polling)."""
    phases = dict(row.get("phase_s") or {})
    phases["other"] = max(0.0, total_s - sum(phases.values()))
    return "time: " + ", ".join(f"{name} {seconds:.2f}" for name, seconds in phases.items()) + f" | total {total_s:.2f} s"
