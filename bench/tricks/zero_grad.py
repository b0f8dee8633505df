"""How the gradients are cleared between steps: freed (``none``) or zeroed in place (``zeros``).

``optimizer.zero_grad(set_to_none=True)`` (torch's default since 2.0) frees the gradient
tensors, so they exist only from the backward pass that creates them to the next step;
``zeros`` keeps them allocated all the time and writes zeros into them (one memset per
gradient, and backward accumulates into them instead of allocating). The memory step shows the
difference: with ``zeros`` the gradients are live from the start of the step.
"""
from __future__ import annotations

from bench.tricks.spec import Choice, register


@register
class ZeroGrad(Choice):
    name = "zero_grad"
    description = "clear gradients by freeing them (none: set_to_none) or zeroing them in place (zeros)"
    values_help = "none | zeros"
    default = "none"

    choices = ["none", "zeros"]

    def release_gradients(self) -> bool:
        return self.value == "none"
