"""Matrix YAML → validated, frozen config objects. All checking of user input happens here.

Every error is a :class:`ConfigError` naming the file, the key path and what is allowed; the
CLI prints it on one line and exits with code 2 before anything runs or is written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from bench.base.registry import did_you_mean
from bench.store.results import clip
from bench.base.safeyaml import MatrixYAMLError, load_yaml, shorten
from bench.parts.schedules import SCHEDULES

DESIGNS = ["one_at_a_time", "full_factorial"]
OPTIMIZERS = ["sgd", "adamw"]
DEVICES = ["auto", "cpu", "cuda"]
BATCH_SCALINGS = ["global", "per_rank"]
MATRIX_KEYS = ["name", "description", "base", "design", "seeds", "axes", "exclude", "profiles", "slurm"]
PROFILE_KEYS = ["base", "design", "seeds", "axes", "exclude", "slurm"]


class ConfigError(Exception):
    """Bad user input: ``file: key.path: message``."""

    def __init__(self, file: str | Path, key: str, message: str) -> None:
        self.file, self.key, self.message = str(file), key, message
        where = f"{clip(self.file, 100)}: {clip(key, 100)}: " if key else f"{clip(self.file, 100)}: "
        super().__init__(clip(where + message, MAX_ERROR_CHARS))


MAX_ERROR_CHARS = 290  # one readable line, whatever the input; values inside are shortened further


@dataclass(frozen=True)
class SGDConfig:
    """torch.optim.SGD. Each optimizer's config carries only the options that optimizer uses,
    so a row's config never shows an option as applied that was not."""

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False


@dataclass(frozen=True)
class AdamWConfig:
    """torch.optim.AdamW (betas and eps at torch's defaults)."""

    name: str = "adamw"
    lr: float = 0.001  # torch's default; SGD's 0.1 would diverge
    weight_decay: float = 0.0


OptimizerConfig = SGDConfig  # the default optimizer
OPTIMIZER_CONFIGS: dict[str, type] = {"sgd": SGDConfig, "adamw": AdamWConfig}


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
    optimizer: Union[SGDConfig, AdamWConfig] = field(default_factory=SGDConfig)
    lr_schedule: str = "constant"  # bench.parts.schedules.SCHEDULES; stepped once per optimizer step
    lr_warmup_steps: int = 0  # linear warmup before the schedule
    eval_batch_size: int = 512
    num_workers: int = 0  # DataLoader worker processes; 0 loads in the training process
    pin_memory: Optional[bool] = None  # page-locked host batches; None: on when the device is CUDA
    persistent_workers: bool = False  # keep the workers alive between epochs (needs num_workers > 0)
    prefetch_factor: Optional[int] = None  # batches each worker loads ahead; None: torch's 2 (needs workers)
    data_dir: str = "data"
    download: bool = False
    image_size: Optional[int] = None
    num_classes: Optional[int] = None  # synthetic only
    num_samples: int = 2048  # synthetic only
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

    def identity(self, keep: Iterable[str] = ()) -> dict[str, Any]:
        """:meth:`to_dict` with the run settings not in ``keep`` at their defaults: what makes two
        runs the same run."""
        defaults = TrainConfig()
        # An image folder's data_dir is the dataset itself, not a cache location.
        settings = [n for n in RUN_SETTINGS if n not in keep and not (n == "data_dir" and self.dataset == "imagefolder")]
        return dataclasses.replace(self, **{name: getattr(defaults, name) for name in settings}).to_dict()

    @classmethod
    def from_dict(cls, data: dict[str, Any], file: str = "<config>", where: str = "") -> "TrainConfig":
        return build_train_config(data, file, where)


# Fields that say how or where a run is carried out, not what it computes: a run either computes
# the same thing or stops (time limit, memory cap: a timeout or oom row). They are left out of a
# cell's identity, so editing one neither re-runs finished runs nor counts as an edited matrix;
# the row's config records the value the run had.
RUN_SETTINGS = ("time_limit_s", "memory_limit_mb", "data_dir", "download", "launcher")

