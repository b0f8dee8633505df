"""In-place activations: set every activation module's ``inplace`` flag through the model.

An in-place ReLU writes its output over its input, so the forward holds one tensor instead of
two where the input is not needed for backward (ReLU's backward needs only its output; after
BatchNorm, whose backward keeps its own input, the BN output is dead once ReLU has run). That
saves activation memory, not time to speak of. ``true``/``false`` force the flag; ``null``
keeps each model's own choice (``tiny_cnn`` and torchvision's ResNets use ``inplace=True``).
Where an in-place activation overwrites a tensor autograd still needs, backward raises, and the
run is an ``error`` row saying so.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bench.parts.models import build_model
from bench.tricks.spec import Trick, register

# torch.nn activation modules that take an ``inplace`` argument.
INPLACE_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.SiLU, nn.Hardswish,
                       nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.RReLU, nn.Threshold)


def activations_of(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, INPLACE_ACTIVATIONS)]


def set_inplace(model: nn.Module, inplace: bool) -> nn.Module:
    """Set ``inplace`` on every activation module of ``model``, in place."""
    for module in activations_of(model):
        module.inplace = inplace
    return model


@register
class InplaceActivations(Trick):
    name = "inplace_activations"
    description = "force the inplace flag of every activation module (ReLU(inplace=True) ...)"
    values_help = "null (the model's own) | true | false"
    default = None

    @classmethod
    def parse(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{value!r} is not one of null, true, false")
        return value

    @classmethod
    def check(cls, value: Any, config: Any) -> None:
        if value is None:
            return


        with torch.device("meta"):  # module types only: no memory, no init cost
            model = build_model(config.model, num_classes=10)
        if not activations_of(model):
            raise ValueError(f"model {config.model!r} has no activation module with an inplace option "
                             "(functional activations cannot be switched)")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return set_inplace(model, self.value)
