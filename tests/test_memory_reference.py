"""The memory tracker against an independent reference: the CPU allocator itself.

Reference peak = bytes of every tensor storage alive before the step that the run created (found
with ``gc``, not with the tracker's own enumeration) + the high-water mark of the CPU allocator
during the step, replayed from ``torch.profiler`` memory events (each allocation and free, in
time order). The tracker sees storages at the level of ops, so it misses only what a kernel
allocates for itself and frees before returning (oneDNN's reordered weights and copies in a
convolution's backward): it may be below the allocator, never above it.

As a script it prints the table for ResNet-18 (CIFAR stem) at batch 32, 32x32, fp32, SGD with
momentum, one thread:  PYTHONPATH=. python tests/test_memory_reference.py
"""
from __future__ import annotations

import functools
import gc
import weakref
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.profiler import ProfilerActivity, profile

from bench.parts.models import build_model
from bench.training.memory import MemoryReport, track_step_memory
from bench.training.train import run_step
from bench.tricks.accumulation import Accumulation
from bench.tricks.checkpointing import Checkpointing
from bench.tricks.ema import EMA
from bench.tricks.sam import SAM
from bench.tricks.spec import RunContext, Trick

CPU = torch.device("cpu")
MIB = 2**20
TOLERANCE = 0.05


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


# ---- the reference: gc + the allocator's own events ----
def cpu_storages() -> list[torch.UntypedStorage]:
    found = {}
    for obj in gc.get_objects():
        try:
            # A compiler's fake tensors left by an earlier test in this process hold no real bytes
            # (their data_ptr is meaningless or raises); a dead weak proxy raises on isinstance.
            if (not isinstance(obj, torch.Tensor) or isinstance(obj, FakeTensor) or obj.device.type != "cpu"
                    or obj.is_meta):
                continue
            storage = obj.untyped_storage()
            found[storage.data_ptr()] = storage
        except (ReferenceError, RuntimeError):
            continue
    return [s for s in found.values() if s.nbytes()]


def allocator_high_water_bytes(step: Callable[[], object]) -> tuple[int, int, list[tuple[str, int, int]]]:
    """(bytes above the level at the start, time of that peak, (name, start, end) of every op range)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = prof.profiler.kineto_results.events()  # raw events: FunctionEvents fold allocations into ops
    memory = sorted((e for e in events if e.name() == "[memory]" and e.device_type() == torch._C._autograd.DeviceType.CPU),
                    key=lambda e: e.start_ns())
    running = peak = peak_ns = 0
    for event in memory:
        running += event.nbytes()
        if running > peak:
            peak, peak_ns = running, event.start_ns()
    ranges = [(e.name(), e.start_ns(), e.end_ns()) for e in events if e.name() != "[memory]"]
    return peak, peak_ns, ranges


@dataclass
class Measured:
    tracker: MemoryReport
    reference_bytes: int
    param_bytes: int
    peak_in: list[str]  # names of the op ranges around the allocator's peak

    @property
    def ratio(self) -> float:
        return self.tracker.peak_memory_bytes / self.reference_bytes


def measure(make_model: Callable[[], nn.Module], tricks: tuple[Trick, ...] = (), optimizer: str = "sgd",
            batch_size: int = 32, input_shape: tuple[int, ...] = (3, 32, 32), reference: bool = True) -> Measured:
    """One warm-up step, then the same step under the tracker and (``reference``) under the profiler."""
    existing = weakref.WeakSet(cpu_storages())  # whatever lives before this run is not the run's
    torch.manual_seed(0)
    model = make_model()
    for trick in tricks:
        model = trick.prepare_model(model)
    opt = (torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01))
    for trick in tricks:
        trick.setup(RunContext(CPU, model, opt, None))
    batch = (torch.randn(batch_size, *input_shape), torch.randint(0, 10, (batch_size,)))
    run_step(model, opt, list(tricks), batch)  # optimizer state exists from here on
    opt.zero_grad(set_to_none=True)  # as the loop does first in every step

    with track_step_memory(model, opt, list(tricks), batch, CPU) as ledger:
        run_step(model, opt, list(tricks), batch, instrument=ledger.instrument)
    param_bytes = sum(p.nbytes for p in model.parameters())
    if not reference:
        return Measured(ledger.report(), 0, param_bytes, [])
    opt.zero_grad(set_to_none=True)
    gc.collect()
    before = sum(s.nbytes() for s in cpu_storages() if s not in existing)
    peak, peak_ns, ranges = allocator_high_water_bytes(lambda: run_step(model, opt, list(tricks), batch))
    return Measured(ledger.report(), before + peak, param_bytes,
                    [name for name, start, end in ranges if start <= peak_ns <= end])


def assert_matches_allocator(m: Measured) -> None:
    assert sum(m.tracker.breakdown.values()) == m.tracker.peak_memory_bytes  # parts sum to the peak exactly
    assert 1 - TOLERANCE <= m.ratio <= 1 + TOLERANCE, (
        f"tracker {m.tracker.peak_memory_bytes / MIB:.2f} MiB vs allocator {m.reference_bytes / MIB:.2f} MiB")


def tiny_cnn() -> nn.Module:
    return build_model("tiny_cnn", num_classes=10)


def resnet18_cifar() -> nn.Module:
    return build_model("resnet18_cifar", num_classes=10)


def linear_heavy() -> nn.Module:
    """An MLP: every weight reaches its matmul through a view (``weight.t()``), 42 MiB of them."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                         nn.Linear(2048, 10))


