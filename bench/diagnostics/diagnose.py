"""Diagnostics as files: LR over training for every schedule, gradient flow and activation/gradient
statistics per layer, and (``--profile-trace``) a profiler trace with its top operators; or, with
``--lr-finder``, an LR range test (``bench.diagnostics.lr_finder``) that suggests a learning rate.

Not measurements: these run in-process for a few steps and never write result rows.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from bench.base.errors import ConfigError
from bench.base.safeyaml import shorten
from bench.config.matrix import Cell, Matrix
from bench.config.train_config import TrainConfig
from bench.diagnostics.layer_stats import (
    layer_statistics,
    markdown_table,
    plot_layer_statistics,
)
from bench.diagnostics.lr_finder import find_lr, plot_range_test
from bench.parts.schedules import SCHEDULES, lr_trace
from bench.reports.figures import _pyplot, _save
from bench.store.paths import check_out_dir
from bench.training.feasibility import load_runnable_matrix
from bench.training.profiling import profile_steps, write_profile
from bench.training.train import make_step, prepare_run

PROFILE_STEPS = 3

# bench.training.train (torchvision, the datasets) and bench.reports.figures (matplotlib) are imported where used:
# this module is imported by every `trickbench` command, which should refuse bad input quickly.


def plot_lr_schedules(total_steps: int, warmup_steps: int, lr: float, path: Path) -> Path:
    """One panel per schedule: LR against optimizer step, without and with linear warmup."""

    plt = _pyplot()
    names = list(SCHEDULES)
    cols = 4
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False, layout="constrained")
    for ax, name in zip(axes.flat, names):
        ax.plot(lr_trace(name, total_steps, 0, lr), label="no warmup")
        if name != "onecycle":  # OneCycle has its own warmup; the config rejects another
            ax.plot(lr_trace(name, total_steps, warmup_steps, lr), "--", label=f"{warmup_steps} warmup steps")
        ax.set_title(name)
        ax.set_ylabel("learning rate")
        ax.set_xlabel("optimizer step")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Learning-rate schedules over {total_steps} steps (peak lr {lr:g}), stepped once per optimizer step")
    _save(fig, path)
    return path


@dataclass
class Inspection:
    """What the last of a cell's first steps showed, and the profile of the steps after it."""

    gradient_flow: list[dict[str, Any]]  # per weight: mean and max |grad|
    layer_statistics: list[dict[str, Any]]  # per leaf module: bench.diagnostics.layer_stats.KEYS
    profile: Any = None  # torch.profiler.profile of PROFILE_STEPS more steps, when asked for


def inspect_training(config: TrainConfig, seed: int, steps: int, profile: bool = False) -> Inspection:
    """Train ``steps`` steps; read gradients and layer statistics in the last one; then,
    if ``profile``, profile PROFILE_STEPS more (the earlier steps are their warm-up)."""


    run = prepare_run(config, seed, torch.device(config.device))
    loader = DataLoader(run.splits.train, batch_size=config.per_rank_batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    batches = ((x.to(run.device), y.to(run.device)) for x, y in _cycle(loader))
    for _, batch in zip(range(steps - 1), batches):
        run.step(batch)
    # The last step by hand: the gradients are read between computing and applying them.
    fns = make_step(run.model, run.optimizer, run.tricks, next(batches))
    with layer_statistics(run.model) as records:
        fns.compute_grads()
    layers = [{"layer": name.removesuffix(".weight"), "mean_abs_grad": p.grad.abs().mean().item(),
               "max_abs_grad": p.grad.abs().max().item()}
              for name, p in run.model.named_parameters() if p.grad is not None and p.ndim > 1]
    fns.apply_update()
    for trick in run.tricks:
        trick.after_step()
    inspection = Inspection(layers, [r.row() for r in records])
    if profile:
        ready = [next(batches) for _ in range(PROFILE_STEPS)]  # loading data stays out of the trace
        inspection.profile = profile_steps(lambda: run.step(ready.pop(0)), PROFILE_STEPS, run.device)
    return inspection


def gradient_flow(config: TrainConfig, seed: int, steps: int) -> list[dict[str, Any]]:
    """Mean and max |grad| of every weight (conv/linear, ndim > 1) at the last of ``steps`` steps."""
    return inspect_training(config, seed, steps).gradient_flow


def _cycle(loader: Any):
    while True:
        yield from loader


def plot_gradient_flow(layers: list[dict[str, Any]], title: str, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(7, 0.35 * len(layers)), 5), layout="constrained")
    x = range(len(layers))
    ax.bar(x, [l["max_abs_grad"] for l in layers], alpha=0.4, label="max |grad|")
    ax.bar(x, [l["mean_abs_grad"] for l in layers], alpha=0.9, label="mean |grad|")
    ax.set_yscale("log")
    ax.set_xticks(list(x), [l["layer"] for l in layers], rotation=90, fontsize=7)
    ax.set_ylabel("|gradient| (log scale)")
    ax.set_xlabel("weight (module path, input → output)")
    ax.set_title(title)
    ax.legend()
    _save(fig, path)
    return path


