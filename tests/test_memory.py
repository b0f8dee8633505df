"""The storage ledger's rules, each on a few hand-sized tensors (bytes computed by hand)."""
import torch
from torch import nn

from bench.training.memory import CATEGORIES, StorageLedger, tensors_held_by, track_step_memory
from bench.training.train import run_step
from bench.tricks.ema import EMA
from bench.tricks.sam import SAM
from bench.tricks.spec import RunContext

CPU = torch.device("cpu")
KIB4 = 1024 * 4  # bytes of 1024 float32


def test_views_and_in_place_results_of_known_storages_are_not_new_memory():
    w = torch.randn(32, 32)
    ledger = StorageLedger(CPU)
    ledger.add_existing([w], "parameters")
    with ledger:
        w.t()
        w[0]
        w.view(-1)
        w.add_(1.0)
        w.mul_(0.5)
    assert ledger.peak == ledger.total == KIB4
    assert ledger.at_peak["parameters"] == KIB4 and sum(ledger.at_peak.values()) == KIB4


def test_new_storages_count_until_freed_and_the_peak_keeps_its_breakdown():
    w = torch.randn(32, 32)
    ledger = StorageLedger(CPU)
    ledger.add_existing([w], "parameters")
    with ledger:
        a = w * 2  # new: 4 KiB
        b = a + 1  # new: 4 KiB -> peak 12 KiB
        del a  # freed
        c = b.t()  # view of b: nothing new
    assert ledger.peak == 3 * KIB4
    assert ledger.total == 2 * KIB4  # w and b
    assert ledger.at_peak == {**dict.fromkeys(CATEGORIES, 0), "parameters": KIB4, "trick_state": 2 * KIB4}
    del b, c
    assert ledger.total == KIB4


def test_a_storage_first_seen_mid_step_counts_from_the_start():
    """It existed before the step (nothing in the step made it), so every earlier instant held it."""
    hidden = torch.randn(1024)  # e.g. a DDP bucket, held in C++
    ledger = StorageLedger(CPU)
    with ledger:
        tmp = torch.ones(1024)  # peak so far: 4 KiB
        del tmp
        hidden.add_(1.0)  # first touch
    assert ledger.peak == 2 * KIB4
    assert ledger.at_peak["trick_state"] == 2 * KIB4


def test_forward_allocations_are_activations_and_loop_allocations_other():
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = (torch.randn(8, 16), torch.randint(0, 16, (8,)))
    with track_step_memory(model, opt, [], batch, CPU) as ledger:
        run_step(model, opt, [], batch, instrument=ledger.instrument)
    report = ledger.report()
    param_bytes = (16 * 16 + 16) * 4
    assert report.breakdown["parameters"] == param_bytes
    assert report.breakdown["gradients"] <= param_bytes
    assert report.breakdown["activations"] > 0  # Linear's and Tanh's outputs saved for backward
    assert report.breakdown["trick_state"] == 0  # no tricks
    assert sum(report.breakdown.values()) == report.peak_memory_bytes


def test_trick_state_is_found_by_walking_the_trick_and_saved_weights_count_as_trick_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tricks = [SAM(0.05), EMA(0.9)]
    for trick in tricks:
        trick.setup(RunContext(CPU, model, opt, None))
    averaged = list(tensors_held_by(tricks[1]))
    assert {id(t) for t in tricks[1].averaged.parameters()} <= {id(t) for t in averaged}
    batch = (torch.randn(4, 64), torch.randint(0, 4, (4,)))
    run_step(model, opt, tricks, batch)
    with track_step_memory(model, opt, tricks, batch, CPU) as ledger:
        run_step(model, opt, tricks, batch, instrument=ledger.instrument)
    param_bytes = sum(p.nbytes for p in model.parameters())
    ema_bytes = sum(t.nbytes for t in (*tricks[1].averaged.parameters(), *tricks[1].averaged.buffers()))
    # EMA's copy all along, plus SAM's saved weights (and offsets) around its second pass.
    assert ledger.report().breakdown["trick_state"] >= ema_bytes + param_bytes
