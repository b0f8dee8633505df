"""Matrix YAML → validated, frozen config objects. All checking of user input happens here.

Every error is a :class:`ConfigError` naming the file, the key path and what is allowed; the
CLI prints it on one line and exits with code 2 before anything runs or is written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from bench.registry import did_you_mean
from bench.schedules import SCHEDULES

DESIGNS = ["one_at_a_time", "full_factorial"]
OPTIMIZERS = ["sgd", "adamw"]
DEVICES = ["auto", "cpu", "cuda"]
BATCH_SCALINGS = ["global", "per_rank"]
MATRIX_KEYS = ["name", "description", "base", "design", "seeds", "axes", "exclude", "profiles"]
PROFILE_KEYS = ["base", "design", "seeds", "axes", "exclude"]


class ConfigError(Exception):
    """Bad user input: ``file: key.path: message``."""

    def __init__(self, file: str | Path, key: str, message: str) -> None:
        self.file, self.key, self.message = str(file), key, message
        where = f"{self.file}: {key}: " if key else f"{self.file}: "
        super().__init__(where + message)


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False


@dataclass(frozen=True)
class LauncherConfig:
    """Where the ranks of a world_size > 1 cell run: one node (torchrun --standalone) or several.

    With nnodes > 1 every node runs the same `trickbench run`; torchrun's rendezvous at
    rdzv_endpoint joins them (rdzv_id, suffixed per run, keeps consecutive runs apart).
    """

    nnodes: int = 1
    rdzv_endpoint: Optional[str] = None  # host:port of the rendezvous (on one of the nodes)
    rdzv_id: Optional[str] = None


@dataclass(frozen=True)
class TrainConfig:
    """One fully resolved training run, minus its seed. Field names are the YAML keys."""

    model: str = "tiny_cnn"
    dataset: str = "digits"
    batch_size: int = 128  # the global batch (batch_scaling: global) or each rank's (per_rank)
    batch_scaling: str = "global"  # how batch_size relates to world_size; see per_rank_batch_size
    epochs: Optional[int] = None  # training length: epochs or steps, not both
    steps: Optional[int] = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: str = "constant"  # bench.schedules.SCHEDULES; stepped once per optimizer step
    lr_warmup_steps: int = 0  # linear warmup before the schedule
    eval_batch_size: int = 512
    num_workers: int = 0
    data_dir: str = "data"
    download: bool = False
    image_size: Optional[int] = None
    num_classes: Optional[int] = None  # synthetic only
    num_samples: int = 2048  # synthetic only
    augment: bool = False
    warmup_steps: int = 3  # optimizer steps excluded from timing (first-step/allocator/autotune)
    device: str = "auto"
    time_limit_s: float = 3600.0  # per run; the child is killed and the run recorded as timeout
    memory_limit_mb: Optional[int] = None  # CPU runs: cap on what the run may allocate; over it = oom
    target_accuracy: Optional[float] = None  # top-1 in [0, 1]: report time_to_target_s
    deterministic: bool = False  # torch.use_deterministic_algorithms; CPU runs are deterministic anyway
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    tricks: dict[str, Any] = field(default_factory=dict)  # trick name → parsed value, every trick

    @property
    def world_size(self) -> int:
        return self.tricks.get("world_size", 1)

    @property
    def per_rank_batch_size(self) -> int:
        """global: W ranks share batch_size (strong scaling); per_rank: each rank gets batch_size,
        so the global batch grows with W (weak scaling)."""
        return self.batch_size // self.world_size if self.batch_scaling == "global" else self.batch_size

    def to_dict(self) -> dict[str, Any]:
        """Flat, JSON-ready: trick values sit beside the other fields, as in the YAML."""
        data = dataclasses.asdict(self)
        data.update(data.pop("tricks"))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], file: str = "<config>", where: str = "") -> "TrainConfig":
        return build_train_config(data, file, where)


RANGES: dict[str, tuple[float, float]] = {  # inclusive bounds of numeric fields
    "batch_size": (1, float("inf")), "epochs": (1, float("inf")), "steps": (1, float("inf")),
    "eval_batch_size": (1, float("inf")), "lr_warmup_steps": (0, float("inf")), "num_workers": (0, 64), "image_size": (8, 4096),
    "num_classes": (2, 100_000), "num_samples": (1, float("inf")), "warmup_steps": (0, 10_000),
    "time_limit_s": (1, float("inf")), "memory_limit_mb": (1, float("inf")), "target_accuracy": (0, 1), "lr": (0, 10), "momentum": (0, 1), "weight_decay": (0, 1),
    "nnodes": (1, 100_000),
}
CHOICES: dict[str, list[str]] = {
    "name": OPTIMIZERS, "lr_schedule": list(SCHEDULES), "device": DEVICES, "batch_scaling": BATCH_SCALINGS,
}


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _check_value(tp: Any, value: Any, file: str, key: str) -> Any:
    """Type- and range-check one scalar field value; returns it (ints widened to float)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None:
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise ConfigError(file, key, f"{value!r} is not {_type_name(tp)}")
    name = key.rsplit(".", 1)[-1]
    if name in RANGES:
        low, high = RANGES[name]
        if not low <= value <= high:
            raise ConfigError(file, key, f"{value!r} is out of range [{low:g}, {high:g}]")
    if name in CHOICES and value not in CHOICES[name]:
        allowed = CHOICES[name]
        raise ConfigError(file, key, f"{value!r} is not one of {', '.join(allowed)}{did_you_mean(value, allowed)}")
    return float(value) if tp is float else value


