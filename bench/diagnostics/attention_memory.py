"""Memory of one vit_tiny training step against sequence length, for each attention kernel.

``trickbench attention-memory`` trains vit_tiny on synthetic images of growing size (patch 4:
16x16 -> 16 patch tokens ... 64x64 -> 256, plus the class token) and measures one step of each
(kernel, size) with the harness's own memory step (``bench.training.train.memory_step``: the storage
ledger of ``bench.training.memory``), after one warm-up step so optimizer state exists. Memory is a
deterministic count, so one run per point. Writes ``attention_memory.csv``, ``.md`` and ``.png``.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
from pathlib import Path
from typing import Any

import torch

from bench.base.errors import ConfigError
from bench.config.train_config import build_train_config
from bench.parts.models import VIT_TINY_PATCH
from bench.reports.figures import _pyplot, _save
from bench.store.files import make_folder, write_atomic
from bench.store.paths import check_out_dir
from bench.training.feasibility import CellProblem, check_run
from bench.training.train import memory_step, prepare_run

KERNELS: dict[str, Any] = {  # label -> the attention trick's value
    "nn.MultiheadAttention": None,
    "math": "math",
    "sdpa": "sdpa",
    "chunked(16)": {"chunked": 16},
}
# Distinct markers and dashes: kernels that keep no L^2 matrix draw on top of each other.
STYLES = {"nn.MultiheadAttention": "o-", "math": "s-", "sdpa": "^--", "chunked(16)": "x:"}
IMAGE_SIZES = (16, 32, 48, 64)
MIB = 2**20
VIT_TINY_HEADS, VIT_TINY_LAYERS = 4, 4  # bench.parts.models.vit_tiny


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:120]


def point_config(value: Any, image_size: int, batch_size: int):
    return build_train_config({"model": "vit_tiny", "dataset": "synthetic", "image_size": image_size,
                               "num_samples": batch_size, "batch_size": batch_size, "steps": 10,
                               "attention": value}, "attention-memory")


def attention_bytes(image_size: int, batch_size: int) -> int:
    """A lower bound of one training step's memory with the math kernel: the attention weights
    every layer keeps for backward, batch x heads x L^2 float32 (L: tokens)."""
    tokens = (image_size // VIT_TINY_PATCH) ** 2 + 1
    return batch_size * VIT_TINY_HEADS * tokens**2 * 4 * VIT_TINY_LAYERS


def check_points(image_sizes: tuple[int, ...], batch_size: int) -> None:
    """Refuse, before anything is measured, points this machine cannot hold (ConfigError, one line)."""
    where = f"--batch-size {batch_size} --image-sizes {max(image_sizes)}"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    need = attention_bytes(max(image_sizes), batch_size)
    if need > memory // 2:
        raise ConfigError("arguments", where, f"one step keeps at least {need / 2**30:.1f} GiB of attention weights "
                          f"(math kernel: batch x {VIT_TINY_HEADS} heads x tokens^2 x {VIT_TINY_LAYERS} layers); "
                          f"this machine has {memory / 2**30:.0f} GiB: use smaller sizes")
    for size in image_sizes:
        try:
            check_run(point_config(None, size, batch_size))
        except CellProblem as problem:
            raise ConfigError("arguments", where, problem.message) from None


def measure_point(value: Any, image_size: int, batch_size: int, seed: int = 0) -> dict[str, Any]:
    """Peak and activations at the peak of one tracked training step of vit_tiny."""

    try:
        run = prepare_run(point_config(value, image_size, batch_size), seed, torch.device("cpu"))
        batch = next(iter(run.train_loader(seed)))
        run.step(batch)  # warm-up: the optimizer's state exists in the measured step, as in a run
        _, memory = memory_step(run, batch)
    except RuntimeError as err:  # the allocator's refusal (torch.OutOfMemoryError is one) is the user's size
        if "alloc" not in str(err) and not isinstance(err, torch.OutOfMemoryError):
            raise
        raise ConfigError("arguments", f"--batch-size {batch_size} --image-sizes {image_size}",
                          f"cannot be allocated on this machine ({first_line(err)}); use smaller sizes") from None
    breakdown = memory["memory_breakdown"]
    backend = next((m.backend for t in run.tricks for m in getattr(t, "modules", []) if m.backend), None)
    return {"image_size": image_size, "tokens": (image_size // VIT_TINY_PATCH) ** 2 + 1,
            "peak_memory_bytes": memory["peak_memory_bytes"], "activations_bytes": breakdown["activations"],
            "other_bytes": breakdown["other"], "sdpa_backend": backend or ""}


def measure(image_sizes: tuple[int, ...] = IMAGE_SIZES, batch_size: int = 32) -> list[dict[str, Any]]:
    return [{"kernel": label, **measure_point(value, size, batch_size)}
            for label, value in KERNELS.items() for size in image_sizes]


def plot(rows: list[dict[str, Any]], batch_size: int, path: Path) -> Path:
    """Two panels against tokens: the step's peak, and the activations live at that peak."""

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for ax, key, title in zip(axes, ("peak_memory_bytes", "activations_bytes"),
                              ("peak memory of a training step", "activations live at the peak")):
        for kernel in KERNELS:
            points = [r for r in rows if r["kernel"] == kernel]
            ax.plot([r["tokens"] for r in points], [r[key] / MIB for r in points], STYLES[kernel], label=kernel,
                    markersize=7)
        ax.set_xlabel("sequence length (tokens: patches + class token)")
        ax.set_ylabel("MiB")
        ax.set_title(title)
    axes[0].legend()
    fig.suptitle(f"vit_tiny (4 layers, 4 heads, width 128), batch {batch_size}, fp32, CPU: "
                 "memory counted by the storage ledger")
    _save(fig, path)
    return path


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| kernel | image | tokens | peak (MiB) | activations at the peak (MiB) | SDPA backend |",
             "| :--- | ---: | ---: | ---: | ---: | :--- |"]
    lines += [f"| {r['kernel']} | {r['image_size']} | {r['tokens']} | {r['peak_memory_bytes'] / MIB:.1f} | "
              f"{r['activations_bytes'] / MIB:.1f} | {r['sdpa_backend'] or '-'} |" for r in rows]
    return "\n".join(lines) + "\n"


def write(rows: list[dict[str, Any]], batch_size: int, out_dir: Path) -> list[Path]:
    make_folder(out_dir)
    table = out_dir / "attention_memory.csv"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(table, buffer.getvalue())
    text = out_dir / "attention_memory.md"
    write_atomic(text, f"# Attention memory against sequence length\n\nvit_tiny, batch {batch_size}, fp32, "
                 f"one training step on CPU (`trickbench attention-memory`).\n\n" + markdown_table(rows))
    return [table, text, plot(rows, batch_size, out_dir / "attention_memory.png")]


def cmd_attention_memory(args: argparse.Namespace) -> int:
    out_dir = Path(args.out)
    check_out_dir(out_dir)
    check_points(tuple(args.image_sizes), args.batch_size)
    torch.set_num_threads(1)  # a count, not a timing: no need for the cores others measure on
    rows = measure(tuple(args.image_sizes), args.batch_size)
    for path in write(rows, args.batch_size, out_dir):
        print(path)
    return 0


