"""Gradient centralization: zero mean per output channel for conv/linear weights, nothing else touched."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from bench.training.train import run_step
from bench.tricks.grad_centralization import GradCentralization
from bench.tricks.spec import RunContext


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 5)).double()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64) + 1, torch.randint(0, 5, (8,), generator=g)


def test_weight_gradients_have_zero_mean_per_output_channel_and_the_rest_is_untouched():
    model = net()
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    before = {name: p.grad.clone() for name, p in model.named_parameters()}
    trick = GradCentralization(True)
    trick.setup(RunContext(torch.device("cpu"), model, torch.optim.SGD(model.parameters(), lr=0.1), None))
    trick.process_gradients()

    weights = {"0.weight", "4.weight"}  # the conv's and the linear's
    for name, p in model.named_parameters():
        if name in weights:
            per_channel = p.grad.flatten(1).mean(dim=1)
            assert_close(per_channel, torch.zeros_like(per_channel))
            assert before[name].flatten(1).mean(dim=1).abs().max() > 1e-4  # it was not zero before
            # by hand: each output channel's row minus its own mean
            rows = before[name].flatten(1)
            assert_close(p.grad.flatten(1), rows - rows.mean(dim=1, keepdim=True))
        else:  # biases, BatchNorm's gamma and beta
            assert torch.equal(p.grad, before[name]), name


def test_the_optimizer_applies_the_centralized_gradient():
    model = net()
    reference = net()
    x, y = batch()
    F.cross_entropy(reference(x), y).backward()
    expected = reference[0].weight.grad.flatten(1)
    expected = expected - expected.mean(dim=1, keepdim=True)

    trick = GradCentralization(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    trick.setup(RunContext(torch.device("cpu"), model, optimizer, None))
    start = model[0].weight.detach().clone()
    run_step(model, optimizer, [trick], (x, y))
    assert_close((start - model[0].weight.detach()).flatten(1), expected)


@pytest.mark.parametrize("value", [1, "true", None])
def test_parse_rejects_non_booleans(value):
    with pytest.raises(ValueError, match="false, true"):
        GradCentralization.parse(value)
