"""No weight decay on normalization layers and biases.

Decaying BatchNorm's γ/β or a bias does not regularise the function a BN network computes (the
following normalization undoes a weight's scale, not theirs) and can hurt it; the usual recipe
(Goyal et al. 2017, https://arxiv.org/abs/1706.02677; He et al. 2019 "Bag of Tricks",
https://arxiv.org/abs/1812.01187, §3.1) exempts them. Each optimizer group is split in two: the
parameters of normalization layers and every parameter with ndim ≤ 1 (biases) get
``weight_decay: 0``; the rest keep the group's (the config's) weight decay.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from bench.tricks.spec import Switch, register

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, nn.RMSNorm)


def no_decay_params(model: nn.Module) -> set[int]:
    """ids of the parameters exempt from weight decay: normalization layers' and every ndim ≤ 1 one."""
    exempt = {id(p) for p in model.parameters() if p.ndim <= 1}
    for module in model.modules():
        if isinstance(module, NORM_LAYERS):
            exempt.update(id(p) for p in module.parameters(recurse=False))
    return exempt


def split_decay(model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each group as (decayed, exempt with weight_decay 0), empty parts dropped."""
    exempt = no_decay_params(model)
    split = []
    for group in groups:
        decayed = [p for p in group["params"] if id(p) not in exempt]
        free = [p for p in group["params"] if id(p) in exempt]
        split += [{**group, "params": decayed}] if decayed else []
        split += [{**group, "params": free, "weight_decay": 0.0}] if free else []
    return split


@register
class NoDecayBnBias(Switch):
    name = "no_decay_bn_bias"
    description = "weight decay 0 for normalization-layer parameters and biases"

    @classmethod
    def advise(cls, value: Any, config: Any, total_steps: int) -> str | None:
        if value and config.optimizer.weight_decay == 0:
            return "no_decay_bn_bias changes nothing with optimizer.weight_decay 0"
        return None

    def param_groups(self, model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return split_decay(model, groups)
