"""The contract between the training loop and the tricks.

A trick is one small class registered by name. Its YAML value (e.g. ``ema: 0.999``) is parsed
once at the config boundary; an instance is built per run with that value. The loop calls these
hooks, each a no-op by default, in a fixed order:

    prepare_model     -> change the model once before training (checkpointing, DDP wrapper, ...)
    split_batch       -> turn one (per-rank) batch into micro-batches (accumulation)
    sync_context      -> a context around forward+backward of each micro-batch (DDP no_sync)
    forward_context   -> a context around every forward pass (autocast)
    scale_loss        -> the loss that is back-propagated (GradScaler)
    wrap_step         -> change how gradients are computed and applied (SAM, GradScaler.step)
    after_step        -> bookkeeping after each optimizer step (EMA)
    eval_model        -> the model to evaluate (EMA weights, the module inside DDP)

Interactions that cannot work are declared in ``check`` and rejected before anything runs.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, ContextManager

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


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
    # copies or inspects the weights takes ``bench.distributed.unwrap(run.model)``.
    model: nn.Module
    optimizer: torch.optim.Optimizer
    config: Any  # bench.config.TrainConfig; typed loosely to keep this module import-free


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
    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def setup(self, run: RunContext) -> None:
        """Called once the model and optimizer exist (e.g. to build an averaged copy)."""

    def split_batch(self, batch: Batch) -> list[Batch]:
        return [batch]

    def sync_context(self, is_last: bool) -> ContextManager[Any]:
        """Entered around forward and backward of one micro-batch; ``is_last``: the step's last one."""
        return contextlib.nullcontext()

    def forward_context(self) -> ContextManager[Any]:
        return contextlib.nullcontext()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def wrap_step(self, step: StepFns) -> StepFns:
        return step

    def after_step(self) -> None:
        pass

    def eval_model(self, model: nn.Module) -> nn.Module:
        return model

