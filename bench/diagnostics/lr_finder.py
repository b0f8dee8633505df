"""LR range test (Smith 2017, "Cyclical Learning Rates for Training Neural Networks", §3.3; the
fastai ``lr_find`` variant): train a throwaway copy of a run while the learning rate grows
exponentially from ``min_lr`` to ``max_lr``, one optimizer step per value, and watch the loss.

The loss is smoothed with a bias-corrected exponential moving average (β = 0.98, as fastai) and
the test stops once the smoothed loss exceeds 4× the best seen (or a loss is not finite): beyond
that point the learning rate is too large for the model to descend.

Suggested learning rate: the LR at the minimum of the smoothed loss divided by 10 (fastai's
``minimum`` suggestion). At the minimum the LR is already near the edge of stability (for SGD on
a quadratic with curvature h the edge is 2/h; the loss stops falling somewhat before it), so an
order of magnitude below is a safe peak LR for a schedule. The alternative, the LR of steepest
descent of the smoothed loss, depends on finite differences of a noisy curve and moves between
seeds by more than the 10× margin; it is recorded too (``steepest_lr``) but not suggested.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader

from bench.reports.figures import _pyplot, _save
from bench.training.train import prepare_run

SMOOTHING = 0.98
DIVERGENCE_FACTOR = 4.0


@dataclass
class RangeTest:
    """What one LR range test saw: one entry per optimizer step that ran."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    stopped_early: bool = False  # diverged before reaching max_lr

    @property
    def min_loss_lr(self) -> float:
        return self.lrs[min(range(len(self.smoothed)), key=self.smoothed.__getitem__)]

    @property
    def suggested_lr(self) -> float:
        return self.min_loss_lr / 10

    @property
    def steepest_lr(self) -> float:
        """LR where the smoothed loss falls fastest per unit of log LR (up to the minimum)."""
        end = self.smoothed.index(min(self.smoothed))
        if end < 1:
            return self.lrs[0]
        slopes = [(self.smoothed[i + 1] - self.smoothed[i]) / math.log(self.lrs[i + 1] / self.lrs[i])
                  for i in range(end)]
        return self.lrs[min(range(len(slopes)), key=slopes.__getitem__)]


def exponential_lrs(min_lr: float, max_lr: float, steps: int) -> list[float]:
    """``steps`` learning rates from min_lr to max_lr, equally spaced in log."""
    if steps < 2:
        return [min_lr]
    ratio = (max_lr / min_lr) ** (1 / (steps - 1))
    return [min_lr * ratio**i for i in range(steps)]


def lr_range_test(train_step: Callable[[float], float], min_lr: float, max_lr: float, steps: int,
                  smoothing: float = SMOOTHING, divergence_factor: float = DIVERGENCE_FACTOR) -> RangeTest:
    """Run ``train_step(lr)`` (one optimizer step at ``lr``, returning its loss) over exponentially
    increasing LRs; stop when the smoothed loss exceeds ``divergence_factor`` × its best."""
    result = RangeTest()
    average = 0.0
    for i, lr in enumerate(exponential_lrs(min_lr, max_lr, steps)):
        loss = train_step(lr)
        if not math.isfinite(loss):
            result.stopped_early = True
            break
        average = smoothing * average + (1 - smoothing) * loss
        smoothed = average / (1 - smoothing ** (i + 1))  # bias correction: early steps not pulled to 0
        result.lrs.append(lr)
        result.losses.append(loss)
        result.smoothed.append(smoothed)
        if smoothed > divergence_factor * min(result.smoothed):
            result.stopped_early = True
            break
    if not result.lrs:
        raise ValueError(f"the first step, at lr {min_lr:g}, gave a non-finite loss; lower --min-lr")
    return result


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def plot_range_test(result: RangeTest, title: str, path: Path) -> Path:
    """Loss (raw and smoothed) against LR on a log axis, with the minimum and the suggestion marked."""

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    ax.plot(result.lrs, result.losses, alpha=0.3, label="loss")
    ax.plot(result.lrs, result.smoothed, label=f"smoothed (EMA β={SMOOTHING})")
    ax.axvline(result.min_loss_lr, color="grey", linestyle=":", label=f"minimum, lr {result.min_loss_lr:.3g}")
    ax.axvline(result.suggested_lr, color="red", linestyle="--", label=f"suggested (minimum/10), lr {result.suggested_lr:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale), one optimizer step each")
    ax.set_ylabel("training loss")
    low, high = min(result.smoothed + result.losses), max(result.smoothed)
    ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))  # raw losses explode at the end
    ax.set_title(title)
    ax.legend(fontsize=8)
    _save(fig, path)
    return path


def find_lr(config: object, seed: int, min_lr: float, max_lr: float, steps: int) -> RangeTest:
    """The range test on a fresh copy of the run ``config`` describes (its model, data and tricks,
    the schedule left out); nothing of it is kept."""


    run = prepare_run(config, seed, torch.device(config.device))
    loader = DataLoader(run.splits.train, batch_size=config.per_rank_batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))

    def batches():
        while True:
            for x, y in loader:
                yield x.to(run.device), y.to(run.device)

    stream = batches()

    def train_step(lr: float) -> float:
        set_lr(run.optimizer, lr)
        return run.step(next(stream)).item()

    return lr_range_test(train_step, min_lr, max_lr, steps)
