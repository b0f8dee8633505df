"""Activation (gradient) checkpointing of a model's blocks.

Each block keeps only its input during the forward pass and recomputes its activations in the
backward pass: less activation memory for about one extra forward of compute.
Uses ``torch.utils.checkpoint`` in its non-reentrant form (the one PyTorch recommends; it
works with inputs that need no grad and preserves the RNG state for dropout).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from bench.parts.batchnorm import frozen_running_stats
from bench.parts.models import build_model
from bench.tricks.spec import Switch, register


class Checkpointed(nn.Module):
    """Runs ``block`` under activation checkpointing; the recomputation does not touch BN stats."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        calls = 0

        def run(*args: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += 1
            if calls == 1:
                return self.block(*args)
            with frozen_running_stats(self.block):  # the backward-time recomputation
                return self.block(*args)

        return checkpoint(run, *inputs, use_reentrant=False)


def find_blocks(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every block worth checkpointing.

    A block is a child with parameters of an ``nn.Sequential`` of at least two children: the
    stages of ``tiny_cnn``, the residual blocks of ResNets, the stages of ``features`` in
    torchvision's VGG/MobileNet/EfficientNet/ConvNeXt. The search does not descend into a block.
    """
    found: list[tuple[nn.Module, str]] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.Sequential) and len(child) >= 2:
                for sub_name, sub in child.named_children():
                    if any(True for _ in sub.parameters()):
                        found.append((child, sub_name))
            else:
                visit(child)

    visit(model)
    return found


def apply_checkpointing(model: nn.Module) -> nn.Module:
    """Wrap every block from :func:`find_blocks` in :class:`Checkpointed`, in place."""
    for parent, name in find_blocks(model):
        setattr(parent, name, Checkpointed(getattr(parent, name)))
    return model


@register
class Checkpointing(Switch):
    name = "checkpointing"
    description = "activation checkpointing of every block/stage (torch.utils.checkpoint)"

    @classmethod
    def check(cls, value: Any, config: Any) -> None:
        if not value:
            return

        with torch.device("meta"):  # shapes only: no memory, no init cost
            model = build_model(config.model, num_classes=10)
        if not find_blocks(model):
            raise ValueError(f"model {config.model!r} has no blocks to checkpoint")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return apply_checkpointing(model) if self.value else model
