"""The training loop: the only code that knows the order of things.

One run = one (cell, seed), in its own process (one per rank with world_size > 1: the same loop
runs on every rank, and ``bench.distributed`` makes its few collectives no-ops in one process).
Steps are optimizer steps. The first
``warmup_steps`` are untimed (allocator, autotuning, lazy init); the next step runs once under
memory/FLOP tracking; the rest are timed. Evaluation runs between epochs, outside timing.
"""
from __future__ import annotations

import contextlib
import random
import statistics
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from bench import distributed
from bench.config import TrainConfig
from bench.data import build_dataset
from bench.measure import StepClock, measure_step_memory, peak_rss_bytes, peak_tflops, synchronize
from bench.models import build_model
from bench.schedules import build_scheduler
from bench.spec import Batch, RunContext, StepFns, Trick
from bench.tricks import TRICKS


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int) -> None:
        super().__init__(f"non-finite training loss at step {step}")
        self.step = step


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def build_tricks(config: TrainConfig) -> list[Trick]:
    """Instances of the tricks this config turns on, in registration order."""
    return [e.obj(config.tricks[e.name]) for e in TRICKS if e.obj.is_active(config.tricks[e.name])]


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    opt = config.optimizer
    if opt.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=opt.lr, momentum=opt.momentum,
                               weight_decay=opt.weight_decay, nesterov=opt.nesterov)
    return torch.optim.AdamW(model.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, tricks: list[Trick],
              batch: Batch) -> StepFns:
    """One optimizer step on ``batch`` as composed by the tricks."""
    micro_batches = [batch]
    for trick in tricks:
        micro_batches = [mb for b in micro_batches for mb in trick.split_batch(b)]

    def compute_grads() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=batch[0].device)
        for i, (inputs, targets) in enumerate(micro_batches):
            with contextlib.ExitStack() as sync:
                for trick in tricks:
                    sync.enter_context(trick.sync_context(is_last=i == len(micro_batches) - 1))
                with contextlib.ExitStack() as stack:
                    for trick in tricks:
                        stack.enter_context(trick.forward_context())
                    # Mean loss per micro-batch / their count = the mean over the whole batch.
                    loss = F.cross_entropy(model(inputs), targets) / len(micro_batches)
                total += loss.detach().float()
                for trick in tricks:
                    loss = trick.scale_loss(loss)
                loss.backward()
        return total

    step = StepFns(compute_grads, optimizer.step)
    for trick in tricks:
        step = trick.wrap_step(step)
    return step


def run_step(model: nn.Module, optimizer: torch.optim.Optimizer, tricks: list[Trick], batch: Batch) -> torch.Tensor:
    step = make_step(model, optimizer, tricks, batch)
    loss = step.compute_grads()
    step.apply_update()
    for trick in tricks:
        trick.after_step()
    return loss


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, tricks: list[Trick],
             num_classes: int) -> dict[str, float]:
    """Top-1 (and top-5 when there are more than 5 classes) accuracy on the held-out split."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = seen = 0
    with contextlib.ExitStack() as stack:
        for trick in tricks:
            stack.enter_context(trick.forward_context())
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            top = model(inputs).topk(min(5, num_classes), dim=1).indices
            hits = top == targets[:, None]
            correct1 += hits[:, 0].sum().item()
            correct5 += hits.any(dim=1).sum().item()
            seen += len(targets)
    model.train(was_training)
    result = {"top1": correct1 / seen}
    if num_classes > 5:
        result["top5"] = correct5 / seen
    return result


def endless_batches(loader: DataLoader, device: torch.device) -> Iterator[tuple[int, Batch]]:
    """(epoch, batch) forever, reshuffling each epoch."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)  # the epoch's permutation, the same on every rank
        for inputs, targets in loader:
            yield epoch, (inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True))
        epoch += 1


