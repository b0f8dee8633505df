"""Progressive resizing (fast.ai's DAWNBench entry; Composer's ``ProgressiveResizing``,
https://docs.mosaicml.com/projects/composer/en/latest/method_cards/progressive_resizing.html):
train on downscaled images first and grow them to full size, so early steps cost less.

``progressive_resizing: {start: 0.5, end: 1.0, until: 0.75}``: at optimizer step t of T the
training batch is resized (torchvision's bilinear ``resize``, antialiased) to
scale(t)·S, scale growing linearly from ``start`` to ``end`` over the first ``until``·T steps and
staying at ``end`` afterwards (S: the dataset's image side). Sides are rounded to the nearest
multiple of 4 (Composer's default ``size_increment``: fine enough that a 16-pixel run gets 8, 12
and 16, where multiples of 8 would leave only 8 and 16), never below 8, and the full side S is
kept as it is when the scale reaches it. Images must be square (every dataset here is); evaluation
always runs at the full size.

Measurement: the loop's two measurement steps (memory, then FLOPs; right after warm-up) run at
the *end* size, the largest, so the row's ``peak_memory_bytes`` is the run's real peak and its
``flops_per_step`` (hence ``achieved_tflops``/``mfu``) that of the final size, an upper bound of
the run's mean. The row adds, per side: ``progressive_steps`` (optimizer steps run at it, the
measurement steps included), ``progressive_step_time_ms`` (mean over the timed steps, measured by
this trick from the start of ``transform_batch`` to its ``after_step``: the same span as the
loop's step time, with CUDA events on GPU) and ``progressive_model_flops`` (forward+backward of
the bare model on one per-rank batch at that side, counted by FlopCounterMode on the meta device
after training, so the tricks' own extra passes, e.g. SAM's, are not in it).
"""
from __future__ import annotations

import math
import statistics
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from torchvision.transforms.v2 import functional as TF

from bench.base.safeyaml import shorten
from bench.parts.clock import MEASUREMENT_STEPS, StepClock
from bench.parts.data import dataset_facts
from bench.parts.models import build_model, meta_forward_problem
from bench.tricks.spec import Batch, RunContext, Trick, register

SIZE_MULTIPLE = 4
SMALLEST_SIDE = 8
DEFAULTS = {"start": 0.5, "end": 1.0, "until": 0.75}


def scale_at(step: int, total_steps: int, start: float, end: float, until: float) -> float:
    """The image scale at optimizer step ``step`` (0-based) of ``total_steps``."""
    ramp = until * total_steps
    progress = min(step / ramp, 1.0) if ramp > 0 else 1.0
    return start + (end - start) * progress


def allowed_sides(full: int) -> list[int]:
    """Multiples of SIZE_MULTIPLE from SMALLEST_SIDE below ``full``, and ``full`` itself."""
    return [*range(SMALLEST_SIDE, full, SIZE_MULTIPLE), full]


def side_at(scale: float, full: int) -> int:
    """The allowed side nearest to scale·full (the larger one on a tie)."""
    target = scale * full
    return min(allowed_sides(full), key=lambda side: (abs(side - target), -side))


def resize(inputs: torch.Tensor, side: int) -> torch.Tensor:
    """Images (N, C, H, W) resized to side x side: torchvision's bilinear resize, antialiased as PIL
    would. The schedule only ever shrinks (sides <= the full size); there it is pixel-identical to
    F.interpolate(antialias=True) and keeps a channels_last batch channels_last."""
    if inputs.shape[-2:] == (side, side):
        return inputs
    return TF.resize(inputs, [side, side], antialias=True)


def model_flops(model_name: str, num_classes: int, shape: tuple[int, ...]) -> int:
    """FLOPs of the bare model's forward and backward on a batch of ``shape``, shapes only."""

    with torch.device("meta"):
        model = build_model(model_name, num_classes).train()
        inputs = torch.empty(shape)
    with FlopCounterMode(display=False) as counter:
        model(inputs).sum().backward()
    return counter.get_total_flops()


