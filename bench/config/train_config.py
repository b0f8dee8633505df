"""One training run's config: typed, frozen dataclasses built from YAML and validated once.

Field names are the YAML keys. Trick values are parsed by each trick (bench.tricks), names of
models and datasets checked against their registries (bench.parts).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union

import torch

from bench.base.errors import ConfigError
from bench.base.registry import did_you_mean
from bench.base.safeyaml import shorten
from bench.parts.data import DATASETS
from bench.parts.models import model_names
from bench.parts.schedules import SCHEDULES
from bench.tricks import TRICKS

OPTIMIZERS = ["sgd", "adamw"]


DEVICES = ["auto", "cpu", "cuda"]


BATCH_SCALINGS = ["global", "per_rank"]


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


def type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def check_value(tp: Any, value: Any, file: str, key: str) -> Any:
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
        raise ConfigError(file, key, f"{shorten(value)} is not {type_name(tp)}")
    name = key.rsplit(".", 1)[-1]
    if name in RANGES:
        low, high = RANGES[name]
        if not low <= value <= high:
            raise ConfigError(file, key, f"{shorten(value)} is out of range [{low:g}, {high:g}]")
    if name in CHOICES and value not in CHOICES[name]:
        allowed = CHOICES[name]
        raise ConfigError(file, key, f"{shorten(value)} is not one of {', '.join(allowed)}{did_you_mean(value, allowed)}")
    return float(value) if tp is float else value


def build_dataclass(cls: type, data: Any, file: str, where: str, skip: tuple[str, ...] = (),
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
            values[key] = build_dataclass(hints[key], value, file, path)
        else:
            values[key] = check_value(hints[key], value, file, path)
    return cls(**values)


def check_keys(data: Any, allowed: list[str], file: str, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(file, where, f"expected a mapping, got {shorten(data)}")
    for key in data:
        if key not in allowed:
            path = f"{where}.{key}" if where else str(key)
            raise ConfigError(file, path, f"unknown key{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}")
    return data


def _build_optimizer(data: Any, file: str, where: str, notes: Optional[list[str]]) -> Any:
    """The chosen optimizer's config. An option only another optimizer uses (momentum with adamw)
    is dropped with a note instead of being recorded as applied; an option no optimizer has is
    an error that lists the chosen optimizer's options."""
    if not isinstance(data, dict):
        raise ConfigError(file, where, f"expected a mapping, got {shorten(data)}")
    name = check_value(str, data.get("name", "sgd"), file, f"{where}.name")
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
    config = build_dataclass(cls, kept, file, where)
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

    if not isinstance(data, dict):
        raise ConfigError(file, where, f"expected a mapping, got {shorten(data)}")
    trick_values = {e.name: e.obj.default for e in TRICKS}
    fields_only = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key in TRICKS:
            try:
                trick_values[key] = TRICKS.get(key).parse_value(value)  # null: off, for every trick
            except ValueError as err:
                raise ConfigError(file, path, str(err)) from None
        else:
            fields_only[key] = value
    try:
        config = build_dataclass(TrainConfig, fields_only, file, where, skip=("tricks",), notes=notes)
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


def resolve_device(requested: str, file: str, key: str) -> str:
    """auto → cuda when visible, else cpu; an explicit device that is not there is an error."""

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError(file, key, "cuda is not available on this machine (no CUDA device visible); allowed: cpu, auto")
    return requested
