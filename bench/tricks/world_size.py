"""Data parallelism: W processes (ranks), each training a replica on its share of every batch.

A cell with world_size W > 1 is launched by the runner under torchrun, one process per rank
(one GPU per rank on CUDA). Here the model is wrapped in ``DistributedDataParallel``, which
averages the gradients over the ranks during backward. ``batch_size`` is the global batch split
over the ranks (``batch_scaling: global``, strong scaling) or the batch of each rank
(``batch_scaling: per_rank``, weak scaling). With BatchNorm each rank normalises with the
statistics of its own share, as with accumulation; DDP broadcasts rank 0's running statistics
before every forward, and rank 0 evaluates.
"""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch
from torch import nn

from bench.parts import distributed
from bench.tricks.spec import Trick, register


@register
class WorldSize(Trick):
    name = "world_size"
    description = "data-parallel processes (DistributedDataParallel under torchrun)"
    values_help = "integer W >= 1 (W > 1: DDP; on CUDA at most the visible GPU count per node)"
    default = 1

    @classmethod
    def parse(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{value!r} is not an integer >= 1")
        return value

    @classmethod
    def check(cls, value: Any, config: Any) -> None:
        if config.batch_scaling == "global" and config.batch_size % value:
            raise ValueError(f"world_size {value} does not divide the global batch size {config.batch_size} "
                             "(or set batch_scaling: per_rank)")
        nodes = config.launcher.nnodes
        if value % nodes:
            raise ValueError(f"world_size {value} is not a multiple of launcher.nnodes {nodes}")
        if config.device == "cuda":

            visible = torch.cuda.device_count()
            if value // nodes > visible:
                raise ValueError(f"world_size {value} needs {value // nodes} GPUs per node (one per rank) "
                                 f"but {visible} are visible")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        if distributed.world_size() != self.value:
            raise RuntimeError(f"world_size {self.value} needs {self.value} processes, this run has "
                               f"{distributed.world_size()}: launch it with torchrun (the runner does)")
        self.model = distributed.wrap(model)
        return self.model

    def sync_context(self, is_last: bool) -> ContextManager[Any]:
        # Accumulated micro-batches add up locally; one all-reduce per optimizer step suffices.
        return contextlib.nullcontext() if is_last else distributed.no_grad_sync(self.model)

    def eval_model(self, model: nn.Module) -> nn.Module:
        return distributed.unwrap(model)  # DDP's own forward would wait for the other ranks