@register
class ProgressiveResizing(Trick):
    name = "progressive_resizing"
    description = "training images grow from start*S to end*S over the first `until` of the steps"
    values_help = "null | {start: 0.5, end: 1.0, until: 0.75}: 0 < start <= end <= 1, until in [0, 1]"
    default = None

    @classmethod
    def parse(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, dict) or set(value) - set(DEFAULTS):
            raise ValueError(f"{shorten(value)} is not null or {{start: s, end: e, until: u}}")
        merged = {**DEFAULTS, **value}
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
               for v in merged.values()):
            raise ValueError(f"{shorten(value)}: start, end and until must be numbers")
        parsed = {k: float(v) for k, v in merged.items()}
        if not 0 < parsed["start"] <= parsed["end"] <= 1 or not 0 <= parsed["until"] <= 1:
            raise ValueError(f"{shorten(value)} needs 0 < start <= end <= 1 and 0 <= until <= 1")
        return parsed

    @classmethod
    def check(cls, value: Any, config: Any) -> None:
        """Every side the schedule can reach must go through the model (a meta-device forward)."""
        if value is None:
            return

        try:
            facts = dataset_facts(config)
        except FileNotFoundError:
            return  # the cell's feasibility check reports the missing data
        channels, height, full = facts.input_shape
        if height != full:
            raise ValueError(f"progressive_resizing resizes square images; {config.dataset} has {height}x{full}")
        smallest, largest = side_at(value["start"], full), side_at(value["end"], full)
        for side in (s for s in allowed_sides(full) if smallest <= s <= largest):
            # The model is built once, for the full size (as the run builds it), then fed each side.
            problem = meta_forward_problem(config.model, facts.num_classes, (channels, side, side), 2, built_for=full)
            if problem:
                raise ValueError(f"progressive_resizing reaches {side}x{side} images, which {config.model} "
                                 f"cannot take: {problem}")

    def setup(self, run: RunContext) -> None:
        if run.total_steps is None:
            raise ValueError("progressive_resizing needs the run's total optimizer steps (RunContext.total_steps)")
        self.total_steps, self.config, self.num_classes = run.total_steps, run.config, run.num_classes
        warmup = run.config.warmup_steps
        self.measurement_steps = range(warmup, warmup + MEASUREMENT_STEPS)  # as bench.training.train schedules them
        self.device = run.device
        self.step, self.started = 0, None
        self.steps_at: dict[int, int] = {}
        self.clocks: dict[int, StepClock] = {}  # side -> durations of its timed steps
        self.batch_shape: tuple[int, ...] = ()

    def side(self, step: int, full: int) -> int:
        """The side of step ``step``: the schedule's, or the end size in a measurement step."""
        value = self.value
        scale = value["end"] if step in self.measurement_steps else \
            scale_at(step, self.total_steps, value["start"], value["end"], value["until"])
        return side_at(scale, full)

    def transform_batch(self, batch: Batch) -> Batch:
        inputs, targets = batch
        self.current = self.side(self.step, inputs.shape[-1])
        self.batch_shape = (len(inputs), inputs.shape[1], self.current, self.current)
        timed = self.step >= self.measurement_steps.stop  # the loop times the steps after them
        self.started = self.clocks.setdefault(self.current, StepClock(self.device)).start() if timed else None
        return resize(inputs, self.current), targets

    def after_step(self) -> None:
        self.steps_at[self.current] = self.steps_at.get(self.current, 0) + 1
        if self.started is not None:
            self.clocks[self.current].stop(self.started)
        self.step += 1

    def metrics(self) -> dict[str, Any]:
        for clock in self.clocks.values():
            clock.collect()
        shape = self.batch_shape
        return {
            "progressive_steps": {str(side): n for side, n in sorted(self.steps_at.items())},
            "progressive_step_time_ms": {str(side): statistics.fmean(clock.durations_s) * 1e3
                                         for side, clock in sorted(self.clocks.items())},
            "progressive_model_flops": {
                str(side): model_flops(self.config.model, self.num_classes, (shape[0], shape[1], side, side))
                for side in sorted(self.steps_at)},
        }
