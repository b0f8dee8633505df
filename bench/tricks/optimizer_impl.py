"""Which implementation of the optimizer's update torch runs: the same arithmetic, other kernels.

``for_loop`` updates one parameter at a time (``foreach=False``); ``foreach`` batches each
operation over all parameters (``torch._foreach_*``, fewer kernel launches; torch's default on
CUDA); ``fused`` does the whole update of many parameters in one kernel (``fused=True``).
``default`` leaves the choice to torch. The three give the same parameters up to floating-point
rounding (tested). See the "foreach / fused" notes in the ``torch.optim`` documentation.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import _get_fused_kernels_supported_devices

from bench.tricks.spec import Choice, register

OPTIONS: dict[str, dict[str, bool]] = {
    "default": {}, "for_loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True},
}


def fused_devices() -> list[str]:
    """Device types with fused optimizer kernels in this torch (SGD and AdamW both have them)."""

    return _get_fused_kernels_supported_devices()


@register
class OptimizerImpl(Choice):
    name = "optimizer_impl"
    description = "torch.optim implementation: per-parameter loop, foreach (multi-tensor) or fused kernel"
    values_help = "default | for_loop | foreach | fused"
    default = "default"

    choices = list(OPTIONS)

    @classmethod
    def check(cls, value: Any, config: Any) -> None:
        if value != "fused":
            return

        device = config.device if config.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
        if device not in fused_devices():
            raise ValueError(f"fused optimizers have no kernel for device {device!r} in this torch "
                             f"(supported: {', '.join(fused_devices())})")

    def optimizer_options(self, options: dict[str, Any]) -> dict[str, Any]:
        return {**options, **OPTIONS[self.value]}
