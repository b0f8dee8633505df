"""Measurement: step clocks, tracked tensor memory, FLOPs, and the environment fingerprint.

Memory and FLOPs are measured in one untimed step of their own (dispatch-level tracking slows
a step several-fold), so the timed steps run the plain code path.
"""
from __future__ import annotations

import contextlib
import os
import platform
import resource
import subprocess
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary

import bench


class LiveTensorBytes(TorchDispatchMode):
    """Counts bytes of tensor storages created inside the block that are still alive.

    Every op output's storage is counted once when first seen and released when the storage is
    freed (weakref finalizer), so ``peak`` is the high-water mark of memory the step itself
    allocated, on any device, independent of allocator caching. Storages that existed before
    the block (parameters, optimizer state) are not counted here; the caller adds them.
    """

    def __init__(self, on_new_peak: Callable[[], None] = lambda: None) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._on_new_peak = on_new_peak

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                self._track(leaf.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        if storage in self._seen:
            return
        nbytes = storage.nbytes()
        self._seen[storage] = nbytes
        weakref.finalize(storage, self._release, nbytes)
        self.live += nbytes
        if self.live > self.peak:
            self.peak = self.live
            self._on_new_peak()

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes


def tensor_bytes(tensors: Iterator[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))


@dataclass
class MemoryReport:
    peak_memory_bytes: int
    breakdown: dict[str, int]
    flops_per_step: int


@contextlib.contextmanager
def measure_step_memory(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[MemoryReport]:
    """Track one training step run inside the block; fills the yielded report on exit.

    breakdown (bytes, summing to the peak): parameters, buffers, optimizer_state; gradients
    alive at the peak; activations = the largest amount held for backward at the end of a
    forward pass; other = the rest of the peak (temporaries of the op running at the peak).
    """
    params = [p for p in model.parameters()]
    optimizer.zero_grad(set_to_none=True)  # gradients are then all allocated inside the block
    report = MemoryReport(0, {}, 0)
    at_peak = {"gradients": 0}
    activations = {"start": 0, "max": 0}

    def on_new_peak() -> None:
        at_peak["gradients"] = tensor_bytes(p.grad for p in params if p.grad is not None)

    tracker = LiveTensorBytes(on_new_peak)

    def forward_start(module: nn.Module, args: Any) -> None:
        activations["start"] = tracker.live

    def forward_end(module: nn.Module, args: Any, output: Any) -> None:
        activations["max"] = max(activations["max"], tracker.live - activations["start"])

    hooks = [model.register_forward_pre_hook(forward_start), model.register_forward_hook(forward_end)]
    flops = FlopCounterMode(display=False)
    try:
        with flops, tracker:
            yield report
    finally:
        for h in hooks:
            h.remove()
    fixed = {
        "parameters": tensor_bytes(iter(params)),
        "buffers": tensor_bytes(model.buffers()),
        "optimizer_state": optimizer_state_bytes(optimizer),
    }
    report.peak_memory_bytes = sum(fixed.values()) + tracker.peak
    other = tracker.peak - at_peak["gradients"] - activations["max"]
    report.breakdown = {**fixed, "gradients": at_peak["gradients"], "activations": activations["max"],
                        "other": max(other, 0)}
    report.flops_per_step = flops.get_total_flops()


class StepClock:
    """Per-step durations: CUDA events on GPU (no per-step sync), perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._pending: list[tuple[Any, Any]] = []
        self.durations_s: list[float] = []

    def start(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, started: Any) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((started, end))
        else:
            self.durations_s.append(time.perf_counter() - started)

    def collect(self) -> None:
        """Synchronize and convert recorded CUDA events; call at window boundaries only."""
        if self.cuda:
            torch.cuda.synchronize()
            self.durations_s += [s.elapsed_time(e) / 1e3 for s, e in self._pending]
            self._pending.clear()


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
    root = Path(__file__).resolve().parent.parent
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
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "hostname": platform.node(),
    }


def _nvidia_driver() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    return None


# Dense peak TFLOP/s from vendor datasheets (SXM parts, no sparsity), by precision. Names are
# matched as substrings of torch.cuda.get_device_name().
KNOWN_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},
    "L4": {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0},
    "A10": {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0},
    "V100": {"fp32": 15.7, "tf32": 15.7, "bf16": 15.7, "fp16": 125.0},
    "RTX 4090": {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2},
}
MATMUL_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def peak_tflops(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak TFLOP/s, where it comes from): the datasheet table, else a measured matmul peak."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in KNOWN_PEAK_TFLOPS.items():
            if key in name:
                return peaks[precision], f"datasheet {key} {precision}"
    # Small on CPU: without native bf16/fp16 units a 1024^2 half-precision matmul takes seconds.
    size = 1024 if device.type == "cuda" else 256
    # The faster of the run's dtype and fp32: a device that emulates bf16/fp16 matmuls would
    # otherwise get a "peak" below what its convolutions reach (MFU above 1).
    measured = {p: measured_matmul_tflops(device, MATMUL_DTYPES[p], size) for p in {precision, "fp32"}}
    best = max(measured, key=measured.get)
    return measured[best], f"measured {size}^2 matmul {best}"


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
