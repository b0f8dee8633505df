"""Gradient clipping clips the step's true gradient (by hand), once per step, unscaled under fp16."""
from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from bench.training.train import run_step
from bench.tricks.accumulation import Accumulation
from bench.tricks.grad_clip import GradClip
from bench.tricks.precision import Precision
from bench.tricks.spec import RunContext

CPU = torch.device("cpu")
LR = 1.0  # plain SGD with lr 1: the update is minus the gradient the optimizer saw


def net(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).to(dtype)


def batch(seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 8, 8, generator=g).to(dtype), torch.randint(0, 5, (8,), generator=g)


def gradient(model: nn.Module, batch) -> list[torch.Tensor]:
    x, y = batch
    return list(torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters())))


def total_norm(grads: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))


def setup(model: nn.Module, tricks: list) -> torch.optim.Optimizer:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for trick in tricks:
        trick.setup(RunContext(device=CPU, model=model, optimizer=optimizer, config=None))
    return optimizer


def updates(model: nn.Module, optimizer, tricks, batch) -> list[torch.Tensor]:
    """Run one harness step; minus the parameter change = the gradient the optimizer applied (lr 1)."""
    before = [p.detach().clone() for p in model.parameters()]
    run_step(model, optimizer, tricks, batch)
    return [(b - p.detach()) / LR for b, p in zip(before, model.parameters())]


@pytest.mark.parametrize("threshold", [0.05, 100.0])  # clips / does not clip
def test_clip_by_norm_equals_hand_computation_and_records_pre_clip_norms(threshold):
    model = net()
    clip = GradClip({"norm": threshold})
    optimizer = setup(model, [clip])
    norms = []
    for seed in range(3):
        g = gradient(model, batch(seed))
        norm = total_norm(g)
        norms.append(norm)
        expected = [gi * min(1.0, threshold / (norm + 1e-6)) for gi in g]
        assert_close(updates(model, optimizer, [clip], batch(seed)), expected)
    metrics = clip.metrics()
    assert metrics["grad_norm_median"] == pytest.approx(statistics.median(norms), rel=1e-6)
    assert metrics["grad_norm_max"] == pytest.approx(max(norms), rel=1e-6)
    assert metrics["grad_clip_fraction"] == (1.0 if threshold < min(norms) else 0.0)
    assert threshold < min(norms) or threshold > max(norms)  # the parametrization means what it says


def test_clip_by_value_clamps_each_element_and_counts_steps_with_a_clamp():
    model = net()
    g = gradient(model, batch(0))
    largest = max(float(gi.abs().max()) for gi in g)
    threshold = largest / 2
    clip = GradClip({"value": threshold})
    optimizer = setup(model, [clip])
    assert_close(updates(model, optimizer, [clip], batch(0)), [gi.clamp(-threshold, threshold) for gi in g])
    g2 = gradient(model, batch(1))
    clip.threshold = 10 * max(float(gi.abs().max()) for gi in g2)  # the second step clamps nothing
    assert_close(updates(model, optimizer, [clip], batch(1)), g2)
    metrics = clip.metrics()
    assert metrics["grad_clip_fraction"] == 0.5
    assert metrics["grad_norm_max"] == pytest.approx(max(total_norm(g), total_norm(g2)), rel=1e-6)


def test_accumulation_clips_once_the_full_batch_gradient():
    model = net()
    g = gradient(model, batch(0))  # the whole batch's gradient, no BatchNorm: accumulation is exact
    norm = total_norm(g)
    threshold = norm / 3
    tricks = [Accumulation(2), GradClip({"norm": threshold})]
    optimizer = setup(model, tricks)
    applied = updates(model, optimizer, tricks, batch(0))
    assert_close(applied, [gi * threshold / (norm + 1e-6) for gi in g])
    assert tricks[1].metrics()["grad_norm_max"] == pytest.approx(norm, rel=1e-6)

    # Clipping each micro-batch's share instead would give another update: the test can tell.
    x, y = batch(0)
    reference = net()
    per_micro = [torch.zeros_like(gi) for gi in g]
    for xs, ys in zip(x.chunk(2), y.chunk(2)):
        part = [gi / 2 for gi in gradient(reference, (xs, ys))]
        scale = min(1.0, threshold / (total_norm(part) + 1e-6))
        per_micro = [a + scale * b for a, b in zip(per_micro, part)]
    assert not torch.allclose(per_micro[0], applied[0])


def test_fp16_grad_scaler_clips_the_unscaled_gradient():
    model = net(torch.float32)
    g = gradient(model, batch(0, torch.float32))  # fp32 reference at the same weights
    norm = total_norm(g)
    threshold = norm / 4
    tricks = [Precision("fp16"), GradClip({"norm": threshold})]
    optimizer = setup(model, tricks)
    scale = float(tricks[0].scaler.get_scale())
    assert scale > 1000  # a real loss scale, so scaled and unscaled norms are far apart
    applied = updates(model, optimizer, tricks, batch(0, torch.float32))

    recorded = tricks[1].metrics()["grad_norm_max"]
    assert recorded == pytest.approx(norm, rel=2e-2)  # fp16 forward: close to fp32, not scale x it
    # The update is the gradient clipped to the threshold: norm threshold, direction of g.
    assert total_norm(applied) == pytest.approx(threshold, rel=1e-4)
    cosine = sum((a.double() * b.double()).sum() for a, b in zip(applied, g)) / (total_norm(applied) * norm)
    assert float(cosine) > 0.999


def test_metrics_leave_out_steps_with_a_non_finite_gradient():
    clip = GradClip({"norm": 1.0})
    clip.norms = [torch.tensor([2.0]), torch.tensor([float("inf")]), torch.tensor([0.5])]
    clip.clipped = [torch.tensor([True]), torch.tensor([True]), torch.tensor([False])]
    assert clip.metrics() == {"grad_norm_median": 0.5, "grad_norm_max": 2.0, "grad_clip_fraction": 0.5}


@pytest.mark.parametrize("value, canonical", [(None, None), ({"norm": 1}, {"norm": 1.0}), ({"value": 0.5}, {"value": 0.5})])
def test_parse_accepts(value, canonical):
    assert GradClip.parse(value) == canonical


@pytest.mark.parametrize("value", [1.0, {"norm": 0}, {"norm": -1}, {"value": True}, {"norm": 1, "value": 1},
                                   {"nrom": 1}, {"norm": float("inf")}, {"norm": "1"}])
def test_parse_rejects(value):
    with pytest.raises(ValueError, match="norm|threshold"):
        GradClip.parse(value)
