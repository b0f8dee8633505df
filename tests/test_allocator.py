"""The allocator reading of the memory step, on hand-sized allocations (bytes computed by hand).
Against an independent replay on real training steps: test_memory_reference.py."""
import os

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from bench.training import train as train_module
from bench.training.allocator import allocator_peak, replay_high_water
from bench.training.train import every_rank_memory, memory_step
from tests.tricks.speed_helpers import tiny_run

CPU = torch.device("cpu")
MIB = 2**20


def test_replay_is_the_running_sum_s_maximum_above_the_start():
    assert replay_high_water([(1, 4), (2, 8), (1, -4), (3, 2), (2, -8)]) == 12
    # A free of a block from before the replay counts nothing, whatever size it reports (a stale one).
    assert replay_high_water([(1, 4), (9, -100), (2, 4)]) == 8
    # A free is the block's own size; an address allocated again had its free unreported.
    assert replay_high_water([(1, 4), (1, -2), (2, 4)]) == 4
    assert replay_high_water([(1, 4), (1, 6), (2, 1)]) == 7


def test_cpu_reading_is_every_allocation_of_the_block():
    with allocator_peak(CPU) as reading:
        a = torch.empty(MIB, dtype=torch.uint8)
        b = torch.empty(2 * MIB, dtype=torch.uint8)
        del a, b
        c = torch.empty(MIB, dtype=torch.uint8)  # after the frees: below the high-water mark
    del c
    assert reading.source == "cpu_allocator_events"
    assert reading.above_start_bytes == 3 * MIB
    assert reading.peak_bytes(live_at_start=100) == 100 + 3 * MIB


def test_a_free_reported_with_a_stale_size_does_not_lower_the_reading():
    """The CPU allocator records a block's size only while a profiler runs, and forgets it only
    then: a block freed between two profiled steps leaves its size behind at its address, and the
    free of the next block there reports that size."""
    for _ in range(20):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
            old = torch.empty(96 * 1024, dtype=torch.uint8)
        address = old.data_ptr()
        del old  # no profiler running: 96 KiB stays recorded at that address
        block = torch.empty(90 * 1024, dtype=torch.uint8)  # best fit: that block
        if block.data_ptr() == address:
            break
    else:
        pytest.skip("malloc never gave the same address back")
    with allocator_peak(CPU) as reading:
        del block  # reported as a free of 96 KiB
        new = torch.empty(4096, dtype=torch.uint8)
    del new
    assert reading.above_start_bytes == 4096


def test_profiler_chatter_is_kept_out_of_stderr_and_everything_else_kept(capfd):
    with allocator_peak(CPU):
        torch.empty(16)
        os.write(2, b"a line of the step's own\n")
    err = capfd.readouterr().err
    assert "a line of the step's own" in err
    assert "SyncActivityProfilerHandler" not in err and "profiler_start" not in err


def test_under_a_running_profiler_the_ledger_is_the_peak_and_the_outer_trace_survives():
    run, batch = tiny_run()
    run.step(batch)
    with profile(activities=[ProfilerActivity.CPU]) as outer:
        _, row = memory_step(run, batch)
        torch.ones(3).sum()
    assert row["peak_memory_source"] == "ledger"
    assert row["memory_breakdown"]["untracked"] == 0
    assert sum(row["memory_breakdown"].values()) == row["peak_memory_bytes"]
    assert any(e.name() == "aten::ones" for e in outer.profiler.kineto_results.events())  # not cancelled


def test_memory_step_peak_is_the_allocator_s_and_the_parts_sum_to_it():
    run, batch = tiny_run()
    run.step(batch)
    _, row = memory_step(run, batch)
    assert row["peak_memory_source"] == "cpu_allocator_events"
    assert row["memory_breakdown"]["untracked"] >= 0
    assert sum(row["memory_breakdown"].values()) == row["peak_memory_bytes"]


def test_ranks_report_the_largest_rank_whole(monkeypatch):
    """The largest rank's peak with its own breakdown, so the parts still sum to the peak."""
    small = {"peak_memory_bytes": 10, "memory_breakdown": {"activations": 8, "untracked": 2}}
    large = {"peak_memory_bytes": 12, "memory_breakdown": {"activations": 8, "untracked": 4}}
    monkeypatch.setattr(train_module.distributed, "gather", lambda value: [small, large])
    combined = every_rank_memory(small)
    assert combined["peak_memory_bytes"] == 12 and combined["memory_breakdown"] == large["memory_breakdown"]
    assert combined["peak_memory_bytes_per_rank"] == [10, 12]