def diagnose(matrix: Matrix, cell_id: str | None, steps: int, out_dir: Path,
             profile_trace: bool = False) -> list[Path]:
    cell = _find_cell(matrix, cell_id)
    config = cell.config
    out_dir.mkdir(parents=True, exist_ok=True)
    total = config.steps or 100
    written = [plot_lr_schedules(total, config.lr_warmup_steps or max(1, total // 10), config.optimizer.lr,
                                 out_dir / "lr_schedules.png")]
    seen = inspect_training(config, matrix.seeds[0], steps, profile=profile_trace)
    where = f"{matrix.name} cell {cell.cell_id}\n{cell.label()}"
    written.append(plot_gradient_flow(seen.gradient_flow, f"Gradient flow after {steps} steps, {where}",
                                      out_dir / f"grad_flow_{cell.cell_id}.png"))
    written.append(plot_layer_statistics(seen.layer_statistics, f"Layer statistics in step {steps}, {where}",
                                         out_dir / f"layer_stats_{cell.cell_id}.png"))
    table = out_dir / f"layer_stats_{cell.cell_id}.md"
    table.write_text(f"Outputs of every leaf module and the loss's gradient with respect to them, training step "
                     f"{steps} of cell {cell.cell_id} ({cell.label()}).\n\n" + markdown_table(seen.layer_statistics))
    written.append(table)
    if profile_trace:
        written += write_profile(seen.profile, PROFILE_STEPS, torch.device(config.device),
                                 out_dir / f"trace_{cell.cell_id}.json", out_dir / f"top_ops_{cell.cell_id}.md")
    return written


def lr_finder(matrix: Matrix, cell_id: str | None, min_lr: float, max_lr: float, steps: int,
              out_dir: Path) -> tuple[Path, float]:
    """The LR range test of a cell: its figure and the suggested learning rate."""

    cell = _find_cell(matrix, cell_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = find_lr(cell.config, matrix.seeds[0], min_lr, max_lr, steps)
    end = f"diverged at lr {result.lrs[-1]:.3g}" if result.stopped_early else f"reached max lr {max_lr:g}"
    title = f"LR range test, {matrix.name} cell {cell.cell_id} ({len(result.lrs)} steps, {end})\n{cell.label()}"
    path = plot_range_test(result, title, out_dir / f"lr_finder_{cell.cell_id}.png")
    print(f"lr finder: smoothed loss lowest at lr {result.min_loss_lr:.3g}, {end}; "
          f"suggested lr {result.suggested_lr:.3g} (lowest/10)")
    return path, result.suggested_lr


def cmd_diagnose(args: argparse.Namespace) -> int:
    if args.lr_finder and not 0 < args.min_lr < args.max_lr:
        raise ConfigError("arguments", "--min-lr/--max-lr", f"need 0 < min < max, got {args.min_lr:g} and "
                          f"{args.max_lr:g}")
    matrix = load_runnable_matrix(args.matrix, profile=args.profile)
    out_dir = Path(args.out) if args.out else Path("results") / matrix.name / "diagnostics"
    check_out_dir(out_dir)
    cell = _find_cell(matrix, args.cell)
    if cell.config.world_size > 1:  # gradient flow runs in this one process, not under torchrun
        raise ConfigError(matrix.file, f"--cell {cell.cell_id}", f"world_size {cell.config.world_size}: diagnose "
                          "runs one process; pick a world_size 1 cell (see run --dry-run)")
    if args.lr_finder:
        path, _ = lr_finder(matrix, cell.cell_id, args.min_lr, args.max_lr, args.finder_steps, out_dir)
        print(path)
        return 0
    for path in diagnose(matrix, cell.cell_id, args.steps, out_dir, profile_trace=args.profile_trace):
        print(path)
    return 0


def _find_cell(matrix: Matrix, cell_id: str | None) -> Cell:
    cell = next((c for c in matrix.cells if c.cell_id == cell_id), None) if cell_id else matrix.cells[0]
    if cell is None:
        known = ", ".join(c.cell_id for c in matrix.cells)
        raise ConfigError(matrix.file, "--cell", f"no cell {shorten(cell_id)}; cells: {shorten(known, 150)[1:-1]} "
                          "(see run --dry-run)")
    return cell


