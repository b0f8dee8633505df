"""Which machine a row was measured on: a short fingerprint of what sets a run's speed.

A results folder may hold rows of several machines (a clone that runs the shipped matrices on
new hardware appends its own rows beside the committed ones). Resume counts a (cell, seed) as
done only when it has a row from *this* machine, and reports never pool rows across machines.

The fingerprint is computed from a row's ``env`` (:func:`bench.training.measure.environment`), so rows
written before it existed have one too. It covers the device the run measured (GPU name, or CPU
model, cores and vector capability), the torch build and CUDA version, and Python's minor
version. Left out on purpose: the hostname (identical cloud machines are one machine; CI runners
are ephemeral), the driver, the harness commit (a code change is what `compare` measures), the
torch thread count (a run setting, which DDP ranks and shared runs change) and the number of GPUs
in the box (a one-GPU run's speed does not depend on it).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Optional

import torch

from bench.training.measure import environment

Row = dict[str, Any]

# env fields that determine how fast a run goes; a CPU run's GPU fields are None.
FINGERPRINT_FIELDS = ("device", "device_name", "cpu_model", "cpu_cores", "cpu_capability", "torch", "cuda",
                      "python_minor")
UNKNOWN = "unknown"  # the machine of a row without env (a row written by hand, or by a very old trickbench)


def speed_fields(env: dict[str, Any]) -> dict[str, Any]:
    """The part of ``env`` the fingerprint covers (Python reduced to major.minor)."""
    python = env.get("python")
    minor = ".".join(str(python).split(".")[:2]) if python else None
    return {name: (minor if name == "python_minor" else env.get(name)) for name in FINGERPRINT_FIELDS}


def fingerprint(env: Optional[dict[str, Any]]) -> str:
    """8 hex digits naming the machine of ``env``; :data:`UNKNOWN` without one."""
    if not isinstance(env, dict):
        return UNKNOWN
    blob = json.dumps(speed_fields(env), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def row_machine(row: Row) -> str:
    return fingerprint(row.get("env"))


def describe(env: Optional[dict[str, Any]]) -> str:
    """One line a reader recognises: ``cpu: AMD EPYC (2 cores, AVX512), torch 2.14.1, Python 3.11``."""
    if not isinstance(env, dict):
        return "unknown machine (rows without env)"
    fields = speed_fields(env)
    cpu = f"{fields['cpu_model']} ({fields['cpu_cores']} cores, {fields['cpu_capability']})"
    where = f"cuda: {fields['device_name']}, CUDA {fields['cuda']}, host {cpu}" if fields["device"] == "cuda" \
        else f"{fields['device']}: {cpu}"
    return f"{where}, torch {fields['torch']}, Python {fields['python_minor']}"


def machines(rows: Iterable[Row]) -> dict[str, str]:
    """fingerprint → description of every machine in ``rows``, the most recently written last."""
    found: dict[str, str] = {}
    for row in rows:
        key = row_machine(row)
        found.pop(key, None)  # re-insert: order by the latest row of each machine
        found[key] = describe(row.get("env"))
    return found


def latest_machine(rows: list[Row]) -> Optional[str]:
    """The machine of the last row written (rows in file order); None without rows."""
    return row_machine(rows[-1]) if rows else None


def rows_of(rows: Iterable[Row], machine: str) -> list[Row]:
    return [r for r in rows if row_machine(r) == machine]


def environments_here(device_types: Iterable[str], gpus: Iterable[int]) -> dict[Optional[int], dict[str, Any]]:
    """This machine's ``env`` as a worker would record it: key None for a CPU run, a GPU index for a
    run whose rank 0 uses that GPU (GPUs of one box may differ)."""


    envs: dict[Optional[int], dict[str, Any]] = {}
    if "cpu" in device_types:
        envs[None] = environment(torch.device("cpu"))
    if "cuda" in device_types:
        for index in gpus:
            envs[index] = environment(torch.device("cuda", index))
    return envs
