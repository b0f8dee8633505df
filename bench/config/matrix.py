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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from bench.base.errors import ConfigError, clip
from bench.base.registry import did_you_mean
from bench.base.safeyaml import MatrixYAMLError, load_yaml, shorten
from bench.config.slurm import parse_settings
from bench.config.train_config import (
    TrainConfig,
    build_train_config,
    check_keys,
    resolve_device,
)
from bench.tricks import TRICKS

DESIGNS = ["one_at_a_time", "full_factorial"]
MATRIX_KEYS = ["name", "description", "base", "design", "seeds", "axes", "exclude", "profiles", "slurm"]
PROFILE_KEYS = ["base", "design", "seeds", "axes", "exclude", "slurm"]


SEED_MAX = 2**32 - 1  # numpy.random.seed's range is [0, 2**32 - 1]; each rank seeds with seed + rank
MAX_CELLS = 1000  # more cells than this need --yes (a full factorial grows as a product)
HARD_MAX_CELLS = 1_000_000  # beyond this a matrix cannot even be validated in reasonable time


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
        check_keys(body or {}, PROFILE_KEYS, file, f"profiles.{name}")
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
        check_keys(rule, list(axes), file, f"exclude[{i}]")
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
    raw = check_keys(raw if raw is not None else {}, MATRIX_KEYS, file, "")
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
        _check_seed_range(config, seeds, file)
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
    parse_settings(section, file)
    return section


def cell_key(point: dict[str, Any]) -> str:
    return "axes (" + ", ".join(f"{k}={clip(str(v), 40)}" for k, v in point.items()) + ")"


def _check_tricks(config: TrainConfig, point: dict[str, Any], file: str) -> None:
    """Ask every trick whether it can work with the rest of this cell's config."""
    for entry in TRICKS:
        value = config.tricks[entry.name]
        try:
            entry.obj.check(value, config)
        except ValueError as err:
            raise ConfigError(file, cell_key(point), f"{err}; drop the combination with `exclude:`") from None


def _check_seed_range(config: TrainConfig, seeds: tuple[int, ...], file: str) -> None:
    if max(seeds) + config.world_size - 1 > SEED_MAX:
        raise ConfigError(file, "seeds", f"seed {max(seeds)} + rank {config.world_size - 1} is outside numpy's "
                          "seed range [0, 2**32 - 1] (each rank seeds with seed + rank)")
