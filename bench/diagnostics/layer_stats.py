"""Per-layer activation and gradient statistics of one training step, from module hooks.

A forward hook on every leaf module (convolution, norm, activation, linear, ...) reads its output:
mean, standard deviation, and the fraction of exact zeros (dead ReLU units show up as a high
fraction). A full backward hook (``register_full_backward_hook``) reads the gradient of the loss
with respect to that output: its mean, standard deviation and mean absolute value (vanishing or
exploding signals show up layer by layer). Sums are accumulated over every call of a module in
the step, so micro-batches (accumulation) pool into the whole batch, and a checkpointed block's
recomputation counts the same values twice, which leaves the mean, std and fraction unchanged.

Full backward hooks cannot see a module's output that a later in-place op overwrites (autograd
refuses), so in-place activations run out of place while the hooks are on: same values, more memory.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from bench.reports.figures import _pyplot, _save

KEYS = ("activation_mean", "activation_std", "activation_zero_fraction", "grad_mean", "grad_std", "grad_mean_abs")


@dataclass
class Moments:
    """Running sums of one tensor stream: count, sum, sum of squares, sum of |x|, zeros."""

    count: int = 0
    total: float = 0.0
    squares: float = 0.0
    absolute: float = 0.0
    zeros: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double()  # float64 sums: a million squares of bf16 values lose nothing
        self.count += x.numel()
        self.total += x.sum().item()
        self.squares += x.square().sum().item()
        self.absolute += x.abs().sum().item()
        self.zeros += int((x == 0).sum().item())

    @property
    def mean(self) -> float:
        return self.total / self.count

    @property
    def std(self) -> float:
        """Population standard deviation (all elements of all calls)."""
        return math.sqrt(max(self.squares / self.count - self.mean**2, 0.0))


@dataclass
class LayerRecord:
    layer: str
    kind: str
    activations: Moments = field(default_factory=Moments)
    grads: Moments = field(default_factory=Moments)

    def row(self) -> dict[str, Any]:
        a, g = self.activations, self.grads
        grads = (g.mean, g.std, g.absolute / g.count) if g.count else (math.nan,) * 3  # no gradient reached it
        return {"layer": self.layer, "kind": self.kind, "activation_mean": a.mean, "activation_std": a.std,
                "activation_zero_fraction": a.zeros / a.count, **dict(zip(KEYS[3:], grads))}


def _leaf_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if name and next(module.children(), None) is None:
            yield name, module


@contextlib.contextmanager
def out_of_place(model: nn.Module) -> Iterator[None]:
    """In-place activations (ReLU(inplace=True)) compute out of place inside the block."""
    switched = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    for m in switched:
        m.inplace = False
    try:
        yield
    finally:
        for m in switched:
            m.inplace = True


@contextlib.contextmanager
def layer_statistics(model: nn.Module) -> Iterator[list[LayerRecord]]:
    """Record every leaf module's output and output-gradient statistics inside the block.

    Yields the records (filled as the block runs), in module order; a module that never ran
    has none at the end and is dropped then.
    """
    records: list[LayerRecord] = []
    handles = []
    for name, module in _leaf_modules(model):
        record = LayerRecord(name, type(module).__name__)
        records.append(record)

        def forward_hook(_m: nn.Module, _inputs: Any, output: Any, record: LayerRecord = record) -> None:
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                record.activations.add(output)

        def backward_hook(_m: nn.Module, _grad_in: Any, grad_out: tuple, record: LayerRecord = record) -> None:
            if grad_out and isinstance(grad_out[0], torch.Tensor):
                record.grads.add(grad_out[0])

        handles.append(module.register_forward_hook(forward_hook))
        handles.append(module.register_full_backward_hook(backward_hook))
    try:
        with out_of_place(model), warnings.catch_warnings():
            # The first module's input needs no gradient: its hook gets only the output's, as wanted.
            warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed "
                                    "with respect to module outputs")
            yield records
    finally:
        for handle in handles:
            handle.remove()
        records[:] = [r for r in records if r.activations.count]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = "| layer | module | act. mean | act. std | act. zeros | grad mean | grad std | mean abs grad |"
    lines = [header, "| :--- | :--- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['layer']} | {r['kind']} | {r['activation_mean']:.3g} | {r['activation_std']:.3g} | "
              f"{r['activation_zero_fraction']:.1%} | {r['grad_mean']:.3g} | {r['grad_std']:.3g} | "
              f"{r['grad_mean_abs']:.3g} |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_layer_statistics(rows: list[dict[str, Any]], title: str, path: Any) -> Any:
    """Three panels over the layers: activation std (and |mean|), zero fraction, gradient scale."""

    plt = _pyplot()
    x = list(range(len(rows)))
    fig, axes = plt.subplots(3, 1, figsize=(max(8, 0.3 * len(rows)), 9), sharex=True, layout="constrained")
    axes[0].plot(x, [r["activation_std"] for r in rows], "o-", label="std")
    axes[0].plot(x, [abs(r["activation_mean"]) for r in rows], "s--", label="|mean|")
    axes[0].set_ylabel("activation")
    axes[0].set_yscale("symlog", linthresh=1e-3)
    axes[0].legend()
    axes[1].bar(x, [r["activation_zero_fraction"] for r in rows])
    axes[1].set_ylabel("fraction of zeros")
    axes[1].set_ylim(0, 1)
    axes[2].plot(x, [r["grad_mean_abs"] for r in rows], "o-", label="mean |grad|")
    axes[2].plot(x, [r["grad_std"] for r in rows], "s--", label="std of grad")
    axes[2].set_yscale("log")
    axes[2].set_ylabel("gradient w.r.t. the output")
    axes[2].legend()
    axes[2].set_xticks(x, [f"{r['layer']} ({r['kind']})" for r in rows], rotation=90, fontsize=7)
    axes[2].set_xlabel("module (input → output)")
    fig.suptitle(title)
    _save(fig, path)
    return path
