"""Checks of one cell that a run would otherwise discover only after it started.

Cheap by construction: dataset sizes come from ``bench.parts.data.dataset_facts`` (nothing is loaded),
and the model is tried on the ``meta`` device (shapes only, no memory, no arithmetic), so a
model that cannot take the input is refused before any process starts, not by a trial run.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch

from bench.base.errors import ConfigError
from bench.config.matrix import Matrix, cell_key, load_matrix
from bench.config.train_config import TrainConfig
from bench.parts.clock import MEASUREMENT_STEPS, min_total_steps
from bench.parts.data import dataset_facts
from bench.parts.models import meta_forward_problem
from bench.training.train import build_tricks
from bench.tricks import TRICKS

MAX_SYNTHETIC_BYTES = 8 << 30  # synthetic data lives in memory: train + test split, float32


class CellProblem(ValueError):
    """A cell that cannot run; ``fields`` are the config fields involved, the first the likeliest cause."""

    def __init__(self, fields: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.fields, self.message = fields, message


def check_run(config: TrainConfig) -> list[str]:
    """Raise CellProblem when ``config`` cannot run; return warnings (one line each) when it can."""
    try:
        facts = dataset_facts(config)
    except FileNotFoundError as err:
        raise CellProblem(("data_dir", "dataset"), str(err)) from None
    if config.dataset == "synthetic":
        _check_synthetic_size(config, facts.input_shape)
    total_steps = _check_run_length(config, facts.train_size)
    _check_model_input(config, facts.num_classes, facts.input_shape)
    return _trick_advice(config, total_steps)


def _check_synthetic_size(config: TrainConfig, shape: tuple[int, int, int]) -> None:
    samples = config.num_samples + max(config.num_samples // 4, 1)  # train + test, as build_synthetic makes them
    size = samples * shape[0] * shape[1] * shape[2] * 4
    if size > MAX_SYNTHETIC_BYTES:
        raise CellProblem(("num_samples", "image_size"), f"num_samples {config.num_samples} at {shape[1]}x{shape[2]} "
                          f"makes {size / 2**30:.0f} GiB of synthetic data in memory (limit "
                          f"{MAX_SYNTHETIC_BYTES >> 30} GiB)")


def _check_run_length(config: TrainConfig, train_size: int) -> int:
    """Optimizer steps of the run; refuses runs with no batch or nothing left to time."""
    ranks = config.world_size
    per_rank_samples = train_size // ranks  # DistributedSampler(drop_last=True)
    batches = per_rank_samples // config.per_rank_batch_size  # DataLoader(drop_last=True)
    if batches == 0:
        share = f" ({per_rank_samples} for each of {ranks} ranks)" if ranks > 1 else ""
        raise CellProblem(("batch_size", "world_size", "dataset", "num_samples"),
                          f"per-rank batch size {config.per_rank_batch_size} exceeds the {train_size} training samples "
                          f"of {config.dataset}{share}: with drop_last no batch is left")
    total = config.steps or config.epochs * batches
    need = min_total_steps(config.warmup_steps)
    if total < need:
        length = f"{total} steps" if config.steps else f"{config.epochs} epochs of {batches} batches"
        raise CellProblem(("steps" if config.steps else "epochs", "warmup_steps", "batch_size", "world_size"),
                          f"{length} leave nothing to time: a run needs at least {need} optimizer steps "
                          f"({config.warmup_steps} warm-up, {MEASUREMENT_STEPS} measurement, 1 timed)")
    return total


def _check_model_input(config: TrainConfig, num_classes: int, shape: tuple[int, int, int]) -> None:
    micro = _micro_batch_size(config)
    problem = meta_forward_problem(config.model, num_classes, shape, micro)
    if problem:
        raise CellProblem(("model", "image_size", "batch_size", "dataset"),
                          f"{config.model} cannot train on batches of {micro}x{shape[0]}x{shape[1]}x{shape[2]}: {problem}")


def _micro_batch_size(config: TrainConfig) -> int:
    """The smallest batch a forward pass sees: the per-rank batch as the tricks split it."""

    batches = [(torch.empty(config.per_rank_batch_size, 1, device="meta"),
                torch.empty(config.per_rank_batch_size, device="meta"))]
    for trick in build_tricks(config):
        batches = [mb for b in batches for mb in trick.split_batch(b)]
    return min(len(inputs) for inputs, _ in batches)


def _trick_advice(config: TrainConfig, total_steps: int) -> list[str]:
    notes = []
    for entry in TRICKS:
        advice = entry.obj.advise(config.tricks[entry.name], config, total_steps)
        if advice:
            notes.append(f"{entry.name}: {advice}")
    return notes


def check_runs(matrix: Matrix) -> Matrix:
    """What each cell's runs would discover only after starting: data, run length, model input.

    Called by whoever is about to run a matrix (CLI, runner), after it loads: building a cell's
    model is not part of reading its file. A problem is a ConfigError naming the cell when one of
    its axis values is involved, else the base field; advice comes back as the matrix's warnings.
    """
    notes = list(matrix.warnings)
    for cell in matrix.cells:
        try:
            advice = check_run(cell.config)
        except CellProblem as problem:
            own = any(name in cell.axes for name in problem.fields)
            key = cell_key(cell.axes) if own else f"base.{problem.fields[0]}"
            raise ConfigError(matrix.file, key, problem.message) from None
        notes += [f"{matrix.file}: {note}" for note in advice]
    return dataclasses.replace(matrix, warnings=tuple(dict.fromkeys(notes)))


def load_runnable_matrix(path: str | Path, profile: Optional[str] = None, device: Optional[str] = None,
                         max_cells: Optional[int] = None) -> Matrix:
    """:func:`~bench.config.matrix.load_matrix`, then :func:`check_runs`: every check before a run."""
    return check_runs(load_matrix(path, profile=profile, device=device, max_cells=max_cells))