def _build_dataclass(cls: type, data: Any, file: str, where: str, skip: tuple[str, ...] = ()) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(file, where, f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    values = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(file, path, f"unknown key{did_you_mean(key, names)}; allowed: {', '.join(names)}")
        if dataclasses.is_dataclass(hints[key]):
            values[key] = _build_dataclass(hints[key], value, file, path)
        else:
            values[key] = _check_value(hints[key], value, file, path)
    return cls(**values)


def build_train_config(data: dict[str, Any], file: str, where: str = "") -> TrainConfig:
    """Validate a flat config mapping (fields and trick values side by side) into a TrainConfig."""
    from bench.data import DATASETS
    from bench.models import model_names
    from bench.tricks import TRICKS

    if not isinstance(data, dict):
        raise ConfigError(file, where, f"expected a mapping, got {data!r}")
    trick_values = {e.name: e.obj.default for e in TRICKS}
    fields_only = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key in TRICKS:
            try:
                trick_values[key] = TRICKS.get(key).parse(value)
            except ValueError as err:
                raise ConfigError(file, path, str(err)) from None
        else:
            fields_only[key] = value
    try:
        config = _build_dataclass(TrainConfig, fields_only, file, where, skip=("tricks",))
    except ConfigError as err:
        if "unknown key" in err.message:  # widen the hint: trick names are keys too
            key = err.key.rsplit(".", 1)[-1]
            allowed = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "tricks"] + TRICKS.names()
            raise ConfigError(file, err.key, f"unknown key{did_you_mean(key, allowed)}; "
                              f"allowed: {', '.join(allowed)}") from None
        raise
    config = dataclasses.replace(config, tricks=trick_values)
    prefix = f"{where}." if where else ""
    if config.model not in model_names():
        raise ConfigError(file, prefix + "model", f"unknown model {config.model!r}"
                          f"{did_you_mean(config.model, model_names())}; see `trickbench list models`")
    if config.dataset not in DATASETS:
        raise ConfigError(file, prefix + "dataset", f"unknown dataset {config.dataset!r}"
                          f"{did_you_mean(config.dataset, DATASETS.names())}; allowed: {', '.join(DATASETS.names())}")
    if (config.epochs is None) == (config.steps is None):
        raise ConfigError(file, where or "base", "give exactly one of epochs or steps")
    launcher = config.launcher
    if launcher.nnodes > 1 and not (launcher.rdzv_endpoint and launcher.rdzv_id):
        raise ConfigError(file, prefix + "launcher", f"nnodes {launcher.nnodes} needs rdzv_endpoint (host:port "
                          "of the rendezvous) and rdzv_id")
    if launcher.rdzv_endpoint is not None and not launcher.rdzv_endpoint.rpartition(":")[2].isdigit():
        raise ConfigError(file, prefix + "launcher.rdzv_endpoint", f"{launcher.rdzv_endpoint!r} is not host:port")
    if config.lr_schedule == "onecycle" and config.lr_warmup_steps:
        raise ConfigError(file, prefix + "lr_warmup_steps", "must be 0 with lr_schedule onecycle, "
                          "which has its own warmup (the first 30% of steps)")
    return config


