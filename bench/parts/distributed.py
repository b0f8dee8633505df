"""Data-parallel plumbing: the process group of a run launched by torchrun, and the few collectives
the loop needs.

Every function works in a plain single process too (rank 0 of 1, collectives return their input),
so the training loop reads the same for one process and for W: it never asks whether it is
distributed. torchrun sets RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE for each rank.
"""
from __future__ import annotations

import contextlib
import os
import signal
from typing import Any, Callable, ContextManager, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bench.parts.lifeline import die_with_parent

T = TypeVar("T")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


# Set by torchrun for each rank it starts. The runner is the only launcher of training processes,
# so a value inherited from the shell (a login node of a torchrun/SLURM job) is not for us:
# `drop_inherited_rank_variables` removes them at the CLI, before any child can inherit them.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK")


def _env_count(name: str, default: int, minimum: int) -> int:
    """An integer torchrun put in the environment; junk is a one-line error naming the variable."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise RuntimeError(f"environment variable {name}={text[:40]!r} is not an integer >= {minimum} "
                           "(torchrun sets it for each rank)")
    return value


def drop_inherited_rank_variables() -> list[str]:
    """Remove torchrun's per-rank variables from this process's environment; returns their names."""
    return [name for name in RANK_VARIABLES if os.environ.pop(name, None) is not None]


def launched_world_size() -> int:
    """The number of ranks torchrun started (1 for a plain process): known before the group exists."""
    return _env_count("WORLD_SIZE", 1, minimum=1)


def local_rank() -> int:
    return _env_count("LOCAL_RANK", 0, minimum=0)


def allocated_cpus() -> int:
    """The CPUs this process was given, not the machine's: a SLURM task's allocation
    (``SLURM_CPUS_PER_TASK``; ``SLURM_CPUS_ON_NODE`` without one), else the CPU affinity mask
    (cgroups, taskset), else every core."""
    names = ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE") if os.environ.get("SLURM_JOB_ID") else ()
    for name in names:
        text = os.environ.get(name, "")
        if text.isdigit() and int(text) > 0:
            return int(text)
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def threads_per_rank(ranks_on_this_machine: int) -> int:
    """Intra-op threads for each of n ranks sharing this run's cores, so they do not oversubscribe
    (the cores the runner gave this run when it runs beside others: ``TRICKBENCH_CORES``; else the
    process's allocation, :func:`allocated_cpus`)."""
    cores = int(os.environ.get("TRICKBENCH_CORES") or allocated_cpus())
    return max(1, cores // ranks_on_this_machine)


def rank_device(name: str) -> torch.device:
    """This rank's device: one GPU per rank (cuda:LOCAL_RANK) under torchrun; as named otherwise."""
    if name == "cuda" and launched_world_size() > 1:
        return torch.device("cuda", local_rank())
    return torch.device(name)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join the process group when torchrun started more than one rank; a no-op otherwise.

    gloo on CPU, nccl on CUDA (one GPU per rank). On CPU each rank gets an equal share of the
    cores. The group is torn down only after a clean exit: after a failure the other ranks may
    be blocked in a collective, and the launcher kills them anyway.
    """
    if launched_world_size() == 1:
        yield
        return
    # torchrun starts its ranks in sessions of their own (out of the runner's killpg), and a
    # launcher killed with SIGKILL cannot stop them: the kernel does, when the launcher dies.
    die_with_parent(signal.SIGKILL)
    if os.getppid() == 1:  # the launcher died before the signal was armed
        os._exit(1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(threads_per_rank(_env_count("LOCAL_WORLD_SIZE", 1, minimum=1)))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    yield
    dist.destroy_process_group()


def wrap(model: nn.Module) -> DistributedDataParallel:
    """DDP around a model already on this rank's device.

    device_ids=None: the module is on one device and the loop moves batches there itself.
    No find_unused_parameters (every parameter gets a gradient every step) and no static_graph:
    non-reentrant activation checkpointing recomputes inside backward without re-running DDP's
    forward, so each parameter's gradient hook still fires exactly once per backward.
    """
    return DistributedDataParallel(model, device_ids=None)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (to copy or evaluate: DDP's own forward is collective)
    and inside torch.compile's wrapper (the compile trick puts it inside or around DDP)."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif type(model).__name__ == "OptimizedModule":  # torch.compile's; importing torch._dynamo is slow
            model = model._orig_mod
        else:
            return model


def no_grad_sync(model: nn.Module) -> ContextManager[Any]:
    """Forward+backward passes inside keep their gradients on this rank (DDP's no_sync)."""
    return model.no_sync() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather(value: T) -> list[T]:
    """Every rank's ``value`` (picklable), in rank order, on every rank."""
    if not dist.is_initialized():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def on_rank0(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and give its result to every rank (which wait for it)."""
    if not dist.is_initialized():
        return fn()
    box = [fn() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean(value: float) -> float:
    """The mean of ``value`` over the ranks (e.g. of each rank's loss on its share of the data)."""
    values = gather(value)
    return sum(values) / len(values)
