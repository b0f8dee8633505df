"""Gradient accumulation: k micro-batches per optimizer step, the global batch unchanged.

The loop divides each micro-batch loss by the number of micro-batches, so the accumulated
gradient equals the gradient of the whole batch (exactly, for models without BatchNorm; with
BatchNorm each micro-batch is normalised with its own statistics). Throughput is counted per
optimizer step, never per micro-batch.
"""
from __future__ import annotations

from typing import Any

from bench.tricks.spec import Batch, Trick, register


@register
class Accumulation(Trick):
    name = "accumulation"
    description = "gradient accumulation over k micro-batches per optimizer step"
    values_help = "integer k >= 1 dividing the (per-rank) batch size"
    default = 1

    @classmethod
    def parse(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{value!r} is not an integer >= 1")
        return value

    @classmethod
    def check(cls, value: Any, config: Any) -> None:
        if config.per_rank_batch_size % value:
            raise ValueError(
                f"accumulation {value} does not divide the per-rank batch size "
                f"{config.per_rank_batch_size}"
            )

    def split_batch(self, batch: Batch) -> list[Batch]:
        inputs, targets = batch
        return list(zip(inputs.chunk(self.value), targets.chunk(self.value)))
