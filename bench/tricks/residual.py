"""Two tricks on the residual blocks of ResNets (torchvision ``BasicBlock`` / ``Bottleneck``).

``zero_init_residual``: the last BatchNorm γ of every residual block starts at 0, so each block
starts as its shortcut and the network as a shallower one (Goyal et al. 2017,
https://arxiv.org/abs/1706.02677, §5.1; torchvision's ``resnet(zero_init_residual=True)``).

``stochastic_depth: p``: during training each residual branch is dropped per sample with a rate
growing linearly with depth, p_l = p·l/L for block l of L, so the last block's is p (Huang et al.
2016, https://arxiv.org/abs/1603.09382). ``torchvision.ops.StochasticDepth`` in "row" mode wraps
the branch's last BatchNorm (the block adds the shortcut after it), so the branch, not the sum,
is dropped; kept branches are scaled by 1/(1 − p_l), so evaluation needs no rescaling and is
deterministic. With checkpointing the recomputation redraws the same rows (torch.utils.checkpoint
restores the RNG state); under DDP each rank draws its own.

Both edit the blocks in place inside any wrapper (checkpointing's, DDP's), so they work whatever
hooks ran before; still, they are meant to run before checkpointing and DDP wrap the model.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import StochasticDepth

from bench.parts.distributed import unwrap
from bench.parts.models import build_model
from bench.tricks.spec import Switch, Trick, register

RESIDUAL_BLOCKS = (BasicBlock, Bottleneck)
LAST_BN = {BasicBlock: "bn2", Bottleneck: "bn3"}  # the branch's last layer, before the shortcut is added


def residual_blocks(model: nn.Module) -> list[nn.Module]:
    """The ResNet residual blocks of ``model``, input to output."""
    return [m for m in unwrap(model).modules() if isinstance(m, RESIDUAL_BLOCKS)]


def last_bn(block: nn.Module) -> nn.BatchNorm2d:
    """The branch's last BatchNorm, also when stochastic depth has wrapped it."""
    layer = getattr(block, LAST_BN[type(block)])
    return layer[0] if isinstance(layer, nn.Sequential) else layer


@functools.lru_cache(maxsize=None)
def has_residual_blocks(model_name: str) -> bool:
    with torch.device("meta"):  # structure only: no memory, no init cost
        return bool(residual_blocks(build_model(model_name, num_classes=10)))


def require_residual_blocks(trick: str, config: Any) -> None:
    if not has_residual_blocks(config.model):
        raise ValueError(f"{trick} needs a ResNet (torchvision BasicBlock/Bottleneck residual blocks, e.g. "
                         f"resnet18_cifar, resnet50); model {config.model!r} has none")


@torch.no_grad()
def zero_init_residual(model: nn.Module) -> nn.Module:
    """γ = 0 in the last BatchNorm of every residual block, in place."""
    for block in residual_blocks(model):
        nn.init.zeros_(last_bn(block).weight)
    return model


def depth_drop_rates(p: float, blocks: int) -> list[float]:
    """p·l/L for l = 1..L: linear in depth, p at the last block."""
    return [p * layer / blocks for layer in range(1, blocks + 1)]


def add_stochastic_depth(model: nn.Module, p: float) -> nn.Module:
    """Wrap each residual branch's last BatchNorm in (bn, StochasticDepth(p_l, "row")), in place."""
    blocks = residual_blocks(model)
    for block, rate in zip(blocks, depth_drop_rates(p, len(blocks))):
        name = LAST_BN[type(block)]
        setattr(block, name, nn.Sequential(getattr(block, name), StochasticDepth(rate, "row")))
    return model


@register
class ZeroInitResidual(Switch):
    name = "zero_init_residual"
    description = "ResNets: last BatchNorm gamma of each residual block initialised to 0"
    values_help = "false | true (models with residual blocks only)"

    @classmethod
    def check(cls, value: Any, config: Any) -> None:
        if value:
            require_residual_blocks(cls.name, config)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return zero_init_residual(model)


@register
class StochasticDepthTrick(Trick):
    name = "stochastic_depth"
    description = "ResNets: residual branches dropped per sample, rate rising linearly with depth to p"
    values_help = "p in [0, 1), e.g. 0.1 (models with residual blocks only)"
    default = 0.0

    @classmethod
    def parse(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1 or math.isnan(value):
            raise ValueError(f"{value!r} is not a drop rate p in [0, 1)")
        return float(value)

    @classmethod
    def check(cls, value: Any, config: Any) -> None:
        if value:
            require_residual_blocks(cls.name, config)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return add_stochastic_depth(model, self.value)
