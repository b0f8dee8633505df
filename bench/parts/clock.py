"""The step clock, and the schedule of a run's steps: warm-up, measurement, timed."""
from __future__ import annotations

import time
from typing import Any

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
