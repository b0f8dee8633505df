"""Exponential moving average of the weights, evaluated instead of the raw weights.

Uses ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``. ``use_buffers=True``
averages the BatchNorm running statistics along with the parameters, so the evaluated model's
statistics match its averaged weights (the defect this avoids: raw-model BN stats paired with
averaged weights). After n updates, with θ_k the weights after step k:
    ema_n = d^(n-1) θ_1 + Σ_{k=2..n} (1-d) d^(n-k) θ_k
(AveragedModel copies the weights on its first update).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from bench.distributed import unwrap
from bench.spec import RunContext, Trick
from bench.tricks import register


@register
class EMA(Trick):
    name = "ema"
    description = "exponential moving average of weights and BN buffers, used for evaluation"
    values_help = "null | decay in (0, 1), e.g. 0.999"
    default = None

    @classmethod
    def parse(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(f"{value!r} is not null or a decay in (0, 1)")
        return float(value)

    def setup(self, run: RunContext) -> None:
        # The plain module, not a DDP wrapper: AveragedModel deep-copies it. Under DDP every rank
        # holds the same weights after each step, so every rank's average is the same too.
        self.model = unwrap(run.model)
        self.averaged = AveragedModel(
            self.model, multi_avg_fn=get_ema_multi_avg_fn(self.value), use_buffers=True
        )

    @torch.no_grad()
    def after_step(self) -> None:
        self.averaged.update_parameters(self.model)

    def eval_model(self, model: nn.Module) -> nn.Module:
        return self.averaged.module
