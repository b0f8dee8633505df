"""What one side of a comparison knows about each cell, whatever file it came from (rows,
baseline JSON, pytest-benchmark JSON), and which environment keys must match for a tier."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable

from bench.store.results import MEMORY_PARTS

MIXED = "<mixed>"  # a fingerprint value that differs between the runs of one cell


# Where the environment must match for a tier's numbers to mean the same thing. Timing needs
# the same machine (not the same hostname: CI runners are ephemeral); exact counters need the
# same torch and the same measurement schema; accuracy is judged against the seeds' spread.
# runtime/platform (Python, OS) come from pytest-benchmark's machine_info; rows lack them.
FINGERPRINT: dict[str, tuple[str, ...]] = {
    "exact": ("schema_version", "torch", "device"),
    "timing": ("schema_version", "torch", "device", "device_name", "cpu_model", "cpu_capability",
               "cpu_cores", "torch_threads", "runtime", "platform"),
    "accuracy": ("device",),
    # Counts change with the code that runs (torch, CPython, the kernels for this CPU) and the counter.
    "instructions": ("torch", "python", "cpu_model", "cpu_capability", "valgrind"),
}


SAME_NUMERICS = ("device_name", "cpu_capability")  # exact tier: bit-exact loss needs these too


ENV_KEYS = tuple(dict.fromkeys(k for keys in FINGERPRINT.values() for k in keys + SAME_NUMERICS))


class BadInput(Exception):
    """An input that cannot be compared: reported on one line, exit code 2."""


@dataclass
class CellRecord:
    """What a side knows about one cell: per metric, a value per seed (str keys, as in JSON)."""

    cell_id: str
    label: str
    axes: dict[str, Any]
    env: dict[str, Any]
    values: dict[str, dict[str, float]] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)  # "status seed=N: error" of failed runs
    spreads: dict[str, float] = field(default_factory=dict)  # metric → measured relative spread
    under_load: int = 0  # ok runs whose timing ran under competing load (bench.reports.stats.ran_under_load)
    shared_timing: int = 0  # ok runs that ran beside other runs on the same CPU (run --shared-timing)


def common_value(values: Iterable[Any]) -> Any:
    distinct = list(dict.fromkeys(json.dumps(v) for v in values))
    return json.loads(distinct[0]) if len(distinct) == 1 else MIXED


BASELINE_FORMAT = "trickbench-baseline"
BASELINE_FORMAT_VERSION = 1  # the baseline file's schema; another version is refused, never half-read


@dataclass(frozen=True)
class Metric:
    """One judged quantity: ``name`` is its dotted path in a row; ``tolerance`` is relative
    (timing: the factor minus one); ``tolerance_across`` applies to exact metrics when the
    numerics differ (another CPU capability, or a GPU), e.g. a loss that is bit-exact only on
    the same instruction set."""

    name: str
    tier: str
    better: str  # "lower" or "higher"
    tolerance: float = 0.0
    tolerance_across: float | None = None


# The one list of judged metrics (memory_breakdown's parts come from the row schema).
METRICS: tuple[Metric, ...] = (
    Metric("flops_per_step", "exact", "lower"),
    Metric("peak_memory_bytes", "exact", "lower"),
    *(Metric(f"memory_breakdown.{part}", "exact", "lower") for part in MEMORY_PARTS),
    Metric("steps", "exact", "lower"),  # optimizer steps of the run
    Metric("final_train_loss", "exact", "lower", 0.0, tolerance_across=1e-3),
    Metric("step_time_ms_median", "timing", "lower", 0.10),
    Metric("throughput_samples_per_s", "timing", "higher", 0.10),
    Metric("benchmark_median_s", "timing", "lower", 0.10),  # pytest-benchmark JSON (bench.regression.pytest_bench)
    Metric("accuracy_top1", "accuracy", "higher"),
    Metric("instructions_per_step", "instructions", "lower"),  # margin: bench.regression.instructions.margin
)


TIERS = ("exact", "timing", "accuracy", "instructions")


def lookup(row: dict[str, Any], dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value