RANGES: dict[str, tuple[float, float]] = {  # inclusive bounds of numeric fields
    "batch_size": (1, 10**7), "epochs": (1, 10**6), "steps": (1, 10**9),
    "eval_batch_size": (1, 10**7), "lr_warmup_steps": (0, 10**9), "num_workers": (0, 64), "prefetch_factor": (1, 1024),
    "image_size": (8, 4096),
    "num_classes": (2, 100_000), "num_samples": (1, 10**8), "warmup_steps": (0, 10_000),
    "time_limit_s": (1, 366 * 86400), "memory_limit_mb": (1, 2**30), "target_accuracy": (0, 1),
    "lr": (0, 10), "momentum": (0, 1), "weight_decay": (0, 1), "nnodes": (1, 100_000),
}
CHOICES: dict[str, list[str]] = {
    "name": OPTIMIZERS, "lr_schedule": list(SCHEDULES), "device": DEVICES, "batch_scaling": BATCH_SCALINGS,
}
SEED_MAX = 2**32 - 1  # numpy.random.seed's range is [0, 2**32 - 1]; each rank seeds with seed + rank
MAX_CELLS = 1000  # more cells than this need --yes (a full factorial grows as a product)
HARD_MAX_CELLS = 1_000_000  # beyond this a matrix cannot even be validated in reasonable time
MEASUREMENT_STEPS = 2  # untimed steps after warm-up: one under memory tracking, one under FLOP counting


def min_total_steps(warmup_steps: int) -> int:
    """Fewest optimizer steps a run needs: warm-up, the measurement steps, and one timed step."""
    return warmup_steps + MEASUREMENT_STEPS + 1


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
        raise ConfigError(file, key, f"{shorten(value)} is not {_type_name(tp)}")
    name = key.rsplit(".", 1)[-1]
    if name in RANGES:
        low, high = RANGES[name]
        if not low <= value <= high:
            raise ConfigError(file, key, f"{shorten(value)} is out of range [{low:g}, {high:g}]")
    if name in CHOICES and value not in CHOICES[name]:
        allowed = CHOICES[name]
        raise ConfigError(file, key, f"{shorten(value)} is not one of {', '.join(allowed)}{did_you_mean(value, allowed)}")
    return float(value) if tp is float else value


