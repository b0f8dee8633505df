"""The device allocator's own high-water mark over one training step: the row's peak memory.

CUDA keeps one: ``max_memory_allocated``, reset before the step (everything allocated on the
device, the run's storages and the libraries' workspaces alike). The CPU allocator keeps none,
but ``torch.profiler`` with ``profile_memory=True`` reports each allocation and free it makes for
the profiled thread and the threads that thread hands work to (intra-op workers, autograd) as a
``[memory]`` event of ±bytes. Replayed in order, their running sum is what the step holds beyond
what was live when it began; its maximum, plus the bytes live at the start, is the step's peak.
That includes what no op-level count sees: buffers a kernel allocates and frees inside one op
(oneDNN's reorders in a convolution's backward, e.g. a layout copy under channels_last).

What the CPU reading does not see: memory that is not c10's CPU allocator's (numpy-backed
tensors, DataLoader workers' shared memory), and the free of a block allocated before the
profiler started (the allocator no longer knows its size, so it reports nothing): such a block
freed inside the step stays counted until the step ends, so the reading errs high, never low.
The profiler slows the step it watches; the memory step is off every clock anyway.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch.profiler import ProfilerActivity, profile

from bench.store.results import PEAK_MEMORY_SOURCES

CPU_EVENTS, CUDA_MAX_ALLOCATED, LEDGER = PEAK_MEMORY_SOURCES

# What the profiler's C++ side prints to fd 2 on every session (Kineto's log lines: profiler
# start/stop, no GPU found) and the allocator's warning about frees of blocks it never saw
# allocated (the caveat above): noise for a benchmark run, kept out of the run's stderr.
_PROFILER_NOISE = re.compile(rb"^[A-Z]+:\d{4}-\d\d-\d\d [\d:]+ \d+:\d+ \w+\.cpp:\d+\]"
                             rb"|Memory block of unknown size was allocated before the profiling started")


@dataclass
class AllocatorPeak:
    """What the allocator says about the block's peak; ``peak_bytes`` turns it into a total."""

    source: str  # one of PEAK_MEMORY_SOURCES; LEDGER when the allocator could not be read
    above_start_bytes: Optional[int] = None  # CPU: high-water mark above the bytes live at the start
    total_bytes: Optional[int] = None  # CUDA: max_memory_allocated, everything on the device

    def peak_bytes(self, live_at_start: int) -> Optional[int]:
        """The peak, given the bytes the step's own storages held when it began; None if unread."""
        if self.total_bytes is not None:
            return self.total_bytes
        if self.above_start_bytes is not None:
            return live_at_start + self.above_start_bytes
        return None


def replay_high_water(sizes: Iterator[int]) -> int:
    """Most bytes held above the starting level, from allocation sizes (+) and frees (−) in order."""
    running = high = 0
    for nbytes in sizes:
        running += nbytes
        high = max(high, running)
    return high


def cpu_memory_event_sizes(prof: profile) -> list[int]:
    """±bytes of every CPU allocator event of a finished profile, in time order."""
    # The raw events: the public FunctionEvents fold allocations into the ops that made them.
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())  # stable: equal stamps keep the order they were recorded in
    return [e.nbytes() for e in events]


@contextlib.contextmanager
def stderr_without(noise: re.Pattern[bytes]) -> Iterator[None]:
    """File descriptor 2, where C++ libraries write, held for the block; every line that does not
    match ``noise`` is written out after it (a warning is delayed, never lost)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().splitlines(keepends=True) if not noise.search(line)]
            if kept:
                os.write(2, b"".join(kept))


@contextlib.contextmanager
def allocator_peak(device: torch.device) -> Iterator[AllocatorPeak]:
    """The allocator's high-water mark over the block (one training step); read it after the block."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        reading = AllocatorPeak(CUDA_MAX_ALLOCATED)
        yield reading
        torch.cuda.synchronize(device)
        reading.total_bytes = torch.cuda.max_memory_allocated(device)
    elif device.type == "cpu" and not torch.autograd.profiler._is_profiler_enabled:
        # A second profiler would cancel the one already running (e.g. the caller's trace).
        reading = AllocatorPeak(CPU_EVENTS)
        with stderr_without(_PROFILER_NOISE):
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                yield reading
            sizes = cpu_memory_event_sizes(prof)
        if sizes:  # a training step allocates: no events at all means the profiler saw nothing
            reading.above_start_bytes = replay_high_water(iter(sizes))
        else:
            reading.source = LEDGER
    else:
        yield AllocatorPeak(LEDGER)
