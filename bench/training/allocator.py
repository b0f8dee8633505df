"""The device allocator's own high-water mark over one training step: the row's peak memory.

CUDA keeps one: ``max_memory_allocated``, reset before the step (everything allocated on the
device, the run's storages and the libraries' workspaces alike). The CPU allocator keeps none,
but ``torch.profiler`` with ``profile_memory=True`` reports each allocation and free it makes for
the profiled thread and the threads that thread hands work to (intra-op workers, autograd) as a
``[memory]`` event: an address and ±bytes. Replayed in order, their running sum is what the step
holds beyond what was live when it began; its maximum, plus the bytes live at the start, is the
step's peak. That includes what no op-level count sees: buffers a kernel allocates and frees
inside one op (oneDNN's reorders in a convolution's backward, e.g. a layout copy under
channels_last).

A free counts only for a block allocated in the step, with the size it was allocated with: the
allocator learns block sizes only while a profiler runs, so the free of an older block is not
reported at all or, in a process profiled before (tests, ``attention-memory``), reported with the
size of whatever held that address then. A block from before the step that the step frees thus
stays counted until the step ends: the reading errs high, never low. Not seen at all: memory
that is not c10's CPU allocator's (numpy-backed tensors, DataLoader workers' shared memory).
The profiler slows the step it watches; the memory step is off every clock anyway.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch
from torch._C._profiler import _EventType
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


def replay_high_water(events: Iterable[tuple[int, int]]) -> int:
    """Most bytes held above the starting level, from (address, +bytes allocated | −bytes freed)
    in order; a free counts only for a block allocated in the replay, with that block's size."""
    blocks: dict[int, int] = {}  # address -> bytes of the live blocks allocated in the replay
    running = high = 0
    for address, nbytes in events:
        if nbytes > 0:
            running += nbytes - blocks.get(address, 0)  # a block whose free went unreported is gone
            blocks[address] = nbytes
            high = max(high, running)
        else:
            running -= blocks.pop(address, 0)
    return high


def cpu_allocator_events(prof: profile) -> list[tuple[int, int]]:
    """(address, ±bytes) of every CPU allocator event of a finished profile, in time order."""
    # The profiler's event tree: the kineto event list has the sizes but not the addresses.
    found = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        fields = event.extra_fields
        if event.tag == _EventType.Allocation and fields.device.type == "cpu" and fields.alloc_size:
            found.append((event.start_time_ns, fields.ptr, fields.alloc_size))
    found.sort(key=lambda e: e[0])
    return [(address, nbytes) for _, address, nbytes in found]


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
            events = cpu_allocator_events(prof)
        if events:  # a training step allocates: no events at all means the profiler saw nothing
            reading.above_start_bytes = replay_high_water(events)
        else:
            reading.source = LEDGER
    else:
        yield AllocatorPeak(LEDGER)
