"""Layer statistics from hooks against values known in closed form."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bench.diagnostics.layer_stats import layer_statistics
from bench.tricks.checkpointing import apply_checkpointing

BIAS = torch.tensor([-1.0, 2.0, -3.0, 4.0])


def constant_then_relu() -> nn.Sequential:
    """Linear with zero weights: every output row is BIAS whatever the input; then ReLU, then a
    Linear summing its inputs (weights 1), so d loss / d relu-output = 1 everywhere."""
    linear = nn.Linear(3, 4)
    nn.init.zeros_(linear.weight)
    with torch.no_grad():
        linear.bias.copy_(BIAS)
    head = nn.Linear(4, 1, bias=False)
    nn.init.ones_(head.weight)
    return nn.Sequential(linear, nn.ReLU(inplace=True), head)


def rows_of(model: nn.Module, x: torch.Tensor, loss=lambda out: out.sum()) -> dict[str, dict]:
    with layer_statistics(model) as records:
        loss(model(x)).backward()
    return {r.layer: r.row() for r in records}


def test_activation_and_gradient_statistics_are_the_closed_form_values():
    rows = rows_of(constant_then_relu(), torch.randn(5, 3))
    linear, relu, head = rows["0"], rows["1"], rows["2"]
    # Linear: every row is BIAS -> mean 0.5, population std sqrt(mean(BIAS^2) - 0.25) = sqrt(7.25)
    assert linear["activation_mean"] == pytest.approx(0.5)
    assert linear["activation_std"] == pytest.approx(math.sqrt(7.25))
    assert linear["activation_zero_fraction"] == 0
    # ReLU(BIAS) = [0, 2, 0, 4]: half the units are zero
    assert relu["activation_zero_fraction"] == 0.5 and relu["activation_mean"] == pytest.approx(1.5)
    assert relu["activation_std"] == pytest.approx(math.sqrt((4 + 16) / 4 - 1.5**2))
    # loss = sum of the head's outputs: d loss / d head output = 1; / d relu output = 1 (weights 1);
    # / d linear output = ReLU's mask [0, 1, 0, 1]
    assert (head["grad_mean"], head["grad_std"]) == (pytest.approx(1.0), pytest.approx(0.0))
    assert (relu["grad_mean"], relu["grad_std"], relu["grad_mean_abs"]) == (1.0, 0.0, 1.0)
    assert linear["grad_mean"] == pytest.approx(0.5) and linear["grad_std"] == pytest.approx(0.5)


def test_gradients_scale_with_the_loss():
    model = constant_then_relu()
    rows = rows_of(model, torch.randn(5, 3), loss=lambda out: -3 * out.sum())
    assert rows["2"]["grad_mean"] == pytest.approx(-3.0) and rows["2"]["grad_mean_abs"] == pytest.approx(3.0)


def test_hooks_are_removed_and_inplace_restored():
    model = constant_then_relu()
    rows_of(model, torch.randn(2, 3))
    assert model[1].inplace is True
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def test_pooled_over_calls_like_one_batch():
    """Two micro-batches (accumulation) pool into the statistics of the whole batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU())
    x = torch.randn(6, 3)
    whole = rows_of(model, x)
    with layer_statistics(model) as records:
        for part in x.split(3):
            model(part).sum().backward()
    pooled = {r.layer: r.row() for r in records}
    for layer in whole:
        for key, value in whole[layer].items():
            assert pooled[layer][key] == (pytest.approx(value) if isinstance(value, float) else value)


def test_checkpointed_blocks_report_the_same_statistics():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Sequential(nn.Linear(3, 8), nn.ReLU()), nn.Sequential(nn.Linear(8, 4), nn.ReLU()))
    x = torch.randn(4, 3)
    expected = rows_of(plain, x)
    checkpointed = rows_of(apply_checkpointing(plain), x)
    assert [k.replace(".block", "") for k in checkpointed] == list(expected)
    for (_, got), want in zip(checkpointed.items(), expected.values()):
        assert got["activation_std"] == pytest.approx(want["activation_std"])
        assert got["grad_mean_abs"] == pytest.approx(want["grad_mean_abs"])
