"""Gradient accumulation: k micro-batches reproduce the full-batch gradient and update exactly."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from bench.config.train_config import build_train_config
from bench.training.train import make_step, run_step
from bench.tricks.accumulation import Accumulation
from bench.tricks.spec import RunContext

K = 4
BATCH = 8


def bn_free_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)
    ).double()


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (BATCH,), generator=g)


def setup(tricks, model, opt) -> None:
    for t in tricks:
        t.setup(RunContext(device=torch.device("cpu"), model=model, optimizer=opt, config=None))


def test_accumulated_gradient_equals_full_batch_gradient():
    model = bn_free_net()
    reference = copy.deepcopy(model)
    x, y = batch()

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tricks = [Accumulation(K)]
    setup(tricks, model, opt)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    loss = make_step(model, opt, tricks, (x, y)).compute_grads()
    assert seen == [BATCH // K] * K  # really k micro-batches, not one pass over the batch

    ref_loss = F.cross_entropy(reference(x), y)
    ref_loss.backward()
    assert_close(loss, ref_loss.detach().float())
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert_close(p.grad, q.grad)


def test_accumulated_momentum_steps_match_no_accumulation():
    model = bn_free_net()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    tricks = [Accumulation(K)]
    setup(tricks, model, opt)
    start = [p.detach().clone() for p in model.parameters()]
    for seed in (1, 2):  # two steps, so the momentum buffer takes part in the second
        run_step(model, opt, tricks, batch(seed))
        run_step(reference, ref_opt, [], batch(seed))
    for p, q, p0 in zip(model.parameters(), reference.parameters(), start, strict=True):
        assert not torch.equal(q, p0)
        assert_close(p, q)


def test_split_batch_yields_k_micro_batches_in_order():
    x = torch.arange(BATCH * 2, dtype=torch.float32).reshape(BATCH, 2)
    y = torch.arange(BATCH)
    parts = Accumulation(K).split_batch((x, y))
    assert len(parts) == K
    for i, (xi, yi) in enumerate(parts):
        assert torch.equal(xi, x[i * 2:(i + 1) * 2])
        assert torch.equal(yi, y[i * 2:(i + 1) * 2])
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert torch.equal(torch.cat([p[1] for p in parts]), y)


@pytest.mark.parametrize("value", [0, -1, True, 2.5, "4", None])
def test_parse_rejects(value):
    with pytest.raises(ValueError):
        Accumulation.parse(value)


@pytest.mark.parametrize("value", [1, 2, 16])
def test_parse_accepts_positive_integers(value):
    assert Accumulation.parse(value) == value


def test_check_rejects_accumulation_not_dividing_batch():
    config = build_train_config({"epochs": 1, "batch_size": 10, "accumulation": 4}, "test")
    with pytest.raises(ValueError, match="does not divide"):
        Accumulation.check(4, config)
    Accumulation.check(5, config)  # divides: fine
    Accumulation.check(2, config)
