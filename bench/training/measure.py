"""Measurement of a run: step clocks, the run recorder, FLOPs, device peaks, the environment.

The recorder is what the training loop reports to: it times the timed steps inside windows
opened and closed at a barrier, keeps the untimed ones (warm-up, measurement passes,
evaluation) off the training clock, and turns the per-epoch losses into the curve. Memory is
tracked in ``bench.training.memory``; FLOPs and memory are each measured in an untimed step of their
own, so the timed steps run the plain code path and no measurement disturbs another.
"""
from __future__ import annotations

import contextlib
import os
import platform
import re
import resource
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

import bench
from bench.parts import distributed
from bench.parts.clock import StepClock


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int) -> None:
        super().__init__(f"non-finite training loss at step {step}")
        self.step = step


class Stopwatch:
    """Wall time since ``start``, less the time spent inside ``paused()`` blocks."""

    def __init__(self) -> None:
        self._started: float | None = None
        self._paused_s = 0.0

    def start(self) -> None:
        self._started = time.perf_counter()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self._paused_s += time.perf_counter() - began

    def elapsed_s(self) -> float:
        return time.perf_counter() - self._started - self._paused_s


class RunRecorder:
    """Everything the loop measures about time and loss; ``summary()`` gives the metrics.

    Three clocks: the timed windows (throughput: timed steps and their data waits, at a
    barrier on both ends, so a window's wall time is the slowest rank's); the training clock
    (``train_time_s`` of the curve and ``time_to_target_s``: from the first training step,
    paused during evaluation and the untimed measurement steps); and the wall clock of the
    whole run from the recorder's creation (``wall_time_s``).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.clock = StepClock(device)
        self.training = Stopwatch()
        self.curve: list[dict[str, Any]] = []
        self.warmup_time_s = 0.0
        self._created = time.perf_counter()
        self._losses: list[torch.Tensor] = []
        self._epoch_first_step = 0  # index into _losses of the current epoch's first step
        self._window_started: float | None = None
        self._timed_wall_s = 0.0
        self._data_wait_s = 0.0

    # ---- the steps ----
    def start_training(self) -> None:
        self.training.start()

    @contextlib.contextmanager
    def fetching(self, timed: bool) -> Iterator[None]:
        """Around ``next(batches)``: a timed step's wait for data is part of its window."""
        if timed:
            self._open_window()
        began = time.perf_counter()
        yield
        if timed:
            self._data_wait_s += time.perf_counter() - began

    @contextlib.contextmanager
    def warmup_step(self) -> Iterator[None]:
        began = time.perf_counter()
        yield
        synchronize(self.device)
        self.warmup_time_s += time.perf_counter() - began

    @contextlib.contextmanager
    def timed_step(self) -> Iterator[None]:
        self._open_window()
        started = self.clock.start()
        yield
        self.clock.stop(started)

    @contextlib.contextmanager
    def untimed(self) -> Iterator[None]:
        """A measurement pass (memory, FLOPs): it trains, but its slowed-down time counts nowhere."""
        self._close_window()
        synchronize(self.device)
        with self.training.paused():
            yield
            synchronize(self.device)

    def add_loss(self, loss: torch.Tensor) -> None:
        self._losses.append(loss)
        if len(self._losses) % 50 == 0:
            self._check_finite()

    # ---- epochs ----
    def end_epoch(self, epoch: int, evaluate: Callable[[], dict[str, float]] | None) -> None:
        """The curve point of the epoch that just ended; ``evaluate`` runs off every clock."""
        self._close_window()
        synchronize(self.device)
        self._check_finite()
        losses = torch.stack(self._losses[self._epoch_first_step:]).float()  # this epoch's steps only
        self._epoch_first_step = len(self._losses)
        point = {"epoch": epoch + 1, "step": len(self._losses),
                 "train_loss": distributed.mean(losses.mean().item()),
                 "train_time_s": self.training.elapsed_s()}
        if evaluate is not None:
            with self.training.paused():
                point.update(evaluate())
        self.curve.append(point)

    def time_to_target_s(self, target: float | None) -> float | None:
        """Training time at the end of the first epoch whose top-1 accuracy reached ``target``."""
        if target is None:
            return None
        reached = [p["train_time_s"] for p in self.curve
                   if p.get("accuracy_top1") is not None and p["accuracy_top1"] >= target]
        return reached[0] if reached else None

    # ---- summary ----
    def mean_step_s(self) -> float:
        return statistics.fmean(self.clock.durations_s)

    def summary(self, global_batch_size: int) -> dict[str, Any]:
        """Step-time, throughput and loss metrics, combined over the ranks."""
        self._close_window()
        durations_ms = [d * 1e3 for d in self.clock.durations_s]
        timed_steps = len(durations_ms)
        q = statistics.quantiles(durations_ms, n=10) if timed_steps >= 2 else [durations_ms[0]] * 9
        timed_wall_s = max(distributed.gather(self._timed_wall_s))  # the slowest rank's
        tail = torch.stack(self._losses[-min(10, len(self._losses)):]).float()
        final = self.curve[-1]
        return {
            "steps": len(self._losses),
            "timed_steps": timed_steps,
            "throughput_samples_per_s": timed_steps * global_batch_size / timed_wall_s,
            "step_time_ms_median": statistics.median(durations_ms),
            "step_time_ms_p10": q[0],
            "step_time_ms_p90": q[8],
            "step_times_ms": [round(d, 4) for d in durations_ms],
            "data_stall_fraction": self._data_wait_s / self._timed_wall_s,
            "warmup_time_s": self.warmup_time_s,
            "accuracy_top1": final.get("accuracy_top1"),
            "accuracy_top5": final.get("accuracy_top5"),
            "final_train_loss": distributed.mean(tail.mean().item()),
            "curve": self.curve,
            "wall_time_s": time.perf_counter() - self._created,
        }

    # ---- internals ----
    def _open_window(self) -> None:
        if self._window_started is None:
            synchronize(self.device)
            distributed.barrier()
            self._window_started = time.perf_counter()

    def _close_window(self) -> None:
        if self._window_started is not None:
            synchronize(self.device)
            distributed.barrier()
            self.clock.collect()
            self._timed_wall_s += time.perf_counter() - self._window_started
            self._window_started = None

    def _check_finite(self) -> None:
        finite = torch.isfinite(torch.stack(self._losses))
        if not finite.all():
            raise Diverged(int((~finite).nonzero()[0]))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[2]  # the repository holding bench/
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: torch.device) -> dict[str, Any]:
    """Where a row was measured: versions, device, CPU, threads, harness commit."""
    cuda = device.type == "cuda"
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "harness_version": bench.__version__,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": __import__("torchvision").__version__,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else _cpu_model(),
        "driver": _nvidia_driver() if cuda else None,
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpus": distributed.allocated_cpus(),  # given to this run (a SLURM task's allocation, the affinity mask)
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "hostname": platform.node(),
    }


