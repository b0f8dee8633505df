"""Lookahead (Zhang et al. 2019, https://arxiv.org/abs/1907.08610) around the configured optimizer.

The inner optimizer moves the fast weights θ; a slow copy φ is kept. Every k optimizer steps
    φ ← φ + α(θ − φ),  θ ← φ
and the inner optimizer's state (momentum) is kept, as in the paper and timm. Hand-written although
timm's ``Lookahead`` wraps any optimizer too: it keeps the slow weights inside the optimizer's state
and evaluates the fast ones, while here evaluation must see the slow weights (below).

The slow weights live in a copy of the model (parameters and buffers), so evaluation uses them,
as the paper's Algorithm 1 returns φ: ``eval_model`` is that copy, i.e. the slow weights of the
last synchronisation, with the BatchNorm statistics of that moment (copied at each sync). timm
instead evaluates the fast weights unless ``sync_lookahead()`` is called. The copy costs one
parameter-sized buffer, counted as ``trick_state``.

Counting: every optimizer step of the loop counts, including one GradScaler skipped (fp16).
With SAM the inner step is SAM's; with accumulation and DDP one step per global batch, and every
rank holds the same slow weights. Rejected with ``ema``: both choose the weights that are evaluated.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from bench.base.safeyaml import shorten
from bench.parts.distributed import unwrap
from bench.tricks.spec import RunContext, Trick, register

DEFAULTS = {"k": 5, "alpha": 0.5}


@torch.no_grad()
def lookahead_sync(fast: list[torch.Tensor], slow: list[torch.Tensor], alpha: float) -> None:
    """φ ← φ + α(θ − φ), then θ ← φ."""
    torch._foreach_lerp_(slow, fast, alpha)
    torch._foreach_copy_(fast, slow)


@register
class Lookahead(Trick):
    name = "lookahead"
    description = "slow weights pulled toward the fast ones every k steps, fast reset to slow (evaluated: slow)"
    values_help = "null | {k: 5, alpha: 0.5} (either key may be omitted: defaults k 5, alpha 0.5)"
    default = None

    @classmethod
    def parse(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, dict) or set(value) - set(DEFAULTS):
            raise ValueError(f"{shorten(value)} is not null or {{k: steps >= 1, alpha: in (0, 1]}}")
        k, alpha = value.get("k", DEFAULTS["k"]), value.get("alpha", DEFAULTS["alpha"])
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"{shorten(value)}: k must be an integer >= 1")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1 or math.isnan(alpha):
            raise ValueError(f"{shorten(value)}: alpha must be a number in (0, 1]")
        return {"k": k, "alpha": float(alpha)}

    @classmethod
    def check(cls, value: Any, config: Any) -> None:
        if value is not None and config.tricks.get("ema") is not None:
            raise ValueError("lookahead cannot run with ema: both replace the evaluated weights (lookahead "
                             "its slow weights, ema its average), so only one of them would be measured")

    @classmethod
    def advise(cls, value: Any, config: Any, total_steps: int) -> str | None:
        if value is not None and value["k"] > total_steps:
            return (f"k {value['k']} exceeds the run's {total_steps} optimizer steps: the slow weights never "
                    "move and the initial weights are evaluated")
        return None

    def setup(self, run: RunContext) -> None:
        self.k, self.alpha = self.value["k"], self.value["alpha"]
        self.steps = 0
        model = unwrap(run.model)
        self.slow_model = copy.deepcopy(model)
        self.slow_model.requires_grad_(False)
        self.fast = [p for p in model.parameters()]
        self.slow = [p for p in self.slow_model.parameters()]
        self.fast_buffers = [b for b in model.buffers() if b.is_floating_point()]
        self.slow_buffers = [b for b in self.slow_model.buffers() if b.is_floating_point()]

    @torch.no_grad()
    def after_step(self) -> None:
        self.steps += 1
        if self.steps % self.k:
            return
        lookahead_sync(self.fast, self.slow, self.alpha)
        if self.slow_buffers:  # the evaluated copy gets the BN statistics of this moment
            torch._foreach_copy_(self.slow_buffers, self.fast_buffers)

    def eval_model(self, model: nn.Module) -> nn.Module:
        return self.slow_model
