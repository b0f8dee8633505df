"""Gradient clipping: by global L2 norm (``clip_grad_norm_``) or elementwise by value (``clip_grad_value_``).

Runs in ``process_gradients``, so it clips the step's true gradient: every micro-batch
accumulated, all-reduced over the ranks, unscaled by GradScaler (the loop guarantees that order).
Clipping by norm rescales the whole gradient to norm ≤ x (Pascanu et al. 2013,
https://arxiv.org/abs/1211.5063); clipping by value clamps each element to [-x, x].

The row records the pre-clip global gradient norm (median and max over the run's steps) and the
fraction of steps clipped (by value: steps where any element was clamped). The norms stay on
the device as tensors and are read once, in ``metrics``: no GPU sync per step. Steps whose
gradient is not finite (fp16 overflow; GradScaler skips them) are left out of these figures.
Practical advice: run once with a large threshold, then pick one near the median norm seen.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from bench.base.safeyaml import shorten
from bench.tricks.spec import RunContext, Trick, register

MODES = ("norm", "value")
CONSOLIDATE_EVERY = 256  # steps; keeps the per-step records from piling up as many tiny tensors


@torch.no_grad()
def clip_gradients(params: list[torch.Tensor], mode: str, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip the gradients of ``params`` in place; (pre-clip global L2 norm, whether it clipped), as tensors."""
    grads = [p.grad for p in params if p.grad is not None]
    if mode == "norm":
        norm = torch.nn.utils.clip_grad_norm_(params, threshold)
        # clip_grad_norm_ scales by threshold / (norm + 1e-6) when that is below 1
        return norm, threshold < norm + 1e-6
    norm = torch.nn.utils.get_total_norm(grads)
    clipped = torch.nn.utils.get_total_norm(grads, norm_type=math.inf) > threshold
    torch.nn.utils.clip_grad_value_(params, threshold)
    return norm, clipped


@register
class GradClip(Trick):
    name = "grad_clip"
    description = "clip the true gradient by global norm or by value; records pre-clip norms and clipped fraction"
    values_help = "null | {norm: x} | {value: x}, x > 0"
    default = None

    @classmethod
    def parse(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in MODES:
            raise ValueError(f"{shorten(value)} is not null, {{norm: x}} or {{value: x}}")
        (mode, threshold), = value.items()
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < math.inf:
            raise ValueError(f"{shorten(value)}: the threshold must be a finite number > 0")
        return {mode: float(threshold)}

    def setup(self, run: RunContext) -> None:
        (self.mode, self.threshold), = self.value.items()
        self.params = [p for p in run.model.parameters() if p.requires_grad]
        self.norms: list[torch.Tensor] = []  # pre-clip norm of each step, on the device
        self.clipped: list[torch.Tensor] = []

    def process_gradients(self) -> None:
        norm, clipped = clip_gradients(self.params, self.mode, self.threshold)
        self.norms.append(norm.detach().float().reshape(1))
        self.clipped.append(clipped.reshape(1))
        if len(self.norms) >= CONSOLIDATE_EVERY:
            self.norms, self.clipped = [torch.cat(self.norms)], [torch.cat(self.clipped)]

    def metrics(self) -> dict[str, Any]:
        if not self.norms:
            return {}
        norms, clipped = torch.cat(self.norms).cpu(), torch.cat(self.clipped).cpu()  # the run's one sync
        finite = torch.isfinite(norms)
        if not finite.any():
            return {"grad_norm_median": None, "grad_norm_max": None, "grad_clip_fraction": None}
        norms, clipped = norms[finite], clipped[finite]
        return {"grad_norm_median": float(norms.median()), "grad_norm_max": float(norms.max()),
                "grad_clip_fraction": float(clipped.float().mean())}
