"""Exponential moving average of the weights, evaluated instead of the raw weights.

Uses ``torch.optim.swa_utils.AveragedModel``. ``use_buffers=True`` averages the BatchNorm
running statistics along with the parameters, so the evaluated model's statistics match its
averaged weights (the defect this avoids: raw-model BN stats paired with averaged weights).
After n updates with a constant decay d, θ_k being the weights after step k:
    ema_n = d^(n-1) θ_1 + Σ_{k=2..n} (1-d) d^(n-k) θ_k
(AveragedModel copies the weights on its first update).

``ema: {decay: d, warmup: true}`` lowers the decay early in training, as
``tf.train.ExponentialMovingAverage(num_updates=t)`` does (and in the spirit of timm's
``ModelEmaV3`` warm-up): the update after t earlier ones uses min(d, (1 + t) / (10 + t)), so the
average forgets the random initial weights within the first tens of steps instead of the
1/(1-d) steps a constant decay needs. Practical advice: without warm-up pick 1/(1-d) well below
the run's optimizer steps (validation warns otherwise).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from bench.base.safeyaml import shorten
from bench.parts.distributed import unwrap
from bench.tricks.spec import RunContext, Trick, register


def ema_decay(decay: float, earlier_updates: int, warmup: bool) -> float:
    """Decay of the update that follows ``earlier_updates`` others: constant, or warmed up."""
    if not warmup:
        return decay
    return min(decay, (1 + earlier_updates) / (10 + earlier_updates))


def _decay_of(value: Any) -> tuple[float, bool]:
    """(decay, warmup) of a parsed value: a float, or {"decay": d, "warmup": True}."""
    return (value["decay"], True) if isinstance(value, dict) else (value, False)


@register
class EMA(Trick):
    name = "ema"
    description = "exponential moving average of weights and BN buffers, used for evaluation"
    values_help = "null | decay in (0, 1), e.g. 0.999 | {decay: 0.999, warmup: true}"
    default = None

    @classmethod
    def parse(cls, value: Any) -> Any:
        """A float, or {decay, warmup}; canonical form: the plain float unless warmup is on."""
        if value is None:
            return None
        decay, warmup = value, False
        if isinstance(value, dict):
            unknown = set(value) - {"decay", "warmup"}
            if unknown or "decay" not in value or not isinstance(value.get("warmup", False), bool):
                raise ValueError(f"{shorten(value)} is not {{decay: d, warmup: true|false}}")
            decay, warmup = value["decay"], value.get("warmup", False)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
            raise ValueError(f"{shorten(value)} is not null, a decay in (0, 1) or {{decay: d, warmup: true}}")
        return {"decay": float(decay), "warmup": True} if warmup else float(decay)

    @classmethod
    def advise(cls, value: Any, config: Any, total_steps: int) -> str | None:
        if value is None:
            return None
        decay, warmup = _decay_of(value)
        horizon = 1 / (1 - decay)
        if warmup or horizon <= total_steps:
            return None
        return (f"decay {decay:g} averages over ~{horizon:.0f} steps but the run has {total_steps}; the averaged "
                "model stays close to the initial weights (lower the decay or use {decay: d, warmup: true})")

    def setup(self, run: RunContext) -> None:
        # The plain module, not a DDP wrapper: AveragedModel deep-copies it. Under DDP every rank
        # holds the same weights after each step, so every rank's average is the same too.
        self.decay, self.warmup = _decay_of(self.value)
        self.updates = 0  # AveragedModel's own count is a tensor; reading it would sync the GPU
        self.model = unwrap(run.model)
        self.averaged = AveragedModel(self.model, multi_avg_fn=self._average, use_buffers=True)

    def _average(self, averaged: list[torch.Tensor], current: list[torch.Tensor], _count: Any) -> None:
        # Called from the second update on (the first copies), so self.updates - 1 came before.
        decay = ema_decay(self.decay, self.updates - 1, self.warmup)
        get_ema_multi_avg_fn(decay)(averaged, current, _count)

    @torch.no_grad()
    def after_step(self) -> None:
        self.updates += 1
        self.averaged.update_parameters(self.model)

    def eval_model(self, model: nn.Module) -> nn.Module:
        return self.averaged.module
