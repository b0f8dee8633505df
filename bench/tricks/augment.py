"""Data augmentation of the training images, per sample in the DataLoader workers.

Every policy is ``torchvision.transforms.v2``. ``basic`` is the standard small-image augmentation
(He et al. 2016, §4.2): zero-pad by S/8 pixels (4 at 32×32), take a random S×S crop, and flip
horizontally with probability 1/2 -- except on datasets whose labels a mirror changes (digits,
MNIST: ``DatasetSplits.flip_safe``). ``autoaugment`` (Cubuk et al. 2019, CIFAR-10 policy),
``randaugment`` (Cubuk et al. 2020, N=2, M=9) and ``trivialaugment`` (Müller & Hutter 2021,
TrivialAugmentWide) run after ``basic``, as in their papers' CIFAR set-ups.

The transforms see float images in [0, 1], before normalization (``bench.parts.data.augment_train``
un-normalizes, augments and normalizes again); the evaluation split is never augmented. Their
cost is the workers' (or, with ``num_workers: 0``, the main process's) time, which shows in a
row's ``data_stall_fraction`` when the step has to wait for it.

``augment: true`` / ``false`` (the boolean this option was before it became a trick) are read
as ``basic`` / ``none``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torchvision.transforms import v2

from bench.base.registry import did_you_mean
from bench.base.safeyaml import shorten
from bench.tricks.spec import Trick, register

POLICIES: dict[str, Callable[[], v2.Transform]] = {
    "autoaugment": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10),
    "randaugment": lambda: v2.RandAugment(num_ops=2, magnitude=9),
    "trivialaugment": lambda: v2.TrivialAugmentWide(),
}
CHOICES = ["none", "basic", *POLICIES]
LEGACY = {True: "basic", False: "none"}  # the old boolean `augment` field


def basic_augmentation(height: int, width: int, flip: bool) -> list[v2.Transform]:
    """Random shift by up to S/8 pixels (zero padding, then an H×W crop), and a flip when allowed."""
    shift = [v2.RandomCrop((height, width), padding=max(min(height, width) // 8, 1))]
    return shift + [v2.RandomHorizontalFlip()] if flip else shift


def augmentation(name: str, height: int, width: int, flip: bool) -> v2.Compose | None:
    """The per-sample pipeline ``name`` stands for, on H×W float images in [0, 1]; None for none."""
    if name == "none":
        return None
    policy = [POLICIES[name]()] if name in POLICIES else []
    return v2.Compose(basic_augmentation(height, width, flip) + policy)


@register
class Augment(Trick):
    name = "augment"
    description = "data augmentation of training images in the DataLoader workers (never the eval set)"
    values_help = ("none | basic (pad-and-crop shift, + horizontal flip where the dataset allows it) |\n"
                   "autoaugment | randaugment | trivialaugment (each after basic); true = basic, false = none")
    default = "none"

    @classmethod
    def parse(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return LEGACY[value]
        if value not in CHOICES:
            raise ValueError(f"{shorten(value)} is not one of {', '.join(CHOICES)}{did_you_mean(value, CHOICES)}")
        return value

    def sample_transform(self, data: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
        _, height, width = data.input_shape
        return augmentation(self.value, height, width, data.flip_safe)
