"""cuDNN autotuning: ``torch.backends.cudnn.benchmark``.

With it, the first convolution of each new input shape tries cuDNN's algorithms and keeps the
fastest (the warm-up steps absorb that cost); without it cuDNN picks by heuristics. It applies
only to CUDA: on other devices the value is accepted and the row says
``cudnn_benchmark_applied: false``, so a CPU row never reads as if it had been tuned.
"""
from __future__ import annotations

from typing import Any

import torch

from bench.tricks.spec import RunContext, Switch, register


@register
class CudnnBenchmark(Switch):
    name = "cudnn_benchmark"
    description = "torch.backends.cudnn.benchmark (CUDA only; recorded as not applied elsewhere)"

    def setup(self, run: RunContext) -> None:
        self.applied = run.device.type == "cuda"
        if self.applied:
            torch.backends.cudnn.benchmark = self.value

    def metrics(self) -> dict[str, Any]:
        return {"cudnn_benchmark_applied": self.applied}
