"""The training loop: the only code that knows the order of things.

One run = one (cell, seed), in its own process (one per rank with world_size > 1: the same loop
runs on every rank, and ``bench.parts.distributed`` makes its few collectives no-ops in one process).
Steps are optimizer steps. The first ``warmup_steps`` are untimed (allocator, autotuning, lazy
init); the next one runs under memory tracking and the one after under FLOP counting, each a
real training step measured on its own and kept off every clock; the rest are timed.
Evaluation runs between epochs, outside timing.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.flop_counter import FlopCounterMode

from bench.config.train_config import TrainConfig
from bench.parts import distributed, flop_formulas  # noqa: F401 - registers FLOP formulas torch lacks
from bench.parts.clock import MEASUREMENT_STEPS, Laps, min_total_steps
from bench.parts.data import DatasetSplits, augment_train, build_dataset
from bench.parts.models import build_model
from bench.parts.schedules import build_scheduler
from bench.training.allocator import allocator_peak
from bench.training.measure import (
    Diverged,
    RunRecorder,
    peak_rss_bytes,
    peak_tflops,
    synchronize,
)
from bench.training.memory import track_step_memory
from bench.tricks import TRICKS
from bench.tricks.spec import Batch, Criterion, LossFn, RunContext, StepFns, Trick

__all__ = ["Diverged", "Run", "build_tricks", "make_step", "prepare_run", "run_step", "train"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def build_tricks(config: TrainConfig) -> list[Trick]:
    """Instances of the tricks this config turns on, in registration order."""
    return [e.obj(config.tricks[e.name]) for e in TRICKS if e.obj.is_active(config.tricks[e.name])]


def build_optimizer(config: TrainConfig, model: nn.Module, tricks: list[Trick] = ()) -> torch.optim.Optimizer:
    """The configured optimizer over the parameter groups and options the tricks ask for."""
    opt = config.optimizer
    groups: list[dict[str, Any]] = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    options: dict[str, Any] = {"lr": opt.lr, "weight_decay": opt.weight_decay}
    if opt.name == "sgd":
        options.update(momentum=opt.momentum, nesterov=opt.nesterov)
    for trick in tricks:
        groups = trick.param_groups(model, groups)
        options = trick.optimizer_options(options)
    return (torch.optim.SGD if opt.name == "sgd" else torch.optim.AdamW)(groups, **options)


def unchanged(step: StepFns) -> StepFns:
    return step


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, tricks: list[Trick], batch: Batch,
              instrument: Callable[[StepFns], StepFns] = unchanged) -> StepFns:
    """One optimizer step on ``batch`` as composed by the tricks.

    ``instrument`` sees the loop's own step before any trick wraps it (the memory tracker uses
    it to tell the loop's allocations from the tricks').
    """
    for trick in tricks:
        batch = trick.transform_batch(batch)
    micro_batches = [batch]
    for trick in tricks:
        micro_batches = [mb for b in micro_batches for mb in trick.split_batch(b)]
    set_to_none = all(trick.release_gradients() for trick in tricks)
    criterion: Criterion = F.cross_entropy
    for trick in tricks:
        criterion = trick.criterion(criterion)

    def model_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return criterion(model(inputs), targets)

    loss_fn: LossFn = model_loss
    for trick in tricks:
        loss_fn = trick.wrap_loss(loss_fn)

    def compute_grads() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=set_to_none)
        total = torch.zeros((), device=batch[0].device)
        for i, (inputs, targets) in enumerate(micro_batches):
            with contextlib.ExitStack() as sync:
                for trick in tricks:
                    sync.enter_context(trick.sync_context(is_last=i == len(micro_batches) - 1))
                with contextlib.ExitStack() as stack:
                    for trick in tricks:
                        stack.enter_context(trick.forward_context())
                    # Mean loss per micro-batch / their count = the mean over the whole batch.
                    loss = loss_fn(inputs, targets) / len(micro_batches)
                total += loss.detach().float()
                for trick in tricks:
                    loss = trick.scale_loss(loss)
                loss.backward()
        return total

    step = instrument(StepFns(compute_grads, optimizer.step))
    for trick in tricks:
        step = trick.wrap_step(step)
    inner_update = step.apply_update

    def apply_update() -> None:
        for trick in tricks:  # the true gradients of the step, whatever wrapped it
            trick.process_gradients()
        inner_update()

    return StepFns(step.compute_grads, apply_update)


def run_step(model: nn.Module, optimizer: torch.optim.Optimizer, tricks: list[Trick], batch: Batch,
             instrument: Callable[[StepFns], StepFns] = unchanged) -> torch.Tensor:
    """One optimizer step and the tricks' bookkeeping after it; the batch's mean loss."""
    step = make_step(model, optimizer, tricks, batch, instrument)
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


@dataclass
class Run:
    """The pieces of one run, built by :func:`prepare_run`, and its composed training step."""

    config: TrainConfig
    device: torch.device
    splits: DatasetSplits
    model: nn.Module  # as the loop calls it: possibly a DDP wrapper
    optimizer: torch.optim.Optimizer
    tricks: list[Trick]

    def step(self, batch: Batch, instrument: Callable[[StepFns], StepFns] = unchanged) -> torch.Tensor:
        return run_step(self.model, self.optimizer, self.tricks, batch, instrument)

    def train_loader(self, seed: int) -> DataLoader:
        """This rank's 1/W of every epoch's permutation (all of it in one process).

        With batch_scaling global, W ranks then train on the batches of one process, as sets of
        samples. Every epoch has exactly ``len(loader)`` batches (both drop the last partial one).
        """
        sampler = DistributedSampler(self.splits.train, num_replicas=distributed.world_size(),
                                     rank=distributed.rank(), shuffle=True, seed=seed, drop_last=True)
        config = self.config
        pin = self.device.type == "cuda" if config.pin_memory is None else config.pin_memory
        loader = DataLoader(self.splits.train, batch_size=config.per_rank_batch_size, sampler=sampler,
                            drop_last=True, num_workers=config.num_workers, pin_memory=pin,
                            persistent_workers=config.persistent_workers, prefetch_factor=config.prefetch_factor)
        if len(loader) == 0:
            raise ValueError(f"per-rank batch size {self.config.per_rank_batch_size} exceeds the {len(sampler)} "
                             f"training samples of each of {distributed.world_size()} ranks")
        return loader

    def evaluator(self) -> Callable[[], dict[str, float]] | None:
        """Accuracy of the model the tricks evaluate (EMA weights, the module inside DDP), or None
        when accuracy means nothing (random labels). Once, by rank 0; the other ranks wait."""
        if not self.splits.accuracy_meaningful:
            return None
        model = self.model
        for trick in self.tricks:
            model = trick.eval_model(model)
        loader = DataLoader(self.splits.test, batch_size=self.config.eval_batch_size)
        num_classes = self.splits.num_classes
        return lambda: distributed.on_rank0(lambda: {
            f"accuracy_{k}": v for k, v in evaluate(model, loader, self.device, self.tricks, num_classes).items()})


def prepare_run(config: TrainConfig, seed: int, device: torch.device, laps: Laps | None = None) -> Run:
    """Seeded dataset, model, optimizer and set-up tricks of one run, in the order tricks expect.
    ``laps``: where the time of building the data and the model is recorded."""
    laps = laps or Laps()
    # Per rank, so ranks draw different augmentations and dropout masks; the initial weights are
    # rank 0's on every rank (DDP broadcasts them), the data order comes from the sampler's seed.
    seed_everything(seed + distributed.rank())
    torch.use_deterministic_algorithms(config.deterministic)
    tricks = build_tricks(config)
    with laps("data"):
        splits = build_dataset(config)
        splits = augment_train(splits, [t for t in (trick.sample_transform(splits) for trick in tricks)
                                        if t is not None])
    with laps("model"):
        # On its device before a DDP wrap; the input's side length for fixed-size models (ViT).
        model = build_model(config.model, splits.num_classes, image_size=splits.input_shape[-1]).to(device)
        for trick in tricks:
            model = trick.prepare_model(model)
        model.train()
        optimizer = build_optimizer(config, model, tricks)
        context = RunContext(device=device, model=model, optimizer=optimizer, config=config,
                             num_classes=splits.num_classes, total_steps=optimizer_steps(config, len(splits.train)))
        for trick in tricks:
            trick.setup(context)
    return Run(config, device, splits, model, optimizer, tricks)


def optimizer_steps(config: TrainConfig, train_size: int) -> int:
    """The run's optimizer steps: ``steps``, or ``epochs`` of the batches each rank's loader yields
    (DistributedSampler and DataLoader both drop the last partial share)."""
    return config.steps or config.epochs * (train_size // distributed.world_size() // config.per_rank_batch_size)


def endless_batches(loader: DataLoader, device: torch.device) -> Iterator[Batch]:
    """Batches forever, reshuffling each epoch."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)  # the epoch's permutation, the same on every rank
        for inputs, targets in loader:
            yield inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        epoch += 1