def _build_dataclass(cls: type, data: Any, file: str, where: str, skip: tuple[str, ...] = (),
                     notes: Optional[list[str]] = None) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(file, where, f"expected a mapping, got {shorten(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    values = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(file, path, f"unknown key{did_you_mean(key, names)}; allowed: {', '.join(names)}")
        if key == "optimizer" and cls is TrainConfig:
            values[key] = _build_optimizer(value, file, path, notes)
        elif dataclasses.is_dataclass(hints[key]):
            values[key] = _build_dataclass(hints[key], value, file, path)
        else:
            values[key] = _check_value(hints[key], value, file, path)
    return cls(**values)


def _build_optimizer(data: Any, file: str, where: str, notes: Optional[list[str]]) -> Any:
    """The chosen optimizer's config. An option only another optimizer uses (momentum with adamw)
    is dropped with a note instead of being recorded as applied; an option no optimizer has is
    an error that lists the chosen optimizer's options."""
    if not isinstance(data, dict):
        raise ConfigError(file, where, f"expected a mapping, got {shorten(data)}")
    name = _check_value(str, data.get("name", "sgd"), file, f"{where}.name")
    cls = OPTIMIZER_CONFIGS[name]
    own = [f.name for f in dataclasses.fields(cls)]
    others = {f.name for c in OPTIMIZER_CONFIGS.values() for f in dataclasses.fields(c)}
    kept = {}
    for key, value in data.items():
        if key in own:
            kept[key] = value
        elif key in others and isinstance(key, str):
            if notes is not None:
                notes.append(f"{where}.{key}: {name} does not use {key}; ignored (not recorded in the rows)")
        else:
            raise ConfigError(file, f"{where}.{key}", f"unknown key{did_you_mean(key, own)}; "
                              f"{name} takes: {', '.join(own)}")
    config = _build_dataclass(cls, kept, file, where)
    if getattr(config, "nesterov", False) and config.momentum == 0:
        raise ConfigError(file, f"{where}.nesterov", "true needs momentum > 0 (Nesterov momentum without momentum "
                          "is undefined; torch.optim.SGD refuses it)")
    return config


def _check_endpoint(endpoint: str, file: str, key: str) -> None:
    """host:port with a non-empty host and a port in 1–65535 (IPv6 hosts in brackets)."""
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(file, key, f"{shorten(endpoint)} is not host:port with a port in 1-65535")


def build_train_config(data: dict[str, Any], file: str, where: str = "",
                       notes: Optional[list[str]] = None) -> TrainConfig:
    """Validate a flat config mapping (fields and trick values side by side) into a TrainConfig.

    ``notes`` collects warnings (options that do not apply); errors raise ConfigError.
    """
    from bench.parts.data import DATASETS
    from bench.parts.models import model_names
    from bench.tricks import TRICKS

    if not isinstance(data, dict):
        raise ConfigError(file, where, f"expected a mapping, got {shorten(data)}")
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
        config = _build_dataclass(TrainConfig, fields_only, file, where, skip=("tricks",), notes=notes)
    except ConfigError as err:
        own_key = err.key[len(where) + 1:] if where else err.key
        if "unknown key" in err.message and "." not in own_key:  # trick names are keys too
            key = err.key.rsplit(".", 1)[-1]
            allowed = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "tricks"] + TRICKS.names()
            raise ConfigError(file, err.key, f"unknown key{did_you_mean(key, allowed)}; "
                              f"allowed: {', '.join(allowed)}") from None
        raise
    config = dataclasses.replace(config, tricks=trick_values)
    prefix = f"{where}." if where else ""
    if config.model not in model_names():
        raise ConfigError(file, prefix + "model", f"unknown model {shorten(config.model)}"
                          f"{did_you_mean(config.model, model_names())}; see `trickbench list models`")
    if config.dataset not in DATASETS:
        raise ConfigError(file, prefix + "dataset", f"unknown dataset {shorten(config.dataset)}"
                          f"{did_you_mean(config.dataset, DATASETS.names())}; allowed: {', '.join(DATASETS.names())}")
    if (config.epochs is None) == (config.steps is None):
        raise ConfigError(file, where or "base", "give exactly one of epochs or steps")
    launcher = config.launcher
    if launcher.nnodes > 1 and not (launcher.rdzv_endpoint and launcher.rdzv_id):
        raise ConfigError(file, prefix + "launcher", f"nnodes {launcher.nnodes} needs rdzv_endpoint (host:port "
                          "of the rendezvous) and rdzv_id")
    if launcher.rdzv_endpoint is not None:
        _check_endpoint(launcher.rdzv_endpoint, file, prefix + "launcher.rdzv_endpoint")
    _check_loader(config, file, prefix)
    if config.lr_schedule == "onecycle" and config.lr_warmup_steps:
        raise ConfigError(file, prefix + "lr_warmup_steps", "must be 0 with lr_schedule onecycle, "
                          "which has its own warmup (the first 30% of steps)")
    return config


def _check_loader(config: TrainConfig, file: str, prefix: str) -> None:
    """Options DataLoader accepts only with worker processes (it raises otherwise, mid-run)."""
    if config.num_workers:
        return
    if config.persistent_workers:
        raise ConfigError(file, prefix + "persistent_workers", "true needs num_workers > 0 (there are no worker "
                          "processes to keep alive)")
    if config.prefetch_factor is not None:
        raise ConfigError(file, prefix + "prefetch_factor", f"{config.prefetch_factor} needs num_workers > 0 "
                          "(without workers nothing loads ahead); use null")


