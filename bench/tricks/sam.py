"""Sharpness-Aware Minimization (Foret et al. 2021, https://arxiv.org/abs/2010.01412).

Per optimizer step: gradient g at w; move to w + ρ·g/‖g‖ (the worst case nearby, to first
order); gradient there; return to w; let the base optimizer step with that second gradient.
Two forward and two backward passes per step, so expect roughly twice the step time.
The second forward leaves BatchNorm running statistics alone, so they move once per step.
No library ships SAM, hence this small hand-written version.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from bench.parts.batchnorm import frozen_running_stats
from bench.parts.distributed import no_grad_sync
from bench.tricks.spec import RunContext, StepFns, Trick, register


@torch.no_grad()
def sam_perturbation(params: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """ρ·g/‖g‖ for every parameter with a gradient, ‖g‖ the global L2 norm over all of them."""
    grads = [p.grad for p in params]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = rho / (norm + 1e-12)
    return [g * scale for g in grads]


@register
class SAM(Trick):
    name = "sam"
    description = "sharpness-aware minimization with radius rho (two passes per step)"
    values_help = "null | rho > 0, e.g. 0.05"
    default = None

    @classmethod
    def parse(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"{value!r} is not null or a finite radius rho > 0")
        return float(value)

    @classmethod
    def check(cls, value: Any, config: Any) -> None:
        if value is not None and config.tricks.get("precision") == "fp16":
            raise ValueError(
                "sam cannot run with precision fp16: SAM needs the true gradient norm between "
                "its two passes, and GradScaler may unscale gradients only once per step; "
                "use bf16 (no loss scaling) instead"
            )

    def setup(self, run: RunContext) -> None:
        self.model = run.model
        self.params = [p for p in run.model.parameters() if p.requires_grad]  # once, not per step

    def wrap_step(self, step: StepFns) -> StepFns:
        state: dict[str, list[torch.Tensor]] = {}

        def compute_grads() -> torch.Tensor:
            # Under DDP the first gradient stays on each rank, so each rank perturbs with the
            # gradient of its own share of the batch (as in the SAM paper); the second is averaged.
            with no_grad_sync(self.model):
                loss = step.compute_grads()
            live = [p for p in self.params if p.grad is not None]
            offsets = sam_perturbation(live, self.value)
            with torch.no_grad():
                # Restored by copy, not by subtracting the offset again: bit-exact, so ranks that
                # perturbed differently get identical weights back.
                state["live"], state["saved"] = live, [p.detach().clone() for p in live]
                torch._foreach_add_(live, offsets)
            del offsets  # freed before the second pass: only the saved weights stay alive
            with frozen_running_stats(self.model):
                step.compute_grads()  # replaces the gradient with the one at w + e(w)
            return loss  # the loss at the unperturbed weights, as reported without SAM

        def apply_update() -> None:
            with torch.no_grad():
                torch._foreach_copy_(state["live"], state["saved"])
            state.clear()
            step.apply_update()

        return StepFns(compute_grads, apply_update)