# Fresh trick instances per measurement (setup stores the run on them).
CASES: dict[str, Callable[[], dict]] = {
    "baseline": lambda: {},
    "checkpointing": lambda: {"tricks": (Checkpointing(True),)},
    "ema": lambda: {"tricks": (EMA(0.99),)},
    "sam": lambda: {"tricks": (SAM(0.05),)},
    "accumulation=4": lambda: {"tricks": (Accumulation(4),)},
    "adamw": lambda: {"optimizer": "adamw"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_cnn_peak_matches_the_allocator(case):
    """Activations dominate tiny_cnn at batch 128; each case runs in about a second."""
    kwargs = CASES[case]()
    m = measure(tiny_cnn, batch_size=128, **kwargs)
    assert_matches_allocator(m)
    parts = m.tracker.breakdown
    assert parts["parameters"] == m.param_bytes
    if case == "ema":  # the averaged copy: every parameter and buffer, and its update counter
        averaged = kwargs["tricks"][0].averaged
        assert parts["trick_state"] == sum(t.nbytes for t in (*averaged.parameters(), *averaged.buffers()))
    if case == "sam":  # the weights saved before the perturbation are live through the second pass
        assert parts["trick_state"] >= m.param_bytes
    if case == "adamw":  # two moments per parameter and a step counter per parameter tensor
        n_tensors = len(list(tiny_cnn().parameters()))
        assert parts["optimizer_state"] == 2 * m.param_bytes + 4 * n_tensors


def test_linear_heavy_model_counts_weight_views_once():
    m = measure(linear_heavy, batch_size=64)
    assert_matches_allocator(m)
    # Parameters, momentum and gradients are the bulk; a view counted as new would add 42 MiB.
    assert m.tracker.breakdown["parameters"] == m.param_bytes


def test_peak_in_the_optimizer_step_matches_the_allocator():
    """Batch 2: the activations are tiny, so AdamW's temporaries in its step make the peak."""
    m = measure(linear_heavy, optimizer="adamw", batch_size=2)
    assert any(name.startswith("Optimizer.step") for name in m.peak_in), m.peak_in  # the reference says so
    assert_matches_allocator(m)
    assert m.tracker.breakdown["gradients"] == m.param_bytes  # every gradient is alive at that peak


# ---- ResNet-18 at batch 32 (the configuration) ----
@functools.cache
def resnet18_batch32(case: str) -> Measured:
    """Tracker only (no reference pass), cached: about 5 s of CPU per case."""
    return measure(resnet18_cifar, batch_size=32, reference=False, **CASES[case]())


def test_resnet18_checkpointing_lowers_the_peak():
    checkpointed, baseline = resnet18_batch32("checkpointing"), resnet18_batch32("baseline")
    assert checkpointed.tracker.peak_memory_bytes < baseline.tracker.peak_memory_bytes
    # Not only activations traded for "other": the whole peak is lower by at least a tenth.
    assert checkpointed.tracker.peak_memory_bytes < 0.9 * baseline.tracker.peak_memory_bytes


@pytest.mark.slow
def test_resnet18_ema_adds_at_least_a_copy_of_the_parameters():
    ema, baseline = resnet18_batch32("ema"), resnet18_batch32("baseline")
    assert ema.tracker.peak_memory_bytes >= baseline.tracker.peak_memory_bytes + baseline.param_bytes


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_resnet18_batch32_peak_matches_the_allocator(case):
    assert_matches_allocator(measure(resnet18_cifar, batch_size=32, **CASES[case]()))


def print_resnet18_table() -> None:
    print("| case | tracker (MiB) | allocator reference (MiB) | ratio |\n|---|---:|---:|---:|")
    for case, kwargs in CASES.items():
        m = measure(resnet18_cifar, batch_size=32, **kwargs())
        print(f"| {case} | {m.tracker.peak_memory_bytes / MIB:.1f} | {m.reference_bytes / MIB:.1f} | {m.ratio:.3f} |",
              flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print_resnet18_table()