def memory_step(run: Run, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
    """One training step under memory tracking: its loss and the memory metrics.

    The peak is the allocator's high-water mark over the step (on CPU and CUDA alike); its parts
    are the ledger's categories at the ledger's own peak, plus ``untracked``: the allocator's bytes
    beyond them (buffers a kernel allocates and frees inside one op, workspaces).
    """
    # What the step's own zero_grad does first thing anyway, done before tracking starts: freed
    # gradients (the default) are then all allocated in the step; gradients kept and zeroed in
    # place (zero_grad: zeros, accumulation tricks that keep them) are live all through it.
    run.optimizer.zero_grad(set_to_none=all(trick.release_gradients() for trick in run.tricks))
    with allocator_peak(run.device) as allocator, \
            track_step_memory(run.model, run.optimizer, run.tricks, batch, run.device) as ledger:
        loss = run.step(batch, instrument=ledger.instrument)
    synchronize(run.device)
    report = ledger.report()
    peak = allocator.peak_bytes(report.live_at_start_bytes)
    if peak is None:  # no allocator reading: the ledger's own count
        peak = report.peak_memory_bytes
    metrics: dict[str, Any] = {
        "peak_memory_bytes": peak, "peak_memory_source": allocator.source,
        "memory_breakdown": {**report.breakdown, "untracked": peak - report.peak_memory_bytes},
        "activations_high_water_bytes": report.activations_high_water_bytes}
    if run.device.type == "cuda":
        metrics.update(cuda_max_allocated_bytes=torch.cuda.max_memory_allocated(run.device),
                       cuda_max_reserved_bytes=torch.cuda.max_memory_reserved(run.device))
    return loss, metrics


def flop_step(run: Run, batch: Batch) -> tuple[torch.Tensor, int]:
    """One training step under FlopCounterMode (its module hooks hold on to recomputed
    activations, so it never shares a step with memory tracking): its loss and FLOPs."""
    with FlopCounterMode(display=False) as counter:
        loss = run.step(batch)
    return loss, counter.get_total_flops()


def train(config: TrainConfig, seed: int, device: torch.device,
          on_progress: Callable[[int, int], None] = lambda done, total: None) -> dict[str, Any]:
    """Train one run and return its metrics (the measured part of a results row)."""
    recorder = RunRecorder(device)
    laps = Laps()
    run = prepare_run(config, seed, device, laps)
    loader = run.train_loader(seed)
    steps_per_epoch = len(loader)
    total_steps = config.steps or config.epochs * steps_per_epoch
    assert total_steps == optimizer_steps(config, len(run.splits.train))  # what the tricks were told
    memory_at, flops_at = config.warmup_steps, config.warmup_steps + 1  # the MEASUREMENT_STEPS
    first_timed = config.warmup_steps + MEASUREMENT_STEPS
    if total_steps < min_total_steps(config.warmup_steps):  # refused at validation; the loop relies on it
        raise ValueError(f"{total_steps} steps leave none to time (need {min_total_steps(config.warmup_steps)})")
    scheduler = build_scheduler(config.lr_schedule, run.optimizer, total_steps, config.lr_warmup_steps)
    evaluator = run.evaluator()
    batches = endless_batches(loader, device)

    recorder.start_training()
    for step in range(total_steps):
        if step and step % steps_per_epoch == 0:  # the previous epoch is complete: its curve point
            with laps("evaluation"):
                recorder.end_epoch(step // steps_per_epoch - 1, evaluator)
        timed = step >= first_timed
        with laps("batches"), recorder.fetching(timed):  # a timed step's wait for data counts against throughput
            batch = next(batches)
        if step == memory_at:  # real training steps, but slowed by instrumentation: off every clock
            with laps("memory_step"), recorder.untimed():
                loss, memory = memory_step(run, batch)
        elif step == flops_at:
            with laps("flop_step"), recorder.untimed():
                loss, flops_per_step = flop_step(run, batch)
        elif timed:
            with laps("timed_steps"), recorder.timed_step():
                loss = run.step(batch)
        else:  # warm-up: allocator, autotuning and lazy state, timed only as warmup_time_s
            with laps("warmup_steps"), recorder.warmup_step():
                loss = run.step(batch)
        scheduler.step()
        recorder.add_loss(loss)
        on_progress(step + 1, total_steps)
    with laps("evaluation"):
        recorder.end_epoch((total_steps - 1) // steps_per_epoch, evaluator)  # possibly a partial epoch
    on_progress(total_steps, total_steps)

    metrics = recorder.summary(global_batch_size=config.per_rank_batch_size * distributed.world_size())
    achieved_tflops = flops_per_step / recorder.mean_step_s() / 1e12
    peak, peak_source = peak_tflops(device, config.tricks["precision"])
    metrics.update(
        world_size=distributed.world_size(),
        flops_per_step=flops_per_step,
        achieved_tflops=achieved_tflops,
        peak_tflops=peak,
        peak_tflops_source=peak_source,
        mfu=achieved_tflops / peak,
        peak_rss_bytes=peak_rss_bytes(),
        time_to_target_s=recorder.time_to_target_s(config.target_accuracy),
        # DataLoader pins only for an accelerator; on CPU pin_memory: true is recorded as not applied.
        pin_memory_applied=loader.pin_memory and device.type == "cuda",
        **every_rank_memory(memory),
        phase_s=laps.seconds,
    )
    for trick in run.tricks:
        metrics.update(trick.metrics())
    return metrics


def every_rank_memory(memory: dict[str, Any]) -> dict[str, Any]:
    """The memory metrics of the rank with the largest peak (what each device must hold; its
    breakdown sums to that peak), with every rank's peak."""
    ranks = distributed.gather(memory)
    peaks = [m["peak_memory_bytes"] for m in ranks]
    combined = {**ranks[peaks.index(max(peaks))], "peak_memory_bytes_per_rank": peaks}
    for key in ("cuda_max_allocated_bytes", "cuda_max_reserved_bytes"):
        if key in memory:
            combined[key] = max(m[key] for m in ranks)
    return combined
