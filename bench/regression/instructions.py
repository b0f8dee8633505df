"""Instruction counts of one training step: the opt-in ``instructions`` tier of ``bench.regression.compare``.

``torch.utils.benchmark.Timer.collect_callgrind`` runs the step in a child process under
valgrind's callgrind and counts the instructions it executes. On one thread the count is nearly
deterministic, so a small margin (measured from repeated counts) can gate on a shared machine
where step times swing by tens of percent. The price is valgrind's slowdown: importing torch
under it alone takes minutes, so the project's CI does not run this tier.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from bench.config.train_config import TrainConfig
from bench.training.measure import _cpu_model
from bench.training.train import endless_batches, prepare_run

METRIC = "instructions_per_step"
SKIPPED = "valgrind not found: instruction tier skipped"
# Why these two numbers: repeats within one process agree to ~0.01%, but a baseline is compared
# with another process (other addresses, allocator state), so the measured spread is widened
# 5-fold; the floor keeps a zero spread (identical repeats) from making the gate exact.
SPREAD_FACTOR = 5.0
MARGIN_FLOOR = 1e-3
TOOLS = ("valgrind", "callgrind_control", "callgrind_annotate")  # what collect_callgrind calls


def valgrind_version() -> str | None:
    """e.g. 'valgrind-3.19.0', or None when any tool collect_callgrind needs is missing."""
    if not all(shutil.which(tool) for tool in TOOLS):
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["valgrind", "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or None
    return None


def fingerprint() -> dict[str, Any]:
    """What must match for two counts to be compared: the code that runs and the CPU it takes."""

    return {"torch": torch.__version__, "python": platform.python_version(), "cpu_model": _cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "valgrind": valgrind_version()}


def prepared_step(config_json: str, seed: int) -> Callable[[], torch.Tensor]:
    """The step to count: a run of ``config`` on CPU, one batch, one warm-up step already taken
    (lazy init, the optimizer's state, first-call dispatch are not counted)."""

    cpu = torch.device("cpu")
    run = prepare_run(TrainConfig.from_dict(json.loads(config_json)), seed, cpu)
    batch = next(endless_batches(run.train_loader(seed), cpu))
    run.step(batch)
    return lambda: run.step(batch)


@contextlib.contextmanager
def _child_environment(root: Path) -> Iterator[None]:
    """The Timer's child runs ``python`` from PATH and must be this interpreter (it checks), and
    must import ``bench`` from ``root``; a fixed hash seed keeps dict probing the same."""
    saved = {k: os.environ.get(k) for k in ("PATH", "PYTHONPATH", "PYTHONHASHSEED")}
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), saved["PATH"] or ""])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), saved["PYTHONPATH"]) if p)
    os.environ["PYTHONHASHSEED"] = "0"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def count_step_instructions(config: Any, seed: int = 0, repeats: int = 3, root: str | Path | None = None) -> list[int]:
    """Instructions of one training step of ``config`` (a TrainConfig), counted ``repeats``
    times in one valgrind process, one thread. ``root``: the folder whose ``bench`` the child
    imports (default: this one; a test points it at a mutated copy)."""
    # lazy: only the instructions tier (valgrind) needs it
    from torch.utils.benchmark import Timer

    if repeats < 1:
        raise ValueError(f"repeats: {repeats} must be at least 1")
    root = Path(root) if root else Path(__file__).resolve().parents[2]
    setup = f"from bench.regression.instructions import prepared_step\nstep = prepared_step({json.dumps(config.to_dict())!r}, {seed})"
    with _child_environment(root):
        stats = Timer(stmt="step()", setup=setup, num_threads=1).collect_callgrind(
            number=1, repeats=repeats, collect_baseline=False)
    # denoise: drops CPython's unicode-dict lookups, the known noisy part; exclusive counts of
    # the statement only (the loop around it is a few hundred instructions, not subtracted).
    return [s.counts(denoise=True) for s in stats]


def spread(counts: list[int]) -> float:
    """Relative spread of repeated counts: (max − min) / median."""
    return (max(counts) - min(counts)) / statistics.median(counts)


def margin(base_spread: float | None, new_spread: float | None) -> float:
    """Relative tolerance of a comparison: the wider side's measured spread, widened, floored."""
    measured = max(s for s in (base_spread, new_spread, 0.0) if s is not None)
    return max(SPREAD_FACTOR * measured, MARGIN_FLOOR)


def measure_cells(cells: dict[str, Any], configs: dict[str, Any], seed: int, repeats: int,
                  log: Callable[[str], None] = print) -> bool:
    """Add the median count and its spread to each CellRecord that has a config; False (and a
    note) when valgrind is missing, so the tier is skipped rather than failed."""
    version = valgrind_version()
    if version is None:
        log(SKIPPED)
        return False
    env = fingerprint()
    for cell_id, config in configs.items():
        if cell_id not in cells or not cells[cell_id].values:
            continue  # failed runs: nothing to attach to
        counts = count_step_instructions(config, seed, repeats)
        cell = cells[cell_id]
        cell.values[METRIC] = {str(seed): statistics.median(counts)}
        cell.spreads[METRIC] = spread(counts)
        for key, value in env.items():  # the rows' own values stay: the other tiers judge them
            cell.env.setdefault(key, value)
        log(f"{cell.label}: {statistics.median(counts):,.0f} instructions/step "
            f"(spread {spread(counts):.4%} over {repeats} counts)")
    return True