@dataclass(frozen=True)
class Cell:
    """One point of the matrix: the axis values that define it and its resolved config."""

    axes: dict[str, Any]
    config: TrainConfig

    @property
    def cell_id(self) -> str:
        """Stable hash of what the run computes (seed excluded): the key for resume and joins.

        Run settings (:data:`RUN_SETTINGS`) are hashed at their defaults, so editing one keeps the
        cell's identity and its finished runs, and ids of configs that never set one are unchanged;
        one that is an axis of the matrix (a sweep of memory caps) tells its cells apart and counts.
        """
        blob = json.dumps(self.config.identity(keep=self.axes), sort_keys=True, default=str)
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
    warnings: tuple[str, ...] = ()  # one line each, `file: key: message`; the CLI prints them on stderr
    slurm: Optional[dict[str, Any]] = None  # the validated `slurm:` section (bench.execution.cluster); not in any cell_id

    def runs(self) -> list[tuple[Cell, int]]:
        """(cell, seed) pairs, round-robin: every cell's first seed, then every cell's second…

        so slow drift of a shared machine spreads over all cells instead of biasing the last.
        """
        return [(cell, seed) for seed in self.seeds for cell in self.cells]


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: a mapping in ``override`` merges into the mapping it replaces (profiles, and
    axes over nested fields such as ``optimizer: [{lr: 0.01}]``); anything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _check_keys(data: Any, allowed: list[str], file: str, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(file, where, f"expected a mapping, got {shorten(data)}")
    for key in data:
        if key not in allowed:
            path = f"{where}.{key}" if where else str(key)
            raise ConfigError(file, path, f"unknown key{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}")
    return data


# Top-level sections: (type, may be null, what it must be). Profiles' sections are checked the same way.
SECTIONS: dict[str, tuple[type, bool, str]] = {
    "name": (str, False, "a name of letters, digits, - and _"),
    "description": (str, True, "a string"),
    "base": (dict, True, "a mapping of config fields and trick values"),
    "design": (str, False, f"one of {', '.join(DESIGNS)}"),
    "seeds": (list, False, "a non-empty list of distinct integers"),
    "axes": (dict, False, "a mapping of axis name → list of values"),
    "exclude": (list, True, "a list of {axis: value} mappings"),
    "profiles": (dict, True, "a mapping of profile name → {base, design, seeds, axes, exclude, slurm}"),
    "slurm": (dict, True, "a mapping of SLURM settings (see `trickbench run --help`, --executor slurm)"),
}


def _check_sections(data: dict[str, Any], file: str, where: str) -> None:
    for key, value in data.items():
        tp, nullable, what = SECTIONS[key]
        if not isinstance(value, tp) and not (value is None and nullable):
            raise ConfigError(file, f"{where}{key}", f"expected {what}, got {shorten(value)}")


def _apply_profile(raw: dict[str, Any], profile: Optional[str], file: str) -> dict[str, Any]:
    profiles = raw.get("profiles") or {}
    for name, body in profiles.items():
        _check_keys(body or {}, PROFILE_KEYS, file, f"profiles.{name}")
        _check_sections(body or {}, file, f"profiles.{name}.")
    if profile is None:
        return raw
    for name in profile.split(","):  # `gpu1,offline`: merged in the order given
        if name not in profiles:
            names = list(profiles)
            raise ConfigError(file, "profiles", f"no profile {shorten(name)}{did_you_mean(name, names)}; "
                              f"defined: {', '.join(names) or 'none'}")
        raw = _merge(raw, profiles[name] or {})
    return raw


def _check_seeds(seeds: list[Any], file: str) -> tuple[int, ...]:
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ConfigError(file, "seeds", f"{shorten(seeds)} is not a non-empty list of distinct integers")
    for i, seed in enumerate(seeds):
        if not 0 <= seed <= SEED_MAX:
            raise ConfigError(file, f"seeds[{i}]", f"{shorten(seed)} is outside numpy's seed range [0, 2**32 - 1]")
    return tuple(seeds)


def _count_cells(design: str, axes: dict[str, list[Any]]) -> int:
    """Cells the design makes from these axes, counted without expanding them."""
    if design == "full_factorial":
        return math.prod(len(values) for values in axes.values())
    return 1 + sum(len(values) - 1 for values in axes.values())


def _expand(design: str, axes: dict[str, tuple[Any, ...]]) -> list[dict[str, Any]]:
    if design == "full_factorial":
        return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]
    baseline = {axis: values[0] for axis, values in axes.items()}
    points = [baseline]
    for axis, values in axes.items():
        points += [{**baseline, axis: value} for value in values[1:]]
    return points