@dataclass(frozen=True)
class Cell:
    """One point of the matrix: the axis values that define it and its resolved config."""

    axes: dict[str, Any]
    config: TrainConfig

    @property
    def cell_id(self) -> str:
        """Stable hash of the resolved config (seed excluded): the key for resume and joins."""
        blob = json.dumps(self.config.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def label(self) -> str:
        return " ".join(f"{k}={json.dumps(v)}" for k, v in self.axes.items())


@dataclass(frozen=True)
class Matrix:
    name: str
    file: str
    design: str
    seeds: tuple[int, ...]
    axes: dict[str, tuple[Any, ...]]
    cells: tuple[Cell, ...]

    def runs(self) -> list[tuple[Cell, int]]:
        """(cell, seed) pairs, round-robin: every cell's first seed, then every cell's second…

        so slow drift of a shared machine spreads over all cells instead of biasing the last.
        """
        return [(cell, seed) for seed in self.seeds for cell in self.cells]


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _check_keys(data: Any, allowed: list[str], file: str, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(file, where, f"expected a mapping, got {data!r}")
    for key in data:
        if key not in allowed:
            path = f"{where}.{key}" if where else str(key)
            raise ConfigError(file, path, f"unknown key{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}")
    return data


def _expand(design: str, axes: dict[str, tuple[Any, ...]]) -> list[dict[str, Any]]:
    if design == "full_factorial":
        return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]
    baseline = {axis: values[0] for axis, values in axes.items()}
    points = [baseline]
    for axis, values in axes.items():
        points += [{**baseline, axis: value} for value in values[1:]]
    return points


def load_matrix(path: str | Path, profile: Optional[str] = None, device: Optional[str] = None) -> Matrix:
    """Read, expand and validate a matrix file. Raises ConfigError; never partially succeeds."""
    file = str(path)
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(file, "", f"cannot read file: {err.strerror}") from None
    try:
        raw = yaml.safe_load(text)  # safe loader: plain data only, no Python object tags
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(file, "", f"not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    raw = _check_keys(raw if raw is not None else {}, MATRIX_KEYS, file, "")
    for key in ("name", "axes"):
        if key not in raw:
            raise ConfigError(file, key, "missing (required)")
    profiles = raw.get("profiles") or {}
    _check_keys(profiles, list(profiles), file, "profiles")
    if profile is not None:
        if profile not in profiles:
            names = list(profiles)
            raise ConfigError(file, "profiles", f"no profile {profile!r}{did_you_mean(profile, names)}; "
                              f"defined: {', '.join(names) or 'none'}")
        override = _check_keys(profiles[profile] or {}, PROFILE_KEYS, file, f"profiles.{profile}")
        raw = _merge(raw, override)

    name = raw["name"]
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(file, "name", f"{name!r} is not a name of letters, digits, - and _")
    design = raw.get("design", "one_at_a_time")
    if design not in DESIGNS:
        raise ConfigError(file, "design", f"{design!r} is not one of {', '.join(DESIGNS)}{did_you_mean(design, DESIGNS)}")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ConfigError(file, "seeds", f"{seeds!r} is not a non-empty list of distinct integers")

    base = dict(raw.get("base") or {})
    if device is not None:
        base["device"] = device
    build_train_config(base, file, "base")  # report base errors against base's own keys
    base["device"] = resolve_device(base.get("device", "auto"), file, "--device" if device else "base.device")
    axes_raw = raw["axes"]
    if not isinstance(axes_raw, dict) or not axes_raw:
        raise ConfigError(file, "axes", "expected a mapping of axis name → list of values")
    axes: dict[str, tuple[Any, ...]] = {}
    for axis, values in axes_raw.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(file, f"axes.{axis}", f"expected a non-empty list of values, got {values!r}")
        for i, value in enumerate(values):  # each value alone on the base, so errors point at it
            try:
                build_train_config({**base, axis: value}, file)
            except ConfigError as err:
                if err.key == axis and "unknown key" in err.message:
                    key = f"axes.{axis}"
                elif err.key == axis or err.key.startswith(axis + "."):
                    key = f"axes.{axis}[{i}]{err.key[len(axis):]}"
                else:
                    key = err.key
                raise ConfigError(file, key, err.message) from None
        axes[axis] = tuple(values)

    excludes = raw.get("exclude") or []
    if not isinstance(excludes, list):
        raise ConfigError(file, "exclude", "expected a list of {axis: value} mappings")
    for i, rule in enumerate(excludes):
        _check_keys(rule, list(axes), file, f"exclude[{i}]")

    cells = []
    for point in _expand(design, axes):
        if any(all(point[k] == v for k, v in rule.items()) for rule in excludes):
            continue
        config = build_train_config({**base, **point}, file)
        _check_tricks(config, point, file)
        cells.append(Cell(axes=point, config=config))
    unique = {c.cell_id: c for c in cells}  # one-at-a-time may repeat the baseline
    return Matrix(name=name, file=file, design=design, seeds=tuple(seeds), axes=axes,
                  cells=tuple(unique.values()))


def resolve_device(requested: str, file: str, key: str) -> str:
    """auto → cuda when visible, else cpu; an explicit device that is not there is an error."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError(file, key, "cuda is not available on this machine (no CUDA device visible); allowed: cpu, auto")
    return requested


def _check_tricks(config: TrainConfig, point: dict[str, Any], file: str) -> None:
    """Ask every trick whether it can work with the rest of this cell's config."""
    from bench.tricks import TRICKS

    for entry in TRICKS:
        value = config.tricks[entry.name]
        try:
            entry.obj.check(value, config)
        except ValueError as err:
            cell = ", ".join(f"{k}={v}" for k, v in point.items())
            raise ConfigError(file, f"axes ({cell})", f"{err}; drop the combination with `exclude:`") from None
