"""Gradient centralization (Yong et al. 2020, https://arxiv.org/abs/2004.01461).

Before the update, each conv/linear weight gradient loses its mean over every dimension but the
output channel: g[o] ← g[o] − mean(g[o]). Only weights with ndim > 1; biases and BatchNorm
parameters are left alone, as in the paper's code. It acts on the step's true gradient (after
accumulation, all-reduce and unscaling), and after clipping (registered later): the projection
only lowers the norm, so a clip bound still holds. Unlike the paper's SGD_GC, weight decay is
added by the optimizer afterwards and is not centralized.
"""
from __future__ import annotations

import torch

from bench.tricks.spec import RunContext, Switch, register


@torch.no_grad()
def centralize_gradients(params: list[torch.Tensor]) -> None:
    """Subtract from each gradient of a weight with ndim > 1 its mean per output channel (dim 0)."""
    for p in params:
        if p.grad is not None and p.grad.ndim > 1:
            p.grad.sub_(p.grad.mean(dim=tuple(range(1, p.grad.ndim)), keepdim=True))


@register
class GradCentralization(Switch):
    name = "grad_centralization"
    description = "subtract each conv/linear weight gradient's per-output-channel mean before the update"

    def setup(self, run: RunContext) -> None:
        self.weights = [p for p in run.model.parameters() if p.requires_grad and p.ndim > 1]

    def process_gradients(self) -> None:
        centralize_gradients(self.weights)