def _check_axis_value(base: dict[str, Any], axis: str, i: int, value: Any, file: str) -> None:
    """One axis value merged alone into the base, so an error points at that value."""
    try:
        config = build_train_config(_merge(base, {axis: value}), file)
    except ConfigError as err:
        if err.key == axis and "unknown key" in err.message:
            key = f"axes.{axis}"
        elif err.key == axis or err.key.startswith(axis + "."):
            key = f"axes.{axis}[{i}]{err.key[len(axis):]}"
        else:
            key = err.key
        raise ConfigError(file, key, err.message) from None
    if axis == "device":
        resolve_device(config.device, file, f"axes.device[{i}]")


def _check_excludes(excludes: list[Any], axes: dict[str, tuple[Any, ...]], file: str) -> None:
    for i, rule in enumerate(excludes):
        _check_keys(rule, list(axes), file, f"exclude[{i}]")
        if not rule:
            raise ConfigError(file, f"exclude[{i}]", "empty rule (it would exclude every cell); "
                              "give {axis: value, ...}")
        for axis, value in rule.items():
            if value not in axes[axis]:
                raise ConfigError(file, f"exclude[{i}].{axis}", f"{shorten(value)} is not a value of axis {axis} "
                                  f"({shorten(list(axes[axis]))[1:-1]})")


