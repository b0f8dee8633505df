"""The step clock, and the schedule of a run's steps: warm-up, measurement, timed."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

import torch

MEASUREMENT_STEPS = 2  # untimed steps after warm-up: one under memory tracking, one under FLOP counting


def min_total_steps(warmup_steps: int) -> int:
    """Fewest optimizer steps a run needs: warm-up, the measurement steps, and one timed step."""
    return warmup_steps + MEASUREMENT_STEPS + 1


class StepClock:
    """Per-step durations: CUDA events on GPU (no per-step sync), perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._pending: list[tuple[Any, Any]] = []
        self.durations_s: list[float] = []

    def start(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, started: Any) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((started, end))
        else:
            self.durations_s.append(time.perf_counter() - started)

    def collect(self) -> None:
        """Synchronize and convert recorded CUDA events; call at window boundaries only."""
        if self.cuda:
            torch.cuda.synchronize()
            self.durations_s += [s.elapsed_time(e) / 1e3 for s, e in self._pending]
            self._pending.clear()


class Laps:
    """Wall seconds per named phase of a run, summed over its occurrences: where a run's time goes
    (the row's ``phase_s``; ``trickbench run --timings`` prints it). Off the step clocks."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - started
