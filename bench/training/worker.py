"""Child process: trains one (cell, seed) and writes its row. ``python -m bench.training.worker JOB.json``.

Everything a run can do to a process (allocator state, autotuning, compile caches, a crash)
stays in this process. Failures are caught here and written as rows with a status; a death
without a row is recorded by the parent.

A scheduler's signal (SIGTERM: preemption, ``scontrol requeue``, a cancel; SIGUSR2: the warning
before a time limit or a preemption) means "stop, this run will be run again": the worker writes
no row, leaves ``row_path.stopped`` (the signal's name) and exits with :data:`STOPPED_EXIT`, so
that whoever started it can tell a stop from a failure (a cluster task requeues the run).

With world_size > 1 torchrun starts this once per rank. Rank 0 (on each node: local rank 0)
writes the row; another rank that fails writes its own row beside it (``row_path.rankR``) and
exits non-zero, so that torchrun stops the ranks still waiting for it in a collective.
"""
from __future__ import annotations

import importlib
import json
import multiprocessing.forkserver
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import setproctitle
import torch

from bench.config.train_config import TrainConfig
from bench.parts import distributed, lifeline
from bench.parts.clock import Laps
from bench.store.results import RunRecord, write_atomic
from bench.training.measure import environment
from bench.training.train import Diverged, train


class StepProgress:
    """Remembers the last step reached; draws a step counter when stderr is a terminal."""

    def __init__(self) -> None:
        self.step = 0
        self._drawn = 0.0
        self._tty = sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        self.step = done
        now = time.monotonic()
        if self._tty and (now - self._drawn > 0.5 or done == total):
            self._drawn = now
            end = "\n" if done == total else ""
            print(f"\r    step {done}/{total}", end=end, file=sys.stderr, flush=True)


# How allocation failures read when a CPU run hits its address-space cap: PyTorch's CPU
# allocator, oneDNN (which cannot build a kernel without scratch memory), and C++ new.
# A shared library that cannot be mapped under the cap fails its import the same way.
CPU_ALLOCATION_FAILURES = ("can't allocate memory", "could not create a primitive", "bad_alloc",
                           "Cannot allocate memory", "failed to map segment")
# Imported lazily by some datasets; under an address-space cap their import fails or, for
# OpenBLAS (scipy's), spins at 100% CPU retrying its thread buffers. Loaded before the cap.
LAZY_LIBRARIES = ("sklearn.datasets", "sklearn.model_selection")
# Exit code of a worker stopped by a scheduler signal (EX_TEMPFAIL): no row, run it again.
STOPPED_EXIT = 75
SCHEDULER_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


def stopped_marker(row_path: str | Path) -> Path:
    """Where a stopped worker names the signal that stopped it (beside its row file)."""
    return Path(f"{row_path}.stopped")


def stop_on_scheduler_signals(row_path: str | Path) -> None:
    """SIGTERM or SIGUSR2: leave the marker and exit with :data:`STOPPED_EXIT` at once, no row."""
    def stop(signum: int, frame: Any) -> None:
        try:
            write_atomic(stopped_marker(row_path), signal.Signals(signum).name)
        finally:
            os._exit(STOPPED_EXIT)

    for signum in SCHEDULER_SIGNALS:
        signal.signal(signum, stop)


def classify(error: BaseException) -> str:
    if isinstance(error, Diverged):
        return "diverged"
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return "oom"
    if any(message in str(error) for message in CPU_ALLOCATION_FAILURES):
        return "oom"
    return "error"


def load_before_cap() -> None:
    """Import and start what a run would otherwise load under its memory cap: the lazily imported
    libraries, and torch's intra-op thread pool (each thread maps its stack)."""
    for name in LAZY_LIBRARIES:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    torch.ones(256, 256) @ torch.ones(256, 256)


def limit_memory(extra_mb: int) -> None:
    """Cap this process's address space at what it maps now plus ``extra_mb``.

    Relative to the current size because the CUDA build of torch maps gigabytes of address
    space at import; an absolute cap would measure the libraries, not the run. Everything the
    run imports is loaded first, so the cap applies to the run, not to the libraries.
    """
    load_before_cap()
    pages = int(Path("/proc/self/statm").read_text().split()[0])
    current = pages * resource.getpagesize()
    cap = current + extra_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def injected_fault() -> Callable[[int], None]:
    """Test-only fault injection, for tests/test_ddp.py and tests/test_signals.py: TRICKBENCH_FAULT=raise@R (or hang@R)
    makes rank R raise (or hang) after its first step. Unset, as in every real run: a no-op."""
    kind, _, at = os.environ.get("TRICKBENCH_FAULT", "").partition("@")
    if not kind or int(at) != distributed.rank():
        return lambda step: None

    def fault(step: int) -> None:
        if kind == "hang":
            time.sleep(24 * 3600)
        raise RuntimeError(f"injected fault on rank {distributed.rank()} after step {step} (TRICKBENCH_FAULT)")

    return fault


