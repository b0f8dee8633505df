"""Where a cell's step spends its time: a ``torch.profiler`` trace of a few training steps.

The Chrome trace (open it in chrome://tracing or https://ui.perfetto.dev) holds CPU operators
and, with CUDA, the kernels they launched. The table ranks operators by *self* time (time in the
operator itself, not in the operators it calls) on the device that does the work: self CPU time
on CPU, self CUDA time on CUDA, where CPU time is mostly launch overhead.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile


def activities(device: torch.device) -> list[ProfilerActivity]:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def profile_steps(step: Callable[[], Any], steps: int, device: torch.device) -> profile:
    """Run ``step`` ``steps`` times under the profiler (the caller warms up first)."""
    with profile(activities=activities(device)) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the kernels of the last step end inside the trace
    return prof


def _device_self_us(event: Any) -> float:
    # torch >= 2.4 names it self_device_time_total; self_cuda_time_total is its older alias
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def top_operators(prof: profile, device: torch.device, limit: int = 20) -> list[dict[str, Any]]:
    """The ``limit`` operators with the most self time on ``device``'s own clock."""
    on_cuda = device.type == "cuda"
    rows = [{"operator": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
             "cpu_total_ms": e.cpu_time_total / 1e3, "self_cuda_ms": _device_self_us(e) / 1e3}
            for e in prof.key_averages()]
    key = "self_cuda_ms" if on_cuda else "self_cpu_ms"
    rows.sort(key=lambda r: r[key], reverse=True)
    return rows[:limit]


def operator_table(rows: list[dict[str, Any]], device: torch.device, steps: int) -> str:
    on_cuda = device.type == "cuda"
    total_key = "self_cuda_ms" if on_cuda else "self_cpu_ms"
    header = "| operator | calls | self CPU (ms) | CPU total (ms) |" + (" self CUDA (ms) |" if on_cuda else "")
    lines = [f"Top operators of {steps} training steps by self {'CUDA' if on_cuda else 'CPU'} time "
             f"(`torch.profiler`; trace beside this file).", "", header,
             "| :--- | ---: | ---: | ---: |" + (" ---: |" if on_cuda else "")]
    for r in rows:
        line = f"| `{r['operator']}` | {r['calls']} | {r['self_cpu_ms']:.2f} | {r['cpu_total_ms']:.2f} |"
        lines.append(line + (f" {r['self_cuda_ms']:.2f} |" if on_cuda else ""))
    if not rows or rows[0][total_key] == 0:
        lines.append("")
        lines.append("(no operator recorded time on this device)")
    return "\n".join(lines) + "\n"


def write_profile(prof: profile, steps: int, device: torch.device, trace_path: Path, table_path: Path) -> list[Path]:
    """The Chrome trace of ``prof`` and the markdown table of its top operators."""
    prof.export_chrome_trace(str(trace_path))
    table_path.write_text(operator_table(top_operators(prof, device), device, steps))
    return [trace_path, table_path]
