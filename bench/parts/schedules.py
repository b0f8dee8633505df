"""Learning-rate schedules, all from ``torch.optim.lr_scheduler``, stepped once per optimizer step.

Built per step (not per epoch) so every schedule, OneCycle included, sees the same clock: the
defect this avoids is a per-epoch ``step()`` on a schedule sized in steps. ``lr_warmup_steps``
prepends a linear warmup with ``LinearLR`` + ``SequentialLR``, and the following schedule is
sized to the steps that remain, so it still ends where it should.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.optim import Optimizer
from torch.optim import lr_scheduler as sched

Factory = Callable[[Optimizer, int], sched.LRScheduler]

SCHEDULES: dict[str, Factory] = {
    "constant": lambda opt, n: sched.ConstantLR(opt, factor=1.0, total_iters=0),
    "cosine": lambda opt, n: sched.CosineAnnealingLR(opt, T_max=n),
    "step": lambda opt, n: sched.StepLR(opt, step_size=max(1, n // 3), gamma=0.1),
    "multistep": lambda opt, n: sched.MultiStepLR(opt, milestones=[n // 2, n * 3 // 4], gamma=0.1),
    "exponential": lambda opt, n: sched.ExponentialLR(opt, gamma=0.01 ** (1 / max(1, n))),  # ends at 1%
    "cosine_restarts": lambda opt, n: sched.CosineAnnealingWarmRestarts(opt, T_0=max(1, n // 3)),
    "onecycle": lambda opt, n: sched.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=n),
}


def build_scheduler(name: str, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0) -> sched.LRScheduler:
    """The named schedule over ``total_steps`` optimizer steps, after an optional linear warmup."""
    if warmup_steps <= 0:
        return SCHEDULES[name](optimizer, total_steps)
    warmup = sched.LinearLR(optimizer, start_factor=1.0 / (warmup_steps + 1), total_iters=warmup_steps)
    main = SCHEDULES[name](optimizer, max(1, total_steps - warmup_steps))
    return sched.SequentialLR(optimizer, [warmup, main], milestones=[warmup_steps])


def lr_trace(name: str, total_steps: int, warmup_steps: int = 0, lr: float = 0.1) -> list[float]:
    """The learning rate at every step of a schedule, on a throwaway optimizer (for plots/tests)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = build_scheduler(name, optimizer, total_steps, warmup_steps)
    trace = []
    for _ in range(total_steps):
        trace.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return trace
