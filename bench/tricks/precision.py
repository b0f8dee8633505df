"""Numeric precision of the forward/backward pass.

fp32: plain float32. tf32: float32 storage with TF32 tensor-core matmuls/convs (CUDA Ampere+;
on CPU it is plain fp32). bf16: ``torch.autocast`` to bfloat16 (no loss scaling needed: bf16 has
fp32's exponent range). fp16: autocast to float16 with a ``torch.amp.GradScaler`` that scales the
loss and skips steps whose gradients overflow.
"""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch

from bench.tricks.spec import Choice, RunContext, StepFns, register

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def set_tf32(enabled: bool) -> None:
    """Allow (or forbid) TF32 in float32 matmuls and cuDNN convolutions for this process."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


@register
class Precision(Choice):
    name = "precision"
    description = "numeric precision: fp32, tf32, fp16 autocast + GradScaler, bf16 autocast"
    values_help = "fp32 | tf32 | fp16 | bf16"
    default = "fp32"
    choices = ["fp32", "tf32", "fp16", "bf16"]

    @classmethod
    def is_active(cls, value: Any) -> bool:
        return True  # fp32 must switch TF32 off explicitly: cuDNN allows it by default

    def setup(self, run: RunContext) -> None:
        self.device_type = run.device.type
        self._optimizer = run.optimizer
        # Set explicitly either way: each cell runs in a fresh process, but be exact anyway.
        set_tf32(self.value == "tf32")
        self.scaler = torch.amp.GradScaler(self.device_type) if self.value == "fp16" else None

    def forward_context(self) -> ContextManager[Any]:
        if self.value not in AUTOCAST_DTYPES:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=AUTOCAST_DTYPES[self.value])

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler else loss

    def wrap_step(self, step: StepFns) -> StepFns:
        if self.scaler is None:
            return step
        scaler, optimizer = self.scaler, self._optimizer

        def compute_grads() -> torch.Tensor:
            loss = step.compute_grads()
            # The true gradients from here on, so process_gradients (clipping) sees them; the
            # scaler remembers whether any was inf/NaN and scaler.step skips that update.
            scaler.unscale_(optimizer)
            return loss

        def apply_update() -> None:
            # Skips the step if any gradient was inf/NaN, then update() shrinks the scale after
            # a skip and grows it after a run of good steps.
            scaler.step(optimizer)
            scaler.update()

        return StepFns(compute_grads, apply_update)
