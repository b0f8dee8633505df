"""The matrix's ``slurm:`` section (and ``--slurm KEY=VALUE``): how a matrix runs on a cluster.

Validated with the rest of the matrix file; kept out of every cell's config, so it never
changes a cell_id. bench.execution.cluster turns it into submitit's parameters.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from bench.base.errors import ConfigError
from bench.base.safeyaml import shorten
from bench.config.train_config import check_keys, check_value


@dataclass(frozen=True)
class ClusterSettings:
    """The matrix's ``slurm:`` section (and ``--slurm KEY=VALUE``). Field names are the YAML keys."""

    partition: Optional[str] = None
    gpus_per_node: int = 8  # GPUs of one node: a world_size-W run asks for W of them, so W <= this
    cpus_per_task: Optional[int] = None  # default: what a run needs, W x (threads_per_rank + num_workers)
    threads_per_rank: int = 1  # intra-op threads of each rank: the default cpus_per_task counts them
    exclusive: bool = False  # whole nodes: timing no other job disturbs (else rows say shared_timing)
    mem_gb: Optional[float] = None
    time_limit_min: Optional[int] = None  # per task; default: the longest time_limit_s + START_UP_MIN
    array_parallelism: Optional[int] = None  # tasks running at once; default: SLURM 256, local 1
    max_requeues: int = 3  # preemptions/timeouts a task is requeued for (submitit's max_num_timeout)
    sbatch: dict[str, Any] = field(default_factory=dict)  # extra sbatch options: {account: x, qos: y}
    setup: tuple[str, ...] = ()  # shell lines before the task (module load, source venv/bin/activate)

    @property
    def whole_nodes(self) -> bool:
        """Tasks get whole nodes (``exclusive``, or ``sbatch: {exclusive: ...}``): no shared timing."""
        return self.exclusive or self.sbatch.get("exclusive", False) not in (False, None)

# sbatch options trickbench/submitit set themselves. sbatch takes any unambiguous abbreviation of a
# long option (--arr is --array), so an abbreviation of one of these is refused as well.
RESERVED_SBATCH = ("array", "output", "error", "signal", "open-mode")
CONTROL = {chr(c) for c in range(32)} | {"\x7f"}


def control_problem(value: object) -> str | None:
    """Why a string cannot go into a job script line: a newline (or another control character)
    would end its ``#SBATCH`` line and start one of the caller's choosing."""
    if isinstance(value, str) and CONTROL & set(value):
        return (f"{shorten(value)} holds a newline or another control character; it would end the #SBATCH line "
                "and start another")
    return None


def reserved_sbatch(key: str) -> str | None:
    """The reserved option ``key`` names or abbreviates, if any."""
    option = key.replace("_", "-")
    return next((name for name in RESERVED_SBATCH if name.startswith(option)), None)


SETTING_RANGES = {"gpus_per_node": (1, 1024), "cpus_per_task": (1, 4096), "threads_per_rank": (1, 4096),
                  "mem_gb": (0.001, 1e6),
                  "time_limit_min": (1, 366 * 24 * 60), "array_parallelism": (1, 100_000),
                  "max_requeues": (0, 1000)}


SETTING_TYPES = {"partition": Optional[str], "gpus_per_node": int, "cpus_per_task": Optional[int],
                 "threads_per_rank": int, "exclusive": bool,
                 "mem_gb": Optional[float], "time_limit_min": Optional[int],
                 "array_parallelism": Optional[int], "max_requeues": int}


def parse_settings(data: Any, file: str, where: str = "slurm") -> ClusterSettings:
    """Validate a ``slurm:`` mapping; ConfigError naming file, key and what is allowed."""
    allowed = [f.name for f in dataclasses.fields(ClusterSettings)]
    check_keys(data if data is not None else {}, allowed, file, where)
    values: dict[str, Any] = {}
    for key, value in (data or {}).items():
        path = f"{where}.{key}"
        if key == "sbatch":
            values[key] = _parse_sbatch(value, file, path)
        elif key == "setup":
            if not isinstance(value, list) or not all(isinstance(line, str) for line in value):
                raise ConfigError(file, path, f"expected a list of shell lines, got {shorten(value)}")
            if problem := next(filter(None, map(control_problem, value)), None):
                raise ConfigError(file, path, f"each item is one shell line: {problem}")
            values[key] = tuple(value)
        else:
            values[key] = check_value(SETTING_TYPES[key], value, file, path)
            if problem := control_problem(values[key]):
                raise ConfigError(file, path, problem)
            low, high = SETTING_RANGES.get(key, (None, None))
            if values[key] is not None and low is not None and not low <= values[key] <= high:
                raise ConfigError(file, path, f"{shorten(value)} is out of range [{low:g}, {high:g}]")
    return ClusterSettings(**values)


def _parse_sbatch(value: Any, file: str, where: str) -> dict[str, Any]:
    """sbatch long options without the dashes; a value is a string, a number or true (a bare flag)."""
    if not isinstance(value, dict):
        raise ConfigError(file, where, f"expected a mapping of sbatch option → value, got {shorten(value)}")
    for key, option in value.items():
        if not isinstance(key, str) or not key.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(file, f"{where}.{key}", "not an sbatch option name (letters, digits, - and _)")
        if reserved := reserved_sbatch(key):
            named = "" if reserved == key.replace("_", "-") else f" (sbatch reads it as --{reserved})"
            raise ConfigError(file, f"{where}.{key}", f"set by trickbench/submitit{named}; remove it")
        if not isinstance(option, (str, int, float)) or option is False:
            raise ConfigError(file, f"{where}.{key}", f"{shorten(option)} is not a string, a number or true")
        if isinstance(option, float) and not math.isfinite(option):
            raise ConfigError(file, f"{where}.{key}", f"{option} is not a finite number")
        if problem := control_problem(option):
            raise ConfigError(file, f"{where}.{key}", problem)
    return dict(value)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``--slurm KEY=VALUE`` pairs as a mapping; values read as YAML scalars (``2`` is a number)."""
    merged: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError("--slurm", shorten(pair), "expected KEY=VALUE, e.g. --slurm partition=gpu")
        if problem := control_problem(pair):  # YAML would fold a newline into a space: refuse it first
            raise ConfigError("--slurm", shorten(key), problem)
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            value = text
        target = merged
        *parents, leaf = key.split(".")  # sbatch.account=x
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return merged
