"""The contract between the training loop and the tricks.

A trick is one small class registered by name. Its YAML value (e.g. ``ema: 0.999``) is parsed
once at the config boundary; an instance is built per run with that value. The loop calls these
hooks, each a no-op by default, in a fixed order:

    sample_transform  -> a per-sample transform of training images, run in DataLoader workers
    prepare_model     -> change the model once before training (checkpointing, DDP wrapper, ...)
    param_groups      -> the optimizer's parameter groups (no weight decay on BN and biases)
    optimizer_options -> keyword arguments of the optimizer (foreach / fused implementation)
    setup             -> once the model and optimizer exist (EMA's averaged copy)
    transform_batch   -> each (per-rank) batch on the device, before it is split (mixup, resizing)
    split_batch       -> turn one batch into micro-batches (accumulation)
    release_gradients -> whether zero_grad frees the gradients (set_to_none) or zeroes them
    sync_context      -> a context around forward+backward of each micro-batch (DDP no_sync)
    forward_context   -> a context around every forward pass (autocast)
    criterion         -> the loss of (logits, targets) (label smoothing)
    wrap_loss         -> the loss of (inputs, targets), forward included (input-gradient penalty)
    scale_loss        -> the loss that is back-propagated (GradScaler)
    wrap_step         -> change how gradients are computed and applied (SAM, GradScaler.step)
    process_gradients -> edit the step's true gradients before the update (clipping)
    after_step        -> bookkeeping after each optimizer step (EMA, lookahead)
    eval_model        -> the model to evaluate (EMA weights, the module inside DDP)
    metrics           -> what the trick measured, added to the run's row

Interactions that cannot work are declared in ``check`` and rejected before anything runs.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, ContextManager

import torch
from torch import nn

from bench.base.registry import Registry, did_you_mean

Batch = tuple[torch.Tensor, torch.Tensor]
# (logits, targets) -> mean loss; targets are class indices or class probabilities (mixup).
Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (inputs, targets) -> mean loss, the model's forward included.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class StepFns:
    """One optimizer step, split in two so a trick can run code between the parts.

    ``compute_grads`` runs forward+backward over every micro-batch and returns the mean loss
    (a detached tensor); ``apply_update`` turns the gradients into a parameter update.
    """

    compute_grads: Callable[[], torch.Tensor]
    apply_update: Callable[[], None]


@dataclass(frozen=True)
class RunContext:
    """What a trick may know about the run it is part of."""

    device: torch.device
    # The model as the loop calls it: after prepare_model, so possibly a DDP wrapper. A trick that
    # copies or inspects the weights takes ``bench.parts.distributed.unwrap(run.model)``.
    model: nn.Module
    optimizer: torch.optim.Optimizer
    config: Any  # bench.config.matrix.TrainConfig; typed loosely to keep this module import-free
    num_classes: int | None = None  # of the dataset (mixup's one-hot targets); None where unknown (unit tests)
    total_steps: int | None = None  # optimizer steps of the run (schedules over training); None where unknown


class Trick:
    """Base class: every hook is a no-op, so a trick overrides only what it changes."""

    name: ClassVar[str]
    description: ClassVar[str]
    values_help: ClassVar[str]  # what the YAML axis accepts, shown by `trickbench list tricks`
    default: ClassVar[Any]  # the value that means "off"

    def __init__(self, value: Any) -> None:
        self.value = value

    # ---- validation (class level: runs before any process starts) ----
    @classmethod
    def parse(cls, value: Any) -> Any:
        """Return the canonical value or raise ValueError saying what is allowed."""
        return value

    @classmethod
    def parse_value(cls, value: Any) -> Any:
        """The canonical value of a YAML value: ``null`` means off (``default``) for every trick,
        whatever else its ``parse`` accepts; the config layer parses through here."""
        return cls.default if value is None else cls.parse(value)

    @classmethod
    def check(cls, value: Any, config: Any) -> None:
        """Raise ValueError when this value cannot work with the rest of ``config``."""

    @classmethod
    def advise(cls, value: Any, config: Any, total_steps: int) -> str | None:
        """A warning (not an error) about ``value`` in a run of ``total_steps`` optimizer steps."""
        return None

    @classmethod
    def is_active(cls, value: Any) -> bool:
        """Whether the loop needs an instance; "off" values cost nothing."""
        return value != cls.default

    # ---- hooks ----
    def sample_transform(self, data: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A random transform of one training image (C, H, W), float in [0, 1] before normalization,
        applied in the DataLoader workers; never to the evaluation split. ``data``: the run's
        ``bench.parts.data.DatasetSplits`` (input_shape, flip_safe, ...)."""
        return None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def param_groups(self, model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The optimizer's parameter groups; the loop starts from one group of every parameter."""
        return groups

    def optimizer_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments the optimizer is built with (lr, momentum, ... from the config)."""
        return options

    def setup(self, run: RunContext) -> None:
        """Called once the model and optimizer exist (e.g. to build an averaged copy)."""

    def transform_batch(self, batch: Batch) -> Batch:
        """The whole (per-rank) batch of a step, on the device, before split_batch."""
        return batch

    def split_batch(self, batch: Batch) -> list[Batch]:
        return [batch]

    def release_gradients(self) -> bool:
        """True: ``zero_grad(set_to_none=True)`` frees the gradients between steps; False from any
        trick keeps the gradient tensors and zeroes them in place."""
        return True

    def sync_context(self, is_last: bool) -> ContextManager[Any]:
        """Entered around forward and backward of one micro-batch; ``is_last``: the step's last one."""
        return contextlib.nullcontext()

    def forward_context(self) -> ContextManager[Any]:
        return contextlib.nullcontext()

    def criterion(self, criterion: Criterion) -> Criterion:
        """Replace or wrap the loss of (logits, targets); the loop starts from ``F.cross_entropy``."""
        return criterion

    def wrap_loss(self, loss_fn: LossFn) -> LossFn:
        """Wrap the loss of (inputs, targets), forward pass included (a penalty on the inputs)."""
        return loss_fn

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def wrap_step(self, step: StepFns) -> StepFns:
        return step

    def process_gradients(self) -> None:
        """Edit ``.grad`` in place before the update. The gradients are the step's true ones:
        every micro-batch accumulated, all-reduced across ranks, unscaled (GradScaler), at the
        point SAM evaluates them. Runs once per optimizer step."""

    def after_step(self) -> None:
        pass

    def eval_model(self, model: nn.Module) -> nn.Module:
        return model

    def metrics(self) -> dict[str, Any]:
        """What this trick measured over the run (e.g. clipped fraction), added to the row's metrics;
        names must not collide with the loop's own metrics."""
        return {}


class Switch(Trick):
    """A trick turned on by ``true``: off by default, its YAML value a boolean."""

    values_help = "false | true"
    default = False

    @classmethod
    def parse(cls, value: Any) -> Any:
        if not isinstance(value, bool):
            raise ValueError(f"{value!r} is not one of false, true")
        return value


class Choice(Trick):
    """A trick whose YAML value is one of a few names, ``choices`` (the first is usually off)."""

    choices: ClassVar[list[str]]

    @classmethod
    def parse(cls, value: Any) -> Any:
        if value not in cls.choices:
            raise ValueError(f"{value!r} is not one of {', '.join(cls.choices)}{did_you_mean(value, cls.choices)}")
        return value


# Every trick, by name; filled by importing bench.tricks (its __init__ fixes the hook order).
TRICKS: Registry[type[Trick]] = Registry("trick")


def register(cls: type[Trick]) -> type[Trick]:
    """Class decorator: register a Trick under its ``name``."""
    return TRICKS.register(cls.name, cls.description)(cls)
