"""zero_grad: zeros keeps the gradient tensors (zeroed in place); none frees them. The memory step
shows it: with zeros every gradient is live all through the step, so also at its peak."""
from __future__ import annotations

import pytest

from bench.training.train import memory_step
from tests.tricks.speed_helpers import tiny_run


def grad_bytes(run) -> int:
    return sum(p.numel() * p.element_size() for p in run.model.parameters())


@pytest.mark.parametrize("value", ["none", "zeros"])
def test_gradients_kept_or_freed(value):
    run, batch = tiny_run(zero_grad=value)
    run.step(batch)
    before = [p.grad.data_ptr() for p in run.model.parameters()]
    run.step(batch)
    after = [p.grad.data_ptr() for p in run.model.parameters()]
    kept = before == after  # the same storages, written in place
    assert kept is (value == "zeros")


def test_memory_step_holds_every_gradient_at_the_peak_only_with_zeros():
    breakdowns = {}
    for value in ("none", "zeros"):
        run, batch = tiny_run(zero_grad=value)
        run.step(batch)  # a warm-up step: the gradients exist
        _, metrics = memory_step(run, batch)
        breakdowns[value] = (metrics["memory_breakdown"], grad_bytes(run), metrics["peak_memory_bytes"])
    zeros, full, peak_zeros = breakdowns["zeros"]
    none, _, peak_none = breakdowns["none"]
    assert zeros["gradients"] == full  # pre-existing, live from the first instant
    assert none["gradients"] < full  # freed first; the early layers' are not back yet at the peak
    assert peak_zeros > peak_none
