"""Where each run of a matrix may go on this machine: which GPUs, and what may run beside it.

Pure bookkeeping, no processes: :mod:`bench.execution.runner` asks :meth:`DevicePool.place` for the next run
in round-robin order and starts it on the placement it gets, or waits for a run to finish.

The rules, so that no two timed runs share a device:
- a CUDA run of world size W (W ranks on this node) takes W free GPUs of its own, shown to the
  child alone through ``CUDA_VISIBLE_DEVICES``;
- a CPU run takes the whole machine: it waits until nothing else runs, and nothing starts beside
  it (its threads use every core, and GPU runs need the host's cores for their own Python);
- only with ``shared_timing`` may up to ``cpu_slots`` CPU runs run together (and beside GPU runs):
  their rows are marked, and reports and ``compare`` do not compare their timing;
- a multi-node run runs alone, so that every node runs the same runs in the same order.

Runs start in order; one waiting for GPUs is not overtaken by later, narrower runs (nothing
waits forever, at the cost of GPUs idling briefly before a wide run).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

from bench.config.train_config import TrainConfig
from bench.parts.distributed import allocated_cpus


@dataclass(frozen=True)
class LocalDevices:
    """What a matrix may use on this machine: GPU indices (``--devices``; default every visible GPU
    when the matrix has CUDA cells), and how many CPU runs may share the machine (``--parallel``,
    allowed above 1 only with ``shared_timing``)."""

    gpus: tuple[int, ...] = ()
    cpu_slots: int = 1
    shared_timing: bool = False


@dataclass(frozen=True)
class Request:
    """What one run needs: ``gpus`` of its own, and whether it needs the machine to itself."""

    gpus: int = 0
    alone: bool = False


@dataclass(frozen=True)
class Placement:
    """Where a run was placed: GPU indices (as this process numbers them), none for a CPU run."""

    gpus: tuple[int, ...] = ()
    alone: bool = False

    @property
    def is_cpu(self) -> bool:
        return not self.gpus


def request_for(config: TrainConfig, shared_timing: bool) -> Request:
    """The :class:`Request` of one run of ``config``."""
    if config.device == "cuda":
        nnodes = config.launcher.nnodes
        return Request(gpus=config.world_size // nnodes, alone=nnodes > 1)
    return Request(alone=not shared_timing)


@dataclass
class DevicePool:
    """GPUs (indices into this process's visible CUDA devices) and CPU slots, with what is taken."""

    gpus: Sequence[int] = ()
    cpu_slots: int = 1
    _free_gpus: list[int] = field(init=False)
    _cpu_in_use: int = field(default=0, init=False)
    _placed: int = field(default=0, init=False)
    _alone: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self._free_gpus = list(self.gpus)

    @property
    def in_flight(self) -> int:
        return self._placed

    def place(self, request: Request) -> Optional[Placement]:
        """A placement for ``request`` now, taken from the pool; None when it must wait."""
        if self._alone or (request.alone and self._placed):
            return None
        if request.gpus > len(self._free_gpus):
            return None
        if not request.gpus and not request.alone and self._cpu_in_use >= self.cpu_slots:
            return None
        taken, self._free_gpus = self._free_gpus[:request.gpus], self._free_gpus[request.gpus:]
        if not request.gpus and not request.alone:
            self._cpu_in_use += 1
        self._placed += 1
        self._alone = request.alone
        return Placement(tuple(taken), request.alone)

    def release(self, placement: Placement) -> None:
        """Give a finished run's devices back."""
        self._free_gpus = sorted([*self._free_gpus, *placement.gpus], key=list(self.gpus).index)
        if placement.is_cpu and not placement.alone:
            self._cpu_in_use -= 1
        self._placed -= 1
        self._alone = False


def too_wide(requests: dict[str, Request], gpus: Sequence[int]) -> Optional[str]:
    """Why some run can never be placed on ``gpus`` (named by the key of its request), or None."""
    for name, request in requests.items():
        if request.gpus > len(gpus):
            listed = f"--devices lists {len(gpus)}" if gpus else "no GPU is available"
            return f"{name} needs {request.gpus} GPUs per node; {listed}"
    return None


def child_environment(placement: Placement, cpu_slots: int) -> dict[str, str]:
    """Variables a run's child gets on top of the runner's: its GPUs, or its share of the cores.

    ``CUDA_VISIBLE_DEVICES`` lists the placement's devices as the runner sees them (its own
    ``CUDA_VISIBLE_DEVICES``, if set, maps indices to physical ids); ranks use cuda:0…W-1 of
    that list. A shared CPU run gets ``cores // cpu_slots`` cores (``TRICKBENCH_CORES``, which
    :func:`bench.parts.distributed.threads_per_rank` divides among its ranks).
    """
    if placement.gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else None
        return {"CUDA_VISIBLE_DEVICES": ",".join(ids[i] if ids else str(i) for i in placement.gpus)}
    if placement.alone:
        return {}
    cores = max(1, allocated_cpus() // cpu_slots)
    return {"TRICKBENCH_CORES": str(cores), "OMP_NUM_THREADS": str(cores)}
