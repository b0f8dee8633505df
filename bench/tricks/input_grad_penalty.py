"""Input-gradient penalty ("double backpropagation", Drucker & LeCun 1992,
https://doi.org/10.1109/72.165600; Ross & Doshi-Velez 2018, https://arxiv.org/abs/1711.09404):
the gradient-norm penalty of the catalogue's §2 taken with respect to the inputs.

    loss' = L + λ · B · ‖∂L/∂x‖²

with L the batch's mean loss and x its B inputs. Since ∂L/∂x_i = (1/B)·∂ℓ_i/∂x_i, the penalty is
λ times the *mean over samples* of the per-sample squared input-gradient norm ‖∂ℓ_i/∂x_i‖²
(exactly so without BatchNorm; with BatchNorm in training mode a sample's loss also depends on
the others through the batch statistics, and those cross terms are included). The mean makes
the penalty independent of the batch size, so accumulation's micro-batches (each divided by
their count by the loop) add up to the penalty of the whole batch.

The gradient is taken with ``create_graph=True`` so the update differentiates through it: a
second backward pass through the first one ("double backward"), which FlopCounterMode sees, so
``flops_per_step`` includes it (roughly 2-3x the FLOPs of a plain step). Works under DDP (only the
final backward accumulates parameter gradients, so DDP's reducer fires once per step) and with
non-reentrant checkpointing (the recomputed graph supports double backward). Attention runs in
its math form (``sdpa_kernel(SDPBackend.MATH)``): the fused kernels cannot be differentiated twice.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.tricks.spec import LossFn, Trick, register


def penalised_loss(loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor, weight: float) -> torch.Tensor:
    """loss_fn(inputs, targets) + weight · B · ‖∂loss/∂inputs‖², differentiable twice."""
    # A non-leaf: FlopCounterMode's backward hooks on module inputs refuse a leaf in autograd.grad.
    inputs = inputs.detach().requires_grad_(True).clone()
    # The fused attention kernels (flash, memory-efficient) have no double backward; the math one has.
    with sdpa_kernel([SDPBackend.MATH]):
        loss = loss_fn(inputs, targets)
    # The gradient of the summed loss (B·L): per-sample magnitudes, not 1/B of them, so low
    # precision backward passes do not underflow; B·‖∂L/∂x‖² = ‖∂(B·L)/∂x‖² / B.
    (grad_of_sum,) = torch.autograd.grad(loss * len(inputs), inputs, create_graph=True)
    return loss + weight * grad_of_sum.float().pow(2).sum() / len(inputs)


@register
class InputGradPenalty(Trick):
    name = "input_grad_penalty"
    description = "loss + lambda * mean over samples of the squared input-gradient norm (double backward)"
    values_help = "lambda >= 0, e.g. 0.01 (0: off)"
    default = 0.0

    @classmethod
    def parse(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ValueError(f"{value!r} is not a finite penalty weight lambda >= 0")
        return float(value)

    def wrap_loss(self, loss_fn: LossFn) -> LossFn:
        return lambda inputs, targets: penalised_loss(loss_fn, inputs, targets, self.value)