def _nvidia_driver() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    return None


# Dense peak TFLOP/s from vendor datasheets (no sparsity), by precision.
KNOWN_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200 SXM": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "H100 SXM": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},
    "L40S": {"fp32": 91.6, "tf32": 183.0, "bf16": 362.0, "fp16": 362.0},
    "L4": {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0},
    "A10": {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0},
    "V100 SXM2": {"fp32": 15.7, "tf32": 15.7, "bf16": 15.7, "fp16": 125.0},
    "RTX 4090": {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2},
}
# torch.cuda.get_device_name() -> table key. Whole-name matches only: a substring test would give
# an L40S the L4's figures, an A10G the A10's, an H100 PCIe the SXM part's.
DEVICE_NAMES: list[tuple[re.Pattern[str], str]] = [(re.compile(pattern), key) for pattern, key in [
    (r"NVIDIA H200", "H200 SXM"),
    (r"NVIDIA H100 80GB HBM3", "H100 SXM"),
    (r"NVIDIA H100 PCIe", "H100 PCIe"),
    (r"NVIDIA A100-SXM4-(40|80)GB|NVIDIA A100-PCIE-(40|80)GB|NVIDIA A100 80GB PCIe", "A100"),
    (r"NVIDIA L40S", "L40S"),
    (r"NVIDIA L4", "L4"),
    (r"NVIDIA A10", "A10"),
    (r"Tesla V100-SXM2-(16|32)GB", "V100 SXM2"),
    (r"NVIDIA GeForce RTX 4090", "RTX 4090"),
]]
MATMUL_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def datasheet_key(device_name: str) -> str | None:
    """The KNOWN_PEAK_TFLOPS entry of a CUDA device name, or None when the device is not in it."""
    name = device_name.strip()
    return next((key for pattern, key in DEVICE_NAMES if pattern.fullmatch(name)), None)


def peak_tflops(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak TFLOP/s, where it comes from): the datasheet table, else a measured matmul peak."""
    unknown = ""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = datasheet_key(name)
        if key is not None:
            return KNOWN_PEAK_TFLOPS[key][precision], f"datasheet {key} {precision}"
        unknown = f" (device {name!r} not in the datasheet table)"
    # Small on CPU: without native bf16/fp16 units a 1024^2 half-precision matmul takes seconds.
    size = 1024 if device.type == "cuda" else 256
    # The faster of the run's dtype and fp32: a device that emulates bf16/fp16 matmuls would
    # otherwise get a "peak" below what its convolutions reach (MFU above 1).
    measured = {p: measured_matmul_tflops(device, MATMUL_DTYPES[p], size) for p in {precision, "fp32"}}
    best = max(measured, key=measured.get)
    return measured[best], f"measured {size}^2 matmul {best}{unknown}"


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype, size: int, seconds: float = 0.2) -> float:
    """Best-of-n throughput of a square matmul: an achievable peak for devices not in the table."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    a @ b  # first call: kernel selection, page faults
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == float("inf"):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e12
