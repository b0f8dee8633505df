"""Activation checkpointing changes memory, never the numbers: same loss, gradients, BN statistics."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from bench.config.train_config import build_train_config
from bench.parts.models import build_model
from bench.training.train import run_step
from bench.tricks import checkpointing
from bench.tricks.checkpointing import Checkpointed, Checkpointing, apply_checkpointing, find_blocks
from bench.tricks.spec import RunContext

MODELS = {"tiny_cnn": 3, "resnet18_cifar": 8}  # name -> number of checkpointable blocks


def model_pair(name: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    plain = build_model(name, num_classes=10).train()
    checkpointed = Checkpointing(True).prepare_model(copy.deepcopy(plain))
    return plain, checkpointed


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float32), torch.randint(0, 10, (4,), generator=g)


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The first convolution inside a checkpointed block."""
    block = next(m for m in model.modules() if isinstance(m, Checkpointed))
    return next(m for m in block.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("name", list(MODELS))
def test_same_loss_and_gradients(name):
    plain, checkpointed = model_pair(name)
    assert sum(isinstance(m, Checkpointed) for m in checkpointed.modules()) == MODELS[name]
    calls = []
    first_conv(checkpointed).register_forward_hook(lambda *args: calls.append(1))
    x, y = batch()

    losses = []
    for model in (plain, checkpointed):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss)
    assert len(calls) == 2  # forward + recomputation in backward: checkpointing is really on
    assert_close(losses[0], losses[1])
    for p, q in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        assert_close(p.grad, q.grad)


@pytest.mark.parametrize("name", list(MODELS))
def test_batchnorm_statistics_move_once_per_step(name):
    plain, checkpointed = model_pair(name)
    x, y = batch()
    for model in (plain, checkpointed):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        run_step(model, opt, [], (x, y))
    buffers = list(zip(plain.named_buffers(), checkpointed.named_buffers(), strict=True))
    assert any(n.endswith("running_mean") for (n, _), _ in buffers)
    for (name_p, b), (_, c) in buffers:
        assert torch.equal(b, c), name_p  # running_mean/var and num_batches_tracked, bit for bit
    for p, q in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        assert_close(p, q)


@pytest.mark.parametrize("name", list(MODELS))
def test_find_blocks_counts(name):
    assert len(find_blocks(build_model(name, num_classes=10))) == MODELS[name]


def test_find_blocks_in_torchvision_model():
    with torch.device("meta"):
        model = build_model("mobilenet_v3_small", num_classes=10)
    blocks = find_blocks(model)
    assert blocks
    features = model.features
    assert sum(parent is features for parent, _ in blocks) == len(features)
    apply_checkpointing(model)
    assert all(isinstance(getattr(parent, attr), Checkpointed) for parent, attr in blocks)


def test_find_blocks_nothing_to_checkpoint():
    assert find_blocks(nn.Linear(2, 2)) == []
    assert find_blocks(nn.Sequential(nn.ReLU(), nn.Identity())) == []  # no parameters


def test_check_rejects_model_without_blocks(monkeypatch):
    config = build_train_config({"epochs": 1, "model": "tiny_cnn", "checkpointing": True}, "test")
    Checkpointing.check(True, config)  # tiny_cnn has blocks
    monkeypatch.setattr(checkpointing, "build_model", lambda name, num_classes: nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no blocks"):
        Checkpointing.check(True, config)
    Checkpointing.check(False, config)  # off: nothing to check


@pytest.mark.parametrize("value", [1, 0, "true", None])
def test_parse_rejects_non_bool(value):
    with pytest.raises(ValueError):
        Checkpointing.parse(value)


def test_checkpointing_trick_in_loop_with_optimizer():
    """Driven as the loop does (prepare_model, setup, run_step): parameters match the plain run."""
    plain, _ = model_pair("tiny_cnn")
    model = copy.deepcopy(plain)
    trick = Checkpointing(True)
    model = trick.prepare_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trick.setup(RunContext(device=torch.device("cpu"), model=model, optimizer=opt, config=None))
    ref_opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    x, y = batch()
    for _ in range(2):
        loss = run_step(model, opt, [trick], (x, y))
        ref_loss = run_step(plain, ref_opt, [], (x, y))
        assert_close(loss, ref_loss)
    for p, q in zip(plain.parameters(), model.parameters(), strict=True):
        assert_close(p, q)
