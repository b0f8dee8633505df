"""What a report says in words: the verdict marks, each cell's speed and accuracy call, the
'Beyond seed noise?' section and the headline findings. Pure functions of the cells' statistics."""
from __future__ import annotations

import math
from typing import Optional

from bench.reports.stats import (
    Row,
    excludes,
    too_few_note,
)
from bench.reports.tables import fmt, fmt_ratio, fmt_speedup, timing_shared


def speed_call(s: Row) -> str:
    """The cell's speed call in words: faster/slower beyond noise, within noise, or no call."""
    call = s["step_verdict"]
    if timing_shared(s):
        return "speed not compared (shared timing)"
    if call.too_few:
        return f"speed: {too_few_note(call.n_base, call.n_cell)}"
    step = (f"step {'slower' if call.ratio > 1 else 'faster'} ({fmt_ratio(call.ratio)})" if call.significant
            else "step time within noise")
    # Throughput also counts the wait for data, which the step time leaves out: input-pipeline
    # tricks show there. Its interval is reported, not a second call.
    speedup = s["speedup"]
    if math.isfinite(speedup.low) and not excludes(speedup.low, speedup.high, 1.0):
        return f"{step}; throughput within noise ({fmt_ratio(speedup.ratio)})"
    return f"{step}; throughput {fmt_speedup(speedup)}" if math.isfinite(speedup.ratio) else step


def accuracy_call(s: Row) -> Optional[str]:
    """Δ top-1 in words, or None when the runs have no accuracy."""
    change, low, high = s["accuracy_change"]
    if not math.isfinite(change):
        return None
    if excludes(low, high, 0.0):
        return f"top-1 {'better' if change > 0 else 'worse'} by {abs(change):.1f} pts [{low:+.1f}, {high:+.1f}]"
    return f"top-1 within seed noise ({change:+.1f} pts, interval [{low:+.1f}, {high:+.1f}])"


def noise_section(stats: list[Row]) -> list[str]:
    """Per cell, in one line: which of its effects are beyond run-to-run (seed) noise and which are not.
    Memory is deterministic for a fixed config, so its ratio is stated without a test (≥ 1% counts)."""
    lines = []
    for s in stats:
        if s["is_base"] or not s["n_ok"]:
            continue
        memory = s["memory_ratio"]
        parts = [speed_call(s),
                 f"peak memory {fmt_ratio(memory)}" if math.isfinite(memory) and abs(memory - 1) >= 0.01
                 else "peak memory unchanged", accuracy_call(s)]
        lines.append(f"- {s['label']}: " + "; ".join(p for p in parts if p))
    if not lines:
        return []
    return ["## Beyond seed noise?", "",
            "Each cell against the baseline, with the tests of the tables above: step time, the `*` call; "
            "throughput (which also counts the wait for data), whether its 95% interval excludes 1; top-1, "
            "whether its 95% interval excludes 0.", "", *lines, ""]


def _finite_or(x: float, default: float) -> float:
    return x if math.isfinite(x) else default


def headline_findings(stats: list[Row]) -> list[str]:
    """Two to four one-line findings: the fastest, slowest, lowest-memory and most accurate cell."""
    ok = [s for s in stats if s["n_ok"]]
    if not ok:
        return ["no successful runs"]

    def versus(s: Row) -> str:
        call = s["step_verdict"]
        pace = (" (shared timing: not compared)" if timing_shared(s) else
                f" ({too_few_note(call.n_base, call.n_cell)})" if call.too_few else " (within noise)"
                if not call.significant else " (slower)" if call.ratio > 1 else " (faster)")
        return f"{fmt(s['speedup'].ratio, 2)}× throughput{pace}, {fmt(s['memory_ratio'], 2)}× peak memory vs baseline"

    fastest = max(ok, key=lambda s: _finite_or(s["throughput"]["mean"], -math.inf))
    slowest = min(ok, key=lambda s: _finite_or(s["throughput"]["mean"], math.inf))
    smallest = min(ok, key=lambda s: _finite_or(s["peak_mib"], math.inf))
    found = [f"fastest: {fastest['label']}, {fmt(fastest['throughput']['mean'])} samples/s",
             f"slowest: {slowest['label']}, {fmt(slowest['throughput']['mean'])} samples/s",
             f"lowest peak memory: {smallest['label']}, {fmt(smallest['peak_mib'])} MiB"]
    found = [line + ("" if s["is_base"] else f" ({versus(s)})") for line, s in zip(found, (fastest, slowest, smallest))]
    with_accuracy = [s for s in ok if math.isfinite(s["accuracy"]["mean"])]
    if with_accuracy:
        best = max(with_accuracy, key=lambda s: s["accuracy"]["mean"])
        change, low, high = best["accuracy_change"]
        noise = "" if excludes(low, high, 0.0) else " (within noise)"
        change = "" if best["is_base"] else f", {change:+.1f} pts vs baseline{noise}"
        found.append(f"best top-1: {best['label']}, {best['accuracy']['mean']:.1f}%{change}")
    return list(dict.fromkeys(found))
