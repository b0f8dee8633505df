"""inplace_activations: every activation's flag is set, and the memory ledger shows what it saves.

What in-place ReLU after BatchNorm saves is a forward-time transient, not activations held for
backward: BN's backward keeps BN's *input* and ReLU's keeps its *output*, so without in-place the
BN output dies right after the ReLU. The ledger's activation high-water mark drops by exactly
that transient (hand computation below); the activations held at the step's peak do not change.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.parts.models import build_model
from bench.training.memory import track_step_memory
from bench.training.train import run_step
from bench.tricks.inplace_activations import InplaceActivations, activations_of

CPU = torch.device("cpu")
B, C, H = 2, 4, 4
F32 = 4


def conv_bn_relu_net(inplace: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(C, 2))
    return InplaceActivations(inplace).prepare_model(model).train()


def step_memory(model: nn.Module):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(B, 3, H, H, generator=g), torch.randint(0, 2, (B,), generator=g))
    with track_step_memory(model, opt, [], batch, CPU) as ledger:
        run_step(model, opt, [], batch, ledger.instrument)
    return ledger.report()


@pytest.mark.parametrize("value", [True, False])
def test_every_activation_gets_the_flag(value):
    model = InplaceActivations(value).prepare_model(build_model("resnet18_cifar", 10))
    assert len(activations_of(model)) == 9 and all(m.inplace is value for m in activations_of(model))


def test_high_water_of_activations_drops_by_the_relu_transient():
    inplace, separate = step_memory(conv_bn_relu_net(True)), step_memory(conv_bn_relu_net(False))
    feature_map = B * C * H * H * F32  # the conv, BN and ReLU outputs
    after_relu = B * C * F32 + B * 2 * F32  # pooled features and logits, allocated after the ReLU
    # In place: conv out + BN/ReLU out, then the pooled features and logits on top.
    # Separate: conv out + BN out + ReLU out while the ReLU runs; the BN out is freed after it.
    expected = max(3 * feature_map, 2 * feature_map + after_relu) - (2 * feature_map + after_relu)
    assert expected > 0
    assert separate.activations_high_water_bytes - inplace.activations_high_water_bytes == expected
    assert separate.breakdown["activations"] == inplace.breakdown["activations"]  # nothing more is held


def test_model_without_switchable_activations_is_rejected():
    from bench.config.train_config import build_train_config

    config = build_train_config({"model": "tiny_cnn", "steps": 6}, "test")
    InplaceActivations.check(True, config)  # tiny_cnn has ReLU modules
    with pytest.raises(ValueError, match="no activation module with an inplace option"):
        InplaceActivations.check(True, build_train_config({"model": "vit_b_16", "steps": 6}, "test"))