def prepare_run(config: TrainConfig, seed: int, device: torch.device):
    """Seeded dataset, model, optimizer and set-up tricks of one run, in the order tricks expect."""
    # Per rank, so ranks draw different augmentations and dropout masks; the initial weights are
    # rank 0's on every rank (DDP broadcasts them), the data order comes from the sampler's seed.
    seed_everything(seed + distributed.rank())
    torch.use_deterministic_algorithms(config.deterministic)
    splits = build_dataset(config)
    tricks = build_tricks(config)
    model = build_model(config.model, splits.num_classes).to(device)  # on its device before a DDP wrap
    for trick in tricks:
        model = trick.prepare_model(model)
    model.train()
    optimizer = build_optimizer(config, model)
    for trick in tricks:
        trick.setup(RunContext(device=device, model=model, optimizer=optimizer, config=config))
    return splits, model, optimizer, tricks


def train(config: TrainConfig, seed: int, device: torch.device,
          on_progress: Callable[[int, int], None] = lambda done, total: None) -> dict[str, Any]:
    """Train one run and return its metrics (the measured part of a results row)."""
    started = time.perf_counter()
    splits, model, optimizer, tricks = prepare_run(config, seed, device)

    # Each rank reads its 1/W of every epoch's permutation (all of it in one process). With
    # batch_scaling global, W ranks then train on the batches of one process, as sets of samples.
    sampler = DistributedSampler(splits.train, num_replicas=distributed.world_size(), rank=distributed.rank(),
                                 shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(splits.train, batch_size=config.per_rank_batch_size, sampler=sampler, drop_last=True,
                        num_workers=config.num_workers, pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise ValueError(f"per-rank batch size {config.per_rank_batch_size} exceeds the {len(sampler)} training "
                         f"samples of each of {distributed.world_size()} ranks")
    total_steps = config.steps or config.epochs * len(loader)
    memory_step = config.warmup_steps  # the step measured under tracking
    if total_steps < memory_step + 2:
        raise ValueError(f"{total_steps} steps leave none to time after {config.warmup_steps} warm-up "
                         f"steps and 1 memory step; train longer")
    scheduler = build_scheduler(config.lr_schedule, optimizer, total_steps, config.lr_warmup_steps)
    eval_loader = DataLoader(splits.test, batch_size=config.eval_batch_size)
    eval_model = model
    for trick in tricks:
        eval_model = trick.eval_model(eval_model)

    clock = StepClock(device)
    losses: list[torch.Tensor] = []
    data_wait_s = 0.0
    timed_wall_s = 0.0
    window_start: float | None = None
    curve: list[dict[str, Any]] = []
    warmup_time_s = 0.0
    eval_s = 0.0
    memory = None
    cuda_peaks: dict[str, int] = {}
    batches = endless_batches(loader, device)
    epoch_of_step = 0

    # Windows open and close at a barrier: the wall time of a window is then the slowest rank's.
    def close_window() -> None:
        nonlocal timed_wall_s, window_start
        if window_start is not None:
            synchronize(device)
            distributed.barrier()
            clock.collect()
            timed_wall_s += time.perf_counter() - window_start
            window_start = None

    def end_epoch(epoch: int, step: int) -> None:
        nonlocal eval_s
        close_window()
        check_finite(losses)
        losses_this = torch.stack(losses[-len(loader):]).float()
        # train_time_s: time spent training so far, evaluation excluded (for time-to-target).
        point = {"epoch": epoch + 1, "step": step, "train_loss": distributed.mean(losses_this.mean().item()),
                 "train_time_s": time.perf_counter() - started - eval_s}
        if splits.accuracy_meaningful:
            eval_started = time.perf_counter()
            # Once, on the whole test split, by rank 0; the other ranks wait for its result.
            point.update(distributed.on_rank0(lambda: {
                f"accuracy_{k}": v for k, v in evaluate(eval_model, eval_loader, device, tricks,
                                                        splits.num_classes).items()}))
            eval_s += time.perf_counter() - eval_started
        curve.append(point)

    def check_finite(values: list[torch.Tensor]) -> None:
        finite = torch.isfinite(torch.stack(values))
        if not finite.all():
            raise Diverged(int((~finite).nonzero()[0]))

    def open_window() -> None:
        nonlocal window_start
        synchronize(device)
        distributed.barrier()
        window_start = time.perf_counter()

    for step in range(total_steps):
        timed = step > memory_step
        if timed and window_start is None:
            open_window()
        wait = time.perf_counter()
        epoch, batch = next(batches)
        waited = time.perf_counter() - wait
        if epoch != epoch_of_step:  # first batch of a new epoch: close the last one, evaluate
            end_epoch(epoch_of_step, step)
            epoch_of_step = epoch
            if timed:
                open_window()
        if timed:
            data_wait_s += waited

        if step == memory_step:
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with measure_step_memory(model, optimizer) as memory:
                loss = run_step(model, optimizer, tricks, batch)
            synchronize(device)
            if device.type == "cuda":
                cuda_peaks = {"cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device),
                              "cuda_max_reserved_bytes": torch.cuda.max_memory_reserved(device)}
        elif timed:
            t0 = clock.start()
            loss = run_step(model, optimizer, tricks, batch)
            clock.stop(t0)
        else:
            t0 = time.perf_counter()
            loss = run_step(model, optimizer, tricks, batch)
            synchronize(device)
            warmup_time_s += time.perf_counter() - t0
        scheduler.step()
        losses.append(loss)
        if step % 50 == 49:
            check_finite(losses)
        on_progress(step + 1, total_steps)
    end_epoch(epoch_of_step, total_steps)
    on_progress(total_steps, total_steps)

    durations_ms = [d * 1e3 for d in clock.durations_s]
    timed_steps = len(durations_ms)
    samples = timed_steps * config.per_rank_batch_size * distributed.world_size()  # global
    data_stall_fraction = data_wait_s / timed_wall_s
    timed_wall_s = max(distributed.gather(timed_wall_s))  # the slowest rank's
    peaks = distributed.gather(memory.peak_memory_bytes)
    every_rank_cuda_peaks = distributed.gather(cuda_peaks)
    cuda_peaks = {k: max(p[k] for p in every_rank_cuda_peaks) for k in cuda_peaks}
    q = statistics.quantiles(durations_ms, n=10) if timed_steps >= 2 else [durations_ms[0]] * 9
    compute_s = sum(clock.durations_s)
    achieved_tflops = memory.flops_per_step / (compute_s / timed_steps) / 1e12
    peak, peak_source = peak_tflops(device, config.tricks["precision"])
    final = curve[-1]
    target = config.target_accuracy
    reached = [] if target is None else [
        p["train_time_s"] for p in curve if p.get("accuracy_top1") is not None and p["accuracy_top1"] >= target]
    tail = torch.stack(losses[-min(10, len(losses)):]).float()
    metrics: dict[str, Any] = {
        "steps": total_steps,
        "timed_steps": timed_steps,
        "throughput_samples_per_s": samples / timed_wall_s,
        "step_time_ms_median": statistics.median(durations_ms),
        "step_time_ms_p10": q[0],
        "step_time_ms_p90": q[8],
        "step_times_ms": [round(d, 4) for d in durations_ms],
        "data_stall_fraction": data_stall_fraction,
        "warmup_time_s": warmup_time_s,
        "world_size": distributed.world_size(),
        "peak_memory_bytes": max(peaks),  # the largest rank's: what each device must hold
        "peak_memory_bytes_per_rank": peaks,
        "memory_breakdown": memory.breakdown,
        "flops_per_step": memory.flops_per_step,
        "achieved_tflops": achieved_tflops,
        "peak_tflops": peak,
        "peak_tflops_source": peak_source,
        "mfu": achieved_tflops / peak,
        "peak_rss_bytes": peak_rss_bytes(),
        "accuracy_top1": final.get("accuracy_top1"),
        "accuracy_top5": final.get("accuracy_top5"),
        "final_train_loss": distributed.mean(tail.mean().item()),
        "time_to_target_s": reached[0] if reached else None,
        "curve": curve,
        "wall_time_s": time.perf_counter() - started,
    }
    metrics.update(cuda_peaks)
    return metrics
