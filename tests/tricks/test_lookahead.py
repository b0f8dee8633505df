"""Lookahead: fast and slow weights follow a hand computation; the slow copy is evaluated and counted."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from bench.config.train_config import build_train_config
from bench.training.memory import track_step_memory
from bench.training.train import run_step
from bench.tricks.lookahead import Lookahead
from bench.tricks.spec import RunContext

CPU = torch.device("cpu")
LR, MOMENTUM, K, ALPHA, STEPS = 0.1, 0.9, 2, 0.5, 5  # 5 steps: two syncs, then one step past the last


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 2, 2, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)


def by_hand() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """SGD with momentum written out, and Lookahead around it: (fast, slow) after STEPS steps."""
    model = net()
    fast = [p.detach().clone() for p in model.parameters()]
    slow = [p.clone() for p in fast]
    momentum = [torch.zeros_like(p) for p in fast]
    for step in range(1, STEPS + 1):
        with torch.no_grad():
            for p, w in zip(model.parameters(), fast):
                p.copy_(w)
        x, y = batch(step)
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        momentum = [MOMENTUM * m + g for m, g in zip(momentum, grads)]  # kept across syncs
        fast = [w - LR * m for w, m in zip(fast, momentum)]
        if step % K == 0:
            slow = [s + ALPHA * (w - s) for s, w in zip(slow, fast)]
            fast = [s.clone() for s in slow]
    return fast, slow


def with_lookahead() -> tuple[nn.Module, Lookahead]:
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    trick = Lookahead({"k": K, "alpha": ALPHA})
    trick.setup(RunContext(CPU, model, optimizer, None))
    for step in range(1, STEPS + 1):
        run_step(model, optimizer, [trick], batch(step))
    return model, trick


def test_fast_and_slow_weights_match_the_hand_computation():
    model, trick = with_lookahead()
    fast, slow = by_hand()
    assert_close([p.detach() for p in model.parameters()], fast)
    assert_close([p.detach() for p in trick.slow_model.parameters()], slow)
    assert not torch.allclose(fast[0], slow[0])  # a step past the last sync: the two differ


def test_the_slow_weights_are_evaluated():
    model, trick = with_lookahead()
    evaluated = trick.eval_model(model)
    assert evaluated is not model
    assert_close([p.detach() for p in evaluated.parameters()], by_hand()[1])


def test_the_slow_copy_counts_as_trick_state():
    def tracked(tricks_for) -> dict[str, int]:
        model = net()
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        tricks = tricks_for()
        for trick in tricks:
            trick.setup(RunContext(CPU, model, optimizer, None))
        run_step(model, optimizer, tricks, batch(0))
        with track_step_memory(model, optimizer, tricks, batch(1), CPU) as ledger:
            run_step(model, optimizer, tricks, batch(1), instrument=ledger.instrument)
        return ledger.report().breakdown

    param_bytes = sum(p.nbytes for p in net().parameters())
    with_it = tracked(lambda: [Lookahead({"k": K, "alpha": ALPHA})])
    without = tracked(list)
    assert with_it["trick_state"] - without["trick_state"] >= param_bytes
    assert with_it["parameters"] == without["parameters"] == param_bytes  # not counted as the model's


@pytest.mark.parametrize("value, canonical", [
    (None, None), ({}, {"k": 5, "alpha": 0.5}), ({"k": 3}, {"k": 3, "alpha": 0.5}),
    ({"alpha": 1}, {"k": 5, "alpha": 1.0})])
def test_parse_fills_defaults(value, canonical):
    assert Lookahead.parse(value) == canonical


@pytest.mark.parametrize("value", [5, {"k": 0}, {"k": 2.5}, {"alpha": 0}, {"alpha": 1.5}, {"k": 5, "beta": 1},
                                   {"k": True}])
def test_parse_rejects(value):
    with pytest.raises(ValueError, match="k|alpha"):
        Lookahead.parse(value)


def test_rejected_with_ema_with_the_reason():
    config = build_train_config({"model": "tiny_cnn", "dataset": "synthetic", "steps": 10, "lookahead": {"k": 5},
                                 "ema": 0.9}, "test")
    with pytest.raises(ValueError, match="both replace the evaluated weights"):
        Lookahead.check(config.tricks["lookahead"], config)


def test_advises_when_the_slow_weights_would_never_move():
    assert "never move" in Lookahead.advise({"k": 10, "alpha": 0.5}, None, total_steps=9)
    assert Lookahead.advise({"k": 10, "alpha": 0.5}, None, total_steps=10) is None
    assert Lookahead.advise(None, None, total_steps=1) is None