def load_matrix(path: str | Path, profile: Optional[str] = None, device: Optional[str] = None,
                max_cells: Optional[int] = None) -> Matrix:
    """Read, expand and validate a matrix file. Raises ConfigError; never partially succeeds.

    ``max_cells``: refuse designs with more cells (counted before expanding); None: only the
    hard limit applies.
    """
    file = str(path)
    try:
        raw = load_yaml(path)
    except OSError as err:
        raise ConfigError(file, "", f"cannot read file: {err.strerror or err}") from None
    except MatrixYAMLError as err:
        raise ConfigError(file, "", str(err)) from None
    raw = _check_keys(raw if raw is not None else {}, MATRIX_KEYS, file, "")
    _check_sections(raw, file, "")
    for key in ("name", "axes"):
        if key not in raw:
            raise ConfigError(file, key, "missing (required)")
    raw = _apply_profile(raw, profile, file)

    name = raw["name"]
    if not name.replace("_", "").replace("-", "").isalnum() or not name.isascii():
        raise ConfigError(file, "name", f"{shorten(name)} is not a name of letters, digits, - and _")
    design = raw.get("design", "one_at_a_time")
    if design not in DESIGNS:
        raise ConfigError(file, "design", f"{shorten(design)} is not one of {', '.join(DESIGNS)}"
                          f"{did_you_mean(design, DESIGNS)}")
    seeds = _check_seeds(raw.get("seeds", [0]), file)

    notes: list[str] = []
    base = dict(raw.get("base") or {})
    if device is not None:
        base["device"] = device
    build_train_config(base, file, "base", notes)  # report base errors against base's own keys
    base["device"] = resolve_device(base.get("device", "auto"), file, "--device" if device else "base.device")
    axes_raw = raw["axes"]
    if not axes_raw:
        raise ConfigError(file, "axes", "expected a mapping of axis name → list of values, got {}")
    for axis, values in axes_raw.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(file, f"axes.{axis}", f"expected a non-empty list of values, got {shorten(values)}")
    count = _count_cells(design, axes_raw)
    limit = min(max_cells or HARD_MAX_CELLS, HARD_MAX_CELLS)
    if count > limit:
        more = " (pass --yes to run more than 1000)" if limit < HARD_MAX_CELLS else ""
        raise ConfigError(file, "axes", f"{design} over these axes makes {count:,} cells, more than {limit:,}{more}")
    axes: dict[str, tuple[Any, ...]] = {}
    for axis, values in axes_raw.items():
        for i, value in enumerate(values):
            _check_axis_value(base, axis, i, value, file)
        axes[axis] = tuple(values)
    excludes = raw.get("exclude") or []
    _check_excludes(excludes, axes, file)

    cells = []
    for point in _expand(design, axes):
        if any(all(point[k] == v for k, v in rule.items()) for rule in excludes):
            continue
        cell_notes: list[str] = []
        config = build_train_config(_merge(base, point), file, notes=cell_notes)
        config = dataclasses.replace(config, device=resolve_device(config.device, file, "device"))
        _check_tricks(config, point, file)
        check_cell(config, point, seeds, file, cell_notes)
        notes += [note for note in cell_notes if f"base.{note}" not in notes]  # base's own are noted once
        cells.append(Cell(axes=point, config=config))
    if not cells:
        raise ConfigError(file, "exclude", f"the rules remove every one of the {count} cells")
    unique = {c.cell_id: c for c in cells}  # one-at-a-time may repeat the baseline
    return Matrix(name=name, file=file, design=design, seeds=seeds, axes=axes,
                  cells=tuple(unique.values()), warnings=tuple(f"{file}: {n}" for n in dict.fromkeys(notes)),
                  slurm=_check_slurm(raw.get("slurm"), file))


def _check_slurm(section: Any, file: str) -> Optional[dict[str, Any]]:
    """How the matrix runs on a cluster, checked here like every other section; kept out of the
    cells' configs, so it never changes a cell_id."""
    from bench.execution.cluster import parse_settings

    parse_settings(section, file)
    return section


def resolve_device(requested: str, file: str, key: str) -> str:
    """auto → cuda when visible, else cpu; an explicit device that is not there is an error."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError(file, key, "cuda is not available on this machine (no CUDA device visible); allowed: cpu, auto")
    return requested


def _cell_key(point: dict[str, Any]) -> str:
    return "axes (" + ", ".join(f"{k}={clip(str(v), 40)}" for k, v in point.items()) + ")"


def _check_tricks(config: TrainConfig, point: dict[str, Any], file: str) -> None:
    """Ask every trick whether it can work with the rest of this cell's config."""
    from bench.tricks import TRICKS

    for entry in TRICKS:
        value = config.tricks[entry.name]
        try:
            entry.obj.check(value, config)
        except ValueError as err:
            raise ConfigError(file, _cell_key(point), f"{err}; drop the combination with `exclude:`") from None


def check_cell(config: TrainConfig, point: dict[str, Any], seeds: tuple[int, ...], file: str,
               notes: list[str]) -> None:
    """What a run would discover only after starting: seeds, data, run length, model input.

    An error names the cell when one of its axis values is involved, else the base field.
    """
    from bench.training.feasibility import CellProblem, check_run

    if max(seeds) + config.world_size - 1 > SEED_MAX:
        raise ConfigError(file, "seeds", f"seed {max(seeds)} + rank {config.world_size - 1} is outside numpy's "
                          "seed range [0, 2**32 - 1] (each rank seeds with seed + rank)")
    try:
        notes.extend(check_run(config))
    except CellProblem as problem:
        own = any(name in point for name in problem.fields)
        key = _cell_key(point) if own else f"base.{problem.fields[0]}"
        raise ConfigError(file, key, problem.message) from None
