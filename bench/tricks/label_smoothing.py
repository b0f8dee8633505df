"""Label smoothing (Szegedy et al. 2016, https://arxiv.org/abs/1512.00567, §7).

The target distribution q becomes (1 - ε)·q + ε/K over the K classes, so the loss is
    (1 - ε)·CE(q, p) + ε·mean_k(-log p_k),
which keeps the logits from growing without bound. ``F.cross_entropy(label_smoothing=ε)`` does
exactly this, for class-index targets and for probability targets (mixup's soft labels) alike.
It costs nothing measurable: one more reduction over the logits.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch.nn.functional as F

from bench.tricks.spec import Criterion, Trick, register


@register
class LabelSmoothing(Trick):
    name = "label_smoothing"
    description = "cross-entropy against (1-eps)*targets + eps/K (F.cross_entropy label_smoothing)"
    values_help = "eps in [0, 1), e.g. 0.1 (0: off)"
    default = 0.0

    @classmethod
    def parse(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1 \
                or not math.isfinite(value):
            raise ValueError(f"{value!r} is not a smoothing eps in [0, 1)")
        return float(value)

    def criterion(self, criterion: Criterion) -> Criterion:
        # Replaces the loop's plain cross-entropy; no other trick changes the criterion.
        return functools.partial(F.cross_entropy, label_smoothing=self.value)
