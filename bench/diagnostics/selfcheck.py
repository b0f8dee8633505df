"""``trickbench selfcheck --device cuda|cpu``: every device path of the harness, in minutes, offline.

Each check runs a few steps of real training (synthetic data, nothing downloaded) or one
primitive the harness relies on, and says pass, fail or ``skipped: <why>``. On a GPU: CUDA-event
step times against the wall clock, ``max_memory_allocated`` reset before the memory step, fp16
with GradScaler, bf16, TF32 on and off, channels_last and compile when those tricks are
registered, single-rank nccl DDP, two runs at once on two GPUs, and two physics checks at GPU
magnitudes (ResNet-50: bf16 at least 2x the fp32 throughput, bf16 holding about half the
activation bytes). On a CPU the same checks run reduced (tiny model; gloo for DDP) and the
CUDA-only ones are skipped. Results and a report naming the machine go to ``--out``
(default ``results/gpu-<device name>/``); exit 1 when a check fails.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from bench.base.errors import ConfigError
from bench.config.train_config import build_train_config
from bench.execution.children import WORKER, run_job_file, write_job
from bench.parts.clock import StepClock
from bench.parts.distributed import wrap
from bench.store.paths import check_out_dir
from bench.store.results import write_atomic
from bench.training.measure import environment, synchronize
from bench.training.train import train
from bench.tricks import TRICKS
from bench.tricks.precision import set_tf32

# Thresholds. Physics: bf16 tensor cores run at >= 2x fp32 (TF32 off) on every GPU since Ampere;
# activations stored in 2 bytes instead of 4, less what stays fp32 (BN statistics, the loss).
MIN_BF16_SPEEDUP = 2.0
ACTIVATION_RATIO = (0.4, 0.65)
CLOCK_AGREEMENT = (0.9, 1.02)  # events inside the wall window: a little less (launch gaps), never more
TF32_ERROR = (1e-5, 1e-4)
COMPILE_MODE = "default"  # the compile trick's value for plain torch.compile (bench.tricks.torch_compile.MODES)  # fp32-exact matmul below the first; TF32 (10-bit mantissa) above the second


@dataclass
class Check:
    name: str
    status: str  # pass | fail | skipped
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)


def passed(name: str, detail: str, **figures: Any) -> Check:
    return Check(name, "pass", detail, figures)


def failed(name: str, detail: str, **figures: Any) -> Check:
    return Check(name, "fail", detail, figures)


def skipped(name: str, why: str) -> Check:
    return Check(name, "skipped", f"skipped: {why}")


def within(value: float, bounds: tuple[float, float]) -> bool:
    return bounds[0] <= value <= bounds[1]


@dataclass
class Context:
    device: torch.device
    out_dir: Path
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> metrics, shared by checks

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


# --- training a few steps in this process --------------------------------------------------------------

def small_config(ctx: Context, **overrides: Any):
    """A short synthetic run: ResNet-18 at 32 px on a GPU, the tiny CNN at 16 px on a CPU (at 8 px and
    batch 16 the fp32-to-bf16 weight copies autocast makes outweigh the activations)."""

    base = ({"model": "resnet18_cifar", "image_size": 32, "batch_size": 128, "num_samples": 1024} if ctx.cuda else
            {"model": "tiny_cnn", "image_size": 16, "batch_size": 64, "num_samples": 256})
    base.update(dataset="synthetic", steps=8, warmup_steps=2, device=ctx.device.type, **overrides)
    return build_train_config(base, "<selfcheck>")


def train_small(ctx: Context, label: str, **overrides: Any) -> dict[str, Any]:
    metrics = train(small_config(ctx, **overrides), seed=0, device=ctx.device)
    ctx.rows[label] = metrics
    return metrics


# --- the checks ------------------------------------------------------------------------------------------

def check_clock(ctx: Context) -> Check:
    """The step clock (CUDA events on GPU) against perf_counter around the same synchronized window."""

    size = 4096 if ctx.cuda else 256
    a = torch.randn(size, size, device=ctx.device)
    clock = StepClock(ctx.device)
    a @ a  # warm-up: cuBLAS handle and kernels
    synchronize(ctx.device)
    began = time.perf_counter()
    for _ in range(20):
        started = clock.start()
        a @ a
        clock.stop(started)
    clock.collect()  # synchronizes
    wall = time.perf_counter() - began
    ratio = sum(clock.durations_s) / wall
    figures = {"events_s": sum(clock.durations_s), "wall_s": wall, "ratio": ratio}
    verdict = passed if within(ratio, CLOCK_AGREEMENT) else failed
    return verdict("clock", f"step clock / wall clock = {ratio:.3f} (expected {CLOCK_AGREEMENT})", **figures)


def check_memory_reset(ctx: Context) -> Check:
    """A large block freed before the run must not show in the run's max_memory_allocated, which
    is the row's peak (the ledger's own peak is at most that)."""
    if not ctx.cuda:
        return skipped("memory_reset", "no CUDA")
    block = torch.empty(1 << 30, dtype=torch.uint8, device=ctx.device)  # 1 GiB, far above the run's peak
    del block
    metrics = train_small(ctx, "fp32", precision="fp32")
    allocated = metrics["cuda_max_allocated_bytes"]
    tracked = metrics["peak_memory_bytes"] - metrics["memory_breakdown"]["untracked"]  # the ledger's own peak
    source = metrics["peak_memory_source"]
    ok = allocated < (1 << 30) and allocated >= tracked and source == "cuda_max_memory_allocated"
    return (passed if ok else failed)("memory_reset", f"max_memory_allocated {allocated / 2**20:.1f} MiB "
                                      f"(a freed 1 GiB block before the run; ledger {tracked / 2**20:.1f} MiB; "
                                      f"row's peak from {source})",
                                      cuda_max_allocated_bytes=allocated, ledger_peak_bytes=tracked,
                                      peak_memory_source=source)


def check_precision(ctx: Context, precision: str) -> Check:
    """Training steps in this precision end with a finite loss (fp16: through GradScaler)."""

    if precision == "tf32" and not ctx.cuda:
        return skipped(f"precision_{precision}", "no CUDA (TF32 is a CUDA tensor-core mode)")
    try:
        metrics = ctx.rows.get(precision) or train_small(ctx, precision, precision=precision)
    except ConfigError as err:  # the check's own config refused: the path was not exercised, a failure
        return failed(f"precision_{precision}", f"could not run: {err}")
    loss = metrics["final_train_loss"]
    ok = loss is not None and loss == loss and abs(loss) != float("inf")
    return (passed if ok else failed)(f"precision_{precision}", f"final train loss {loss}",
                                      final_train_loss=loss, throughput=metrics["throughput_samples_per_s"])


def matmul_error(device: torch.device, tf32: bool) -> float:
    """Relative error of an fp32 matmul against float64, with TF32 allowed or not."""

    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(1024, 1024, generator=g, dtype=torch.float64) for _ in range(2))
    set_tf32(tf32)
    try:
        product = (a.float().to(device) @ b.float().to(device)).double().cpu()
    finally:
        set_tf32(False)
    return ((product - a @ b).norm() / (a @ b).norm()).item()


def check_tf32(ctx: Context) -> Check:
    if not ctx.cuda:
        return skipped("tf32_switch", "no CUDA")
    if torch.cuda.get_device_capability(ctx.device)[0] < 8:
        return skipped("tf32_switch", "this GPU has no TF32 (compute capability < 8.0)")
    off, on = matmul_error(ctx.device, False), matmul_error(ctx.device, True)
    ok = off < TF32_ERROR[0] and on > TF32_ERROR[1]
    return (passed if ok else failed)("tf32_switch", f"matmul error vs float64: TF32 off {off:.1e}, on {on:.1e}",
                                      error_off=off, error_on=on)


def check_trick(ctx: Context, name: str, value: Any) -> Check:
    """A few steps with trick ``name`` on. A check that cannot run (the trick is not registered, or
    its config is refused) fails: a readiness report must never pass a path it did not exercise."""
    if name not in TRICKS:
        return failed(name, f"could not run: no {name} trick registered in this version")
    try:
        metrics = train_small(ctx, name, **{name: value})
    except ConfigError as err:
        return failed(name, f"could not run: {err}")
    detail = f"trained; {metrics['throughput_samples_per_s']:.0f} samples/s"
    if name == "compile":  # compiled for real: Dynamo made a graph, and the timed steps ran it
        graphs = metrics.get("compile_graphs")
        if not graphs:
            return failed(name, f"compiled no graph (compile_graphs {graphs!r}); the run timed the eager model")
        detail += f", {graphs} graph(s), compiled in {metrics.get('compile_time_s', 0):.1f} s"
    return passed(name, detail, throughput=metrics["throughput_samples_per_s"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_ddp_single_rank(ctx: Context) -> Check:
    """One rank of DistributedDataParallel (nccl on GPU, gloo on CPU): a step and an all-reduce."""


    backend = "nccl" if ctx.cuda else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        model = wrap(torch.nn.Linear(16, 4).to(ctx.device))
        loss = model(torch.randn(8, 16, device=ctx.device)).square().mean()
        loss.backward()
        total = torch.ones(3, device=ctx.device)
        dist.all_reduce(total)
        ok = total.sum().item() == 3 and all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()
    return (passed if ok else failed)(f"ddp_{backend}", f"one-rank {backend} DDP step and all-reduce")


def check_two_devices(ctx: Context) -> Check:
    """Two runs at once, each its own worker process on its own GPU (as the runner starts them)."""
    if not ctx.cuda:
        return skipped("two_devices", "no CUDA")
    if torch.cuda.device_count() < 2:
        return skipped("two_devices", f"{torch.cuda.device_count()} CUDA device visible (needs 2)")
    statuses = concurrent_runs(ctx, [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}])
    return (passed if statuses == ["ok", "ok"] else failed)("two_devices", f"statuses {statuses}")


def concurrent_runs(ctx: Context, envs: list[dict[str, str]]) -> list[str]:
    """Start one worker process per environment at the same time; their rows' statuses."""


    work = ctx.out_dir / ".work"
    work.mkdir(parents=True, exist_ok=True)
    config = small_config(ctx).to_dict()
    statuses: dict[int, str] = {}

    def run(index: int) -> None:
        job = write_job(work, "selfcheck", "concurrent", index, {}, config)
        row = run_job_file(job, [*WORKER, str(job)], {**os.environ, **envs[index]}, config["time_limit_s"])
        statuses[index] = row["status"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(envs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [statuses.get(i, "no row") for i in range(len(envs))]


def resnet50_config(ctx: Context, precision: str):
    return build_train_config({"model": "resnet50", "dataset": "synthetic", "image_size": 224, "num_classes": 1000,
                               "num_samples": 512, "batch_size": 64, "steps": 30, "warmup_steps": 5,
                               "device": "cuda", "precision": precision}, "<selfcheck>")


def check_physics(ctx: Context) -> list[Check]:
    """bf16 against fp32: throughput (GPU, ResNet-50) and activation bytes (any device)."""

    if ctx.cuda:
        fp32, bf16 = (train(resnet50_config(ctx, p), seed=0, device=ctx.device) for p in ("fp32", "bf16"))
    else:
        fp32 = ctx.rows.get("fp32") or train_small(ctx, "fp32", precision="fp32")
        bf16 = ctx.rows.get("bf16") or train_small(ctx, "bf16", precision="bf16")
    return [speedup_verdict(fp32, bf16, ctx.cuda), activation_verdict(fp32, bf16)]


def speedup_verdict(fp32: dict[str, Any], bf16: dict[str, Any], cuda: bool) -> Check:
    ratio = bf16["throughput_samples_per_s"] / fp32["throughput_samples_per_s"]
    if not cuda:
        return skipped("physics_bf16_speedup", f"no CUDA (bf16/fp32 throughput here {ratio:.2f}x; "
                       "the 2x needs tensor cores)")
    verdict = passed if ratio >= MIN_BF16_SPEEDUP else failed
    return verdict("physics_bf16_speedup", f"ResNet-50 bf16 / fp32 throughput = {ratio:.2f}x "
                   f"(expected >= {MIN_BF16_SPEEDUP})", ratio=ratio,
                   fp32_samples_per_s=fp32["throughput_samples_per_s"],
                   bf16_samples_per_s=bf16["throughput_samples_per_s"])


def activation_verdict(fp32: dict[str, Any], bf16: dict[str, Any]) -> Check:
    a32, a16 = fp32["memory_breakdown"]["activations"], bf16["memory_breakdown"]["activations"]
    ratio = a16 / a32
    verdict = passed if within(ratio, ACTIVATION_RATIO) else failed
    return verdict("physics_activation_bytes", f"bf16 / fp32 activations at the peak = {ratio:.2f} "
                   f"(expected {ACTIVATION_RATIO})", ratio=ratio, fp32_bytes=a32, bf16_bytes=a16)


def all_checks(ctx: Context) -> list[tuple[str, Callable[[], Check | list[Check]]]]:
    """(name, check) in the order they run; physics last, since it reuses the precision runs on CPU."""
    return [("clock", lambda: check_clock(ctx)), ("memory_reset", lambda: check_memory_reset(ctx)),
            *[(f"precision_{p}", lambda p=p: check_precision(ctx, p)) for p in ("fp32", "tf32", "fp16", "bf16")],
            ("tf32_switch", lambda: check_tf32(ctx)),
            ("channels_last", lambda: check_trick(ctx, "channels_last", True)),
            ("compile", lambda: check_trick(ctx, "compile", COMPILE_MODE)),
            ("ddp", lambda: check_ddp_single_rank(ctx)), ("two_devices", lambda: check_two_devices(ctx)),
            ("physics", lambda: check_physics(ctx))]


def run_checks(ctx: Context) -> list[Check]:
    """Every check; one that raises is a failure with its last line, and the others still run."""
    results: list[Check] = []
    for name, check in all_checks(ctx):
        try:
            outcome = check()
        except Exception as error:  # noqa: BLE001 - a broken path is the finding
            outcome = failed(name, f"raised {traceback.format_exception_only(error)[-1].strip()}")
        for result in outcome if isinstance(outcome, list) else [outcome]:
            results.append(result)
            print(f"{result.status:>7}  {result.name:<26} {result.detail}", flush=True)
    return results


# --- output --------------------------------------------------------------------------------------------

def machine_slug(env: dict[str, Any]) -> str:
    """``nvidia-h100-80gb-hbm3`` from the device name: the folder that names the machine."""
    return re.sub(r"[^a-z0-9]+", "-", (env["device_name"] or "unknown").lower()).strip("-")[:60]


def write_report(out_dir: Path, env: dict[str, Any], results: list[Check], seconds: float) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"environment": env, "seconds": seconds, "checks": [asdict(r) for r in results]}
    write_atomic(out_dir / "selfcheck.json", json.dumps(record, indent=1, default=str))
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skipped")}
    lines = [f"# trickbench selfcheck: {env['device_name']}", "",
             f"Machine: {env['device_name']} ({env['device']}), driver {env['driver']}, CUDA {env['cuda']}, "
             f"cuDNN {env['cudnn']}; CPU {env['cpu_model']} ({env['cpu_cores']} cores); torch {env['torch']}; "
             f"host {env['hostname']}; commit {env['git_commit']}{' (dirty)' if env['git_dirty'] else ''}.", "",
             f"{counts['pass']} passed, {counts['fail']} failed, {counts['skipped']} skipped in {seconds:.0f} s "
             "(`trickbench selfcheck`, synthetic data).", "",
             "| check | status | detail |", "| :--- | :--- | :--- |"]
    lines += [f"| {r.name} | {r.status} | {r.detail} |" for r in results]
    write_atomic(out_dir / "report.md", "\n".join(lines) + "\n")


def cmd_selfcheck(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("arguments", "--device", "cuda is not available on this machine; allowed: cpu")
    device = torch.device(args.device)
    env = environment(device)
    out_dir = Path(args.out) if args.out else Path("results") / f"{'gpu' if device.type == 'cuda' else 'cpu'}-" \
                                                                 f"{machine_slug(env)}"
    check_out_dir(out_dir)  # before minutes of checks: a folder that cannot be written fails now
    print(f"selfcheck on {env['device_name']} -> {out_dir}")
    started = time.perf_counter()
    results = run_checks(Context(device, out_dir))
    with contextlib.suppress(FileNotFoundError):

        shutil.rmtree(out_dir / ".work")
    write_report(out_dir, env, results, time.perf_counter() - started)
    failures = [r for r in results if r.status == "fail"]
    print(f"{len(results) - len(failures)} of {len(results)} checks did not fail; report in {out_dir / 'report.md'}")
    return 1 if failures else 0


