"""Warm start of one run: a fork server that imported torch, torchvision and the worker once.

Every run still gets a process of its own (a crash, the allocator, autotuning, compile caches
and global flags stay in it), but it is forked from a server that has already paid the imports,
instead of a fresh interpreter paying them again (about 3 s here, most of a small run).

The server is multiprocessing's ``forkserver``. It is started by the first run of a runner
process, from the runner's environment, and it imports the modules in :data:`PRELOAD` and
nothing else. It never runs a training step, never starts a thread pool and never touches CUDA
(``torch.cuda`` is initialised, if at all, inside a run's own child). So every child starts from
the same state, one that no run has touched, and nothing a run changes reaches the next one.

Protection is the same as for a fresh process. Each child starts a session of its own (a time
limit kills its group), and it takes the runner's environment at the time of the run (its
devices, its share of the cores). The worker then arms its death signal and its memory cap as
before. The server exits when the runner does, even by SIGKILL (it reads EOF on a pipe), and
then the kernel kills its children (``PR_SET_PDEATHSIG``). world_size > 1 runs keep torchrun,
which starts, watches and stops its ranks and does the rendezvous across nodes.
"""
from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.forkserver
import os
import subprocess
from pathlib import Path
from typing import Any

from bench.training import worker

# What the server imports: the worker (torch, torchvision, the trick catalogue, models, data)
# and what a run would otherwise import lazily (scikit-learn for the digits dataset).
PRELOAD = ["bench.training.worker", *worker.LAZY_LIBRARIES]


@functools.lru_cache(maxsize=1)
def context() -> multiprocessing.context.ForkServerContext:
    """The fork server's context; the server itself starts with the first run."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


class ForkedRun:
    """One run forked from the server (or from this process): the part of ``subprocess.Popen`` the
    runner uses."""

    def __init__(self, job_path: Path, env: dict[str, str], here: bool = False) -> None:
        ctx = multiprocessing.get_context("fork") if here else context()
        self.process = ctx.Process(target=worker.forked_main, args=(str(job_path), env),
                                   name=f"trickbench-run {job_path.name}")
        self.process.start()
        self.pid = self.process.pid

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(f"run {self.pid}", timeout or 0.0)
        return self.process.exitcode


def start(job_path: Path, env: dict[str, Any] | None, here: bool = False) -> ForkedRun:
    """Fork one run of the worker on ``job_path`` with ``env`` (default: the runner's own now).

    ``here``: fork this process instead of the server. For a process that starts one run and has
    itself imported the worker and nothing more (a cluster task: it unpickled its task, which
    imports the worker): a server would pay the imports a second time for that one run."""
    return ForkedRun(job_path, dict(os.environ if env is None else env), here)