def describe(error: BaseException, status: str, config: TrainConfig, step: int) -> str:
    """The row's error text: the exception's last line, and what to do when a cap stopped the start."""
    last_line = (str(error).strip().splitlines() or [type(error).__name__])[-1]
    where = f"rank {distributed.rank()}: " if distributed.world_size() > 1 else ""
    text = f"{where}{type(error).__name__}: {last_line}"
    if status == "oom" and step == 0 and config.memory_limit_mb is not None:
        text = (f"memory_limit_mb={config.memory_limit_mb} is too small to start the run (data, model and "
                f"first step must fit); {text}")
    return text


def run_job(job: dict[str, Any], started_s: float = 0.0) -> dict[str, Any]:
    """Train one (cell, seed) and return its row; every failure inside the run is a row too.
    ``started_s``: seconds from the job file's writing to this process reading it (its start)."""
    config = TrainConfig.from_dict(job["config"], file="<job>")
    device = distributed.rank_device(config.device)
    record = RunRecord.for_job(job)
    laps = Laps()
    with laps("environment"):
        record.env = environment(device)  # before the memory cap: it starts git
    progress = StepProgress()
    fault = injected_fault()

    def on_progress(done: int, total: int) -> None:
        progress(done, total)
        fault(done)

    record.start()
    started = time.perf_counter()
    try:
        if config.memory_limit_mb is not None and device.type == "cpu":
            limit_memory(config.memory_limit_mb)
        record.metrics = train(config, job["seed"], device, on_progress=on_progress)
        record.metrics["phase_s"] = {"start": started_s, **laps.seconds, **record.metrics["phase_s"]}
    except Exception as error:  # noqa: BLE001 - every failure becomes data
        step = error.step if isinstance(error, Diverged) else progress.step
        status = classify(error)
        record.fail(status, describe(error, status, config, step), failed_at_step=step)
    record.finish(time.perf_counter() - started)
    return record.to_row()


def main(argv: list[str], forked: bool = False) -> int:
    """Run the job file ``argv[0]``; ``forked``: started by the fork server, not by the runner."""
    entered = time.time()
    job_path = Path(argv[0])
    job = json.loads(job_path.read_text())
    stop_on_scheduler_signals(job["row_path"])
    # Exit with the parent (the runner, the fork server, or torchrun for a rank), even one killed by SIGKILL.
    lifeline.die_with_parent(signal.SIGKILL)
    single = job["config"].get("world_size", 1) == 1 and not forked  # else the parent is not the runner
    lifeline.watch_parent(job.get("runner_pid") if single else None)
    if job["config"].get("deterministic"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reads it at init
    with distributed.process_group(distributed.rank_device(job["config"]["device"])):
        row = run_job(job, started_s=entered - job.get("written_at", entered))
        failed = row["status"] != "ok"
        out = Path(job["row_path"])
        if distributed.local_rank() != 0:
            if not failed:
                return 0
            out = out.with_name(f"{out.name}.rank{distributed.rank()}")
        write_atomic(out, json.dumps(row, default=str))  # the parent sees a whole row or none
        if failed and distributed.world_size() > 1:
            raise SystemExit(1)  # skips the group's teardown; torchrun stops the other ranks
    return 0


def forked_main(job_path: str, env: dict[str, str]) -> None:
    """A run forked from the fork server (bench.execution.forkserver), made to look like a fresh
    worker process before :func:`main` runs."""
    for signum in SCHEDULER_SIGNALS:  # not the handlers of the process it was forked from
        signal.signal(signum, signal.SIG_DFL)
    os.setsid()  # a session of its own, as a fresh child gets: a time limit kills the whole group
    # multiprocessing hands each forked child the write end of the pipe whose EOF tells the server
    # that the runner is gone. Held here, it would keep the server (and so this run, whose death
    # signal fires when the server exits) alive after a SIGKILL of the runner: close it.
    server = multiprocessing.forkserver._forkserver
    if server._forkserver_alive_fd is not None:
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None
    # ps (and whoever looks for a run's processes) sees the run's job, not the fork server's command
    setproctitle.setproctitle(f"{sys.executable} -m bench.training.worker {job_path}")
    os.environ.clear()
    os.environ.update(env)  # the runner's environment of this run: its devices, its share of the cores
    if "OMP_NUM_THREADS" in env:  # a fresh process reads it when torch loads; this one loaded before
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    # A child of the fork server inherits "forkserver" as its default start method: DataLoader
    # workers would then start from the server and receive the dataset pickled (10x slower
    # batches, measured). A fresh process has no method set: fork on Linux.
    multiprocessing.set_start_method(None, force=True)
    raise SystemExit(main([job_path], forked=True))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
