"""EMA of weights and BatchNorm buffers matches its closed form, and is what gets evaluated."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from bench.training.train import run_step
from bench.tricks.ema import EMA
from bench.tricks.spec import RunContext

DECAY = 0.7  # far from 1, so every step's weights weigh in visibly
N = 5


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 5),
    ).double()


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # shifted inputs so the BN batch mean is far from 0 and the running mean moves visibly
    x = torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64) + seed
    return x, torch.randint(0, 5, (8,), generator=g)


def closed_form(history: list[dict[str, torch.Tensor]], d: float) -> dict[str, torch.Tensor]:
    """d^(n-1) θ_1 + Σ_{k=2..n} (1-d) d^(n-k) θ_k over recorded states θ_1..θ_n."""
    n = len(history)
    return {
        key: d ** (n - 1) * history[0][key]
        + sum((1 - d) * d ** (n - k) * history[k - 1][key] for k in range(2, n + 1))
        for key in history[0]
    }


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and floating-point buffers (running_mean/var), cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


@pytest.fixture
def trained():
    model = bn_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = EMA(DECAY)
    ema.setup(RunContext(device=torch.device("cpu"), model=model, optimizer=opt, config=None))
    history = []
    for k in range(1, N + 1):
        run_step(model, opt, [ema], batch(k))
        history.append(float_state(model))
    return model, ema, history


def test_ema_weights_and_buffers_follow_closed_form(trained):
    model, ema, history = trained
    expected = closed_form(history, DECAY)
    averaged = ema.averaged.module.state_dict()
    assert {"1.running_mean", "1.running_var"} <= set(expected)
    for key, value in expected.items():
        assert_close(averaged[key], value, msg=key)
        assert not torch.allclose(averaged[key], history[-1][key]), key  # really averaged, not copied


def test_eval_model_is_the_averaged_model(trained):
    model, ema, history = trained
    evaluated = ema.eval_model(model)
    assert evaluated is not model

    reference = copy.deepcopy(model)
    reference.load_state_dict({**model.state_dict(), **closed_form(history, DECAY)})
    x, _ = batch(N + 1)
    with torch.no_grad():
        outputs = [m.eval()(x) for m in (evaluated, model, reference)]
    assert not torch.allclose(outputs[0], outputs[1])
    assert_close(outputs[0], outputs[2])


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, True, "0.9"])
def test_parse_rejects(value):
    with pytest.raises(ValueError):
        EMA.parse(value)


def test_parse_accepts():
    assert EMA.parse(None) is None
    assert EMA.parse(0.999) == 0.999
    assert not EMA.is_active(None) and EMA.is_active(0.9)


def test_parse_accepts_warmup_mapping_and_canonicalises():
    assert EMA.parse({"decay": 0.99, "warmup": True}) == {"decay": 0.99, "warmup": True}
    assert EMA.parse({"decay": 0.99, "warmup": False}) == 0.99  # same cell as plain `ema: 0.99`
    assert EMA.parse({"decay": 0.99}) == 0.99
    for bad in ({"decay": 1.0, "warmup": True}, {"warmup": True}, {"decay": 0.9, "warmup": "yes"}, {"decy": 0.9}):
        with pytest.raises(ValueError):
            EMA.parse(bad)


def averages(value, weights):
    """The averaged weight after each update, for a one-weight model set to each of ``weights``."""
    model = nn.Linear(1, 1, bias=False).double()
    ema = EMA(EMA.parse(value))
    ema.setup(RunContext(device=torch.device("cpu"), model=model, optimizer=None, config=None))
    seen = []
    for w in weights:
        with torch.no_grad():
            model.weight.fill_(w)
        ema.after_step()
        seen.append(ema.averaged.module.weight.item())
    return seen


def test_warmup_decay_matches_hand_computation():
    """min(d, (1+t)/(10+t)) with t the updates before this one; the first update copies.
    By hand, weights 1, 2, 4, 8 and d = 0.9:
      t=1: d=2/11  -> 2/11*1 + 9/11*2       = 20/11
      t=2: d=3/12  -> 1/4*20/11 + 3/4*4     = 38/11
      t=3: d=4/13  -> 4/13*38/11 + 9/13*8   = 944/143"""
    assert averages({"decay": 0.9, "warmup": True}, [1, 2, 4, 8]) == pytest.approx([1, 20 / 11, 38 / 11, 944 / 143])
    # without warm-up the constant decay: 1, 0.9+0.2, 0.99+0.4, 1.251+0.8
    assert averages(0.9, [1, 2, 4, 8]) == pytest.approx([1, 1.1, 1.39, 2.051])


def test_warmup_decay_reaches_the_configured_decay():
    from bench.tricks.ema import ema_decay

    assert ema_decay(0.9, 79, warmup=True) == pytest.approx(80 / 89)
    assert ema_decay(0.9, 80, warmup=True) == pytest.approx(0.9)  # (1+80)/(10+80) = 0.9
    assert ema_decay(0.9, 10_000, warmup=True) == 0.9
    assert ema_decay(0.9, 0, warmup=False) == 0.9


def test_advice_when_the_average_is_longer_than_the_run():
    assert "averages over ~1000 steps but the run has 100" in EMA.advise(0.999, None, 100)
    assert EMA.advise(0.999, None, 1000) is None
    assert EMA.advise({"decay": 0.999, "warmup": True}, None, 100) is None  # warm-up forgets the start
    assert EMA.advise(None, None, 1) is None
