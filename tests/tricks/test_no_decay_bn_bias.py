"""no_decay_bn_bias: the optimizer's groups hold exactly the right parameters, and biases take no decay."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from bench.config.train_config import build_train_config
from bench.training.train import build_optimizer
from bench.tricks.no_decay_bn_bias import NoDecayBnBias

LR, WD = 0.5, 0.1


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4),
                         nn.LayerNorm([8, 8]),  # a 2-D weight: exempt as a norm layer's, not by its ndim
                         nn.Flatten(), nn.Linear(4 * 8 * 8, 5), nn.LayerNorm(5)).double()


def config(optimizer: str, momentum: float = 0.0):
    return build_train_config({"model": "tiny_cnn", "dataset": "synthetic", "steps": 10, "no_decay_bn_bias": True,
                               "optimizer": {"name": optimizer, "lr": LR, "weight_decay": WD, "momentum": momentum}},
                              "test")


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_groups_hold_exactly_norm_parameters_and_biases_without_decay(optimizer):
    model = net()
    opt = build_optimizer(config(optimizer), model, [NoDecayBnBias(True)])
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert set(by_decay) == {WD, 0.0}
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[i] for i in by_decay[WD]) == ["0.weight", "3.weight", "7.weight"]  # conv, conv, linear
    assert sorted(names[i] for i in by_decay[0.0]) == [
        "1.bias", "1.weight", "3.bias", "4.bias", "4.weight", "5.bias", "5.weight", "7.bias", "8.bias", "8.weight"]
    assert all(g["lr"] == LR for g in opt.param_groups)


def test_one_sgd_step_decays_weights_but_not_biases():
    model = net()
    opt = build_optimizer(config("sgd"), model, [NoDecayBnBias(True)])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (8,), generator=g)
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    after = dict(model.named_parameters())
    for name in ("3.bias", "7.bias", "1.weight", "5.weight"):  # exactly lr·grad: no decay term
        assert_close(before[name] - after[name].detach(), LR * grads[name])
    for name in ("3.weight", "7.weight"):  # lr·(grad + wd·w)
        assert_close(before[name] - after[name].detach(), LR * (grads[name] + WD * before[name]))


def test_advises_when_there_is_no_weight_decay():
    plain = build_train_config({"model": "tiny_cnn", "dataset": "synthetic", "steps": 10}, "test")
    assert "changes nothing" in NoDecayBnBias.advise(True, plain, 10)
    assert NoDecayBnBias.advise(True, config("sgd"), 10) is None
