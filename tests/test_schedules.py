import pytest

from bench.base.errors import ConfigError
from bench.config.train_config import build_train_config
from bench.parts.schedules import SCHEDULES, lr_trace


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_schedule_is_stepped_per_optimizer_step(name):
    trace = lr_trace(name, 90, lr=0.1)
    assert len(trace) == 90
    assert max(trace) == pytest.approx(0.1, rel=1e-6)


def test_onecycle_sized_in_steps_warms_up_then_anneals():
    trace = lr_trace("onecycle", 100, lr=0.1)
    peak = trace.index(max(trace))
    assert 25 <= peak <= 35  # pct_start 0.3 of the steps, not of epochs
    assert trace[0] < 0.01 and trace[-1] < 1e-3


@pytest.mark.parametrize("name", ["cosine", "step", "exponential"])
def test_warmup_then_the_schedule_still_ends_where_it_should(name):
    plain, warm = lr_trace(name, 100, 0), lr_trace(name, 100, 10)
    assert warm[0] < 0.02 and warm[10] == pytest.approx(0.1)
    assert all(a < b for a, b in zip(warm[:10], warm[1:11]))  # linear ramp up
    assert warm[-1] == pytest.approx(plain[-1], rel=0.5, abs=1e-3)


def test_onecycle_with_extra_warmup_is_rejected():
    with pytest.raises(ConfigError, match="own warmup"):
        build_train_config({"epochs": 1, "lr_schedule": "onecycle", "lr_warmup_steps": 5}, "x.yaml")
