"""MixUp (Zhang et al. 2018, https://arxiv.org/abs/1710.09412) and CutMix (Yun et al. 2019,
https://arxiv.org/abs/1905.04899): train on mixtures of pairs of samples and of their labels.

Both draw λ ~ Beta(α, α) once per batch and pair each sample with its neighbour in the batch
(``torchvision.transforms.v2.MixUp``/``CutMix`` pair sample i with sample i-1; the sampler has
shuffled the batch). MixUp blends whole images, x' = λ·x + (1-λ)·x[i-1]; CutMix pastes a box of
the partner and sets λ to the fraction of the image left unpasted. The targets become the same
mixture of the two one-hot labels, which ``F.cross_entropy`` takes as class probabilities.

Where the mixing happens: on each rank's whole batch (``transform_batch``), before accumulation
splits it, so a sample's partner may sit in another micro-batch and the optimizer step sees the
same mixed batch with or without accumulation. Under DDP each rank mixes its own share with its
own λ (ranks seed with seed + rank), as W processes with W smaller batches would.

Both on: the MixUp trick applies one of the two per batch, chosen with probability 1/2 each
(``v2.RandomChoice``; timm's ``Mixup`` does the same with its default ``switch_prob`` 0.5), and
the CutMix trick stands aside, so a batch is never mixed twice.

The training loss of the row is then the loss on mixed batches (higher than without mixing);
accuracy is measured on the untouched evaluation split.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torchvision.transforms import v2

from bench.base.safeyaml import shorten
from bench.tricks.spec import Batch, RunContext, Trick, register

Mixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def batch_mixer(mixup_alpha: float | None, cutmix_alpha: float | None, num_classes: int) -> Mixer:
    """MixUp, CutMix, or a fair per-batch choice of the two when both α are given."""
    mixers = []
    if mixup_alpha is not None:
        mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha is not None:
        mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not mixers:
        raise ValueError("batch_mixer needs mixup_alpha or cutmix_alpha")
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


def mix_batch(mixer: Mixer, batch: Batch) -> Batch:
    """The mixed batch; targets as probabilities in the inputs' floating dtype."""
    inputs, targets = mixer(*batch)
    return inputs, targets.to(inputs.dtype if inputs.is_floating_point() else torch.float32)


# The α torch can sample Beta(α, α) for. torch draws λ in float32 as G1 / (G1 + G2), G ~ Gamma(α):
# for small α both Gamma draws underflow to 0 and torch returns λ = 0.5 (measured on torch 2.14,
# 100,000 draws: 0.07% of λ at α = 0.005, 1.4% at 0.003, 99% at 1e-5), where the true Beta(α, α)
# has almost all its mass at 0 and 1; below float32's smallest number (1.4e-45) α is 0 and every
# run fails with a ValueError, and older torch returned NaN for 0/0, poisoning the loss. Above
# float32's range (3.4e38) λ comes out 0 instead of 0.5. So α is refused outside [0.01, 1e6]: at
# 0.01 no draw is the 0.5 artefact, and 1e6 already gives λ = 0.5 ± 0.001 (no mixing to speak of).
MIN_ALPHA, MAX_ALPHA = 0.01, 1e6


class _Mixing(Trick):
    """One of the two mixing tricks."""

    default = None

    @classmethod
    def parse(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"{shorten(value)} is not null or a finite alpha > 0")
        if not MIN_ALPHA <= value <= MAX_ALPHA:
            raise ValueError(f"alpha {value:g} is outside [{MIN_ALPHA:g}, {MAX_ALPHA:g}]: torch's float32 Beta "
                             "sampling then gives a wrong λ (0.5 or 0 instead of near 0 and 1) or fails; see "
                             "bench/tricks/mixing.py")
        return float(value)

    def setup(self, run: RunContext) -> None:
        alphas = {"mixup": run.config.tricks.get("mixup"), "cutmix": run.config.tricks.get("cutmix"),
                  self.name: self.value}
        if None not in alphas.values() and self.name == "cutmix":
            self.mixer = None  # both on: the MixUp trick chooses between the two per batch
            return
        if run.num_classes is None:
            raise ValueError(f"{self.name} needs the number of classes (RunContext.num_classes)")
        self.mixer = batch_mixer(alphas["mixup"], alphas["cutmix"], run.num_classes)

    def transform_batch(self, batch: Batch) -> Batch:
        return batch if self.mixer is None else mix_batch(self.mixer, batch)


@register
class MixUp(_Mixing):
    name = "mixup"
    description = "mixup: convex combinations of sample pairs and their labels (torchvision v2.MixUp)"
    values_help = "null | alpha in [0.01, 1e6] of Beta(alpha, alpha), e.g. 0.2"


@register
class CutMix(_Mixing):
    name = "cutmix"
    description = "cutmix: a box of another sample pasted in, labels by area (torchvision v2.CutMix)"
    values_help = "null | alpha in [0.01, 1e6] of Beta(alpha, alpha), e.g. 1.0"
