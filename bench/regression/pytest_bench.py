"""pytest-benchmark results (``pytest --benchmark-json FILE``) as cells for ``trickbench compare``.

One cell per benchmark ``fullname``, one metric: ``benchmark_median_s``, judged by the timing tier.

Unit of replication: ONE JSON FILE IS ONE RUN. The rounds of a benchmark all run in one pytest
process, back to back, sharing its memory layout, caches, JIT/allocator state and whatever else
the machine did at that moment: they are one sample of "how fast is this on this machine now",
not many. So a file contributes one value per benchmark (its median over rounds), and a side
needs ``min_runs`` files (default 3) for a timing verdict; with fewer the verdict is ``~``. Give
a side as a folder of JSON files, e.g. pytest-benchmark's own ``--benchmark-autosave`` folder
(``.benchmarks/<machine>/``) or ``--benchmark-json runs/$i.json`` in a loop.

``machine_info`` is the environment: another CPU brand/architecture/core count, Python, or OS makes
the cells ``NOT COMPARABLE`` (pytest-benchmark's own ``--benchmark-compare`` only warns). The
hostname (``node``) is ignored, as for trickbench rows: CI runners are ephemeral.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from bench.regression.cells import ENV_KEYS, MIXED, BadInput, CellRecord, common_value
from bench.store.files import read_json

KIND = "pytest-benchmark"  # the schema_version of its cells: never comparable with trickbench rows
METRIC = "benchmark_median_s"


def is_pytest_benchmark(data: Any) -> bool:
    return isinstance(data, dict) and "benchmarks" in data and "machine_info" in data


def machine_env(machine: Any, source: str) -> dict[str, Any]:
    """The fingerprint of a run, in the keys the timing tier checks (bench.regression.compare.FINGERPRINT)."""
    if not isinstance(machine, dict):
        raise BadInput(f"{source}: machine_info: not a mapping (not a pytest-benchmark JSON?)")
    cpu = machine.get("cpu") if isinstance(machine.get("cpu"), dict) else {}
    brand = cpu.get("brand_raw") or machine.get("processor") or None
    return {"schema_version": KIND, "device": "cpu", "device_name": brand, "cpu_model": brand,
            "cpu_cores": cpu.get("count"), "cpu_capability": cpu.get("arch") or machine.get("machine"),
            "runtime": f"{machine.get('python_implementation')} {machine.get('python_version')}",
            "platform": f"{machine.get('system')} {machine.get('release')}"}


def run_medians(data: dict[str, Any], source: str) -> dict[str, tuple[str, float]]:
    """fullname → (name, median seconds over the rounds) of each benchmark in one JSON file."""
    benchmarks = data.get("benchmarks")
    if not isinstance(benchmarks, list) or not benchmarks:
        raise BadInput(f"{source}: benchmarks: empty or not a list (were the benchmarks skipped?)")
    medians = {}
    for index, bench in enumerate(benchmarks):
        where = f"{source}: benchmarks[{index}]"
        if not isinstance(bench, dict) or not isinstance(bench.get("stats"), dict):
            raise BadInput(f"{where}: stats: missing (expected pytest-benchmark's --benchmark-json format)")
        name = bench.get("fullname") or bench.get("name")
        stats = bench["stats"]
        median = stats.get("median")
        data = stats.get("data")
        if median is None and isinstance(data, list) and data and all(_positive(v) for v in data):
            median = statistics.median(data)
        if not isinstance(name, str) or not _positive(median):
            raise BadInput(f"{where}: needs 'fullname' and a positive stats.median (got {name!r}, {median!r})")
        medians[name] = (str(bench.get("name") or name), float(median))
    return medians


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def cells_from_runs(runs: list[tuple[str, dict[str, Any]]]) -> dict[str, CellRecord]:
    """Cells from (run name, parsed JSON) pairs: each run adds one value per benchmark."""
    cells: dict[str, CellRecord] = {}
    envs: dict[str, list[dict[str, Any]]] = {}
    for run, data in runs:
        env = machine_env(data.get("machine_info"), run)
        for fullname, (name, median) in run_medians(data, run).items():
            cell = cells.setdefault(fullname, CellRecord(fullname, name, {}, {}))
            cell.values.setdefault(METRIC, {})[run] = median
            envs.setdefault(fullname, []).append(env)
    for fullname, cell_envs in envs.items():
        cells[fullname].env = {k: common_value(e.get(k) for e in cell_envs) for k in ENV_KEYS}
    return cells


def load_folder(folder: Path) -> dict[str, CellRecord] | None:
    """The runs of a folder of pytest-benchmark JSON files (searched recursively, as
    ``.benchmarks/`` nests them by machine); None when it holds none."""
    files = sorted(folder.rglob("*.json"))
    runs = [(str(p), data) for p in files if is_pytest_benchmark(data := read_json(p, "pytest-benchmark JSON file"))]
    return cells_from_runs(runs) if runs else None


def is_kind(cells: dict[str, CellRecord]) -> bool:
    """Whether these cells came from pytest-benchmark (else: trickbench rows or a baseline)."""
    return any(c.env.get("schema_version") in (KIND, MIXED) and METRIC in c.values for c in cells.values())


def runs_per_side(cells: dict[str, CellRecord]) -> int:
    return min((len(c.values.get(METRIC, {})) for c in cells.values()), default=0)
