"""Every registered trick with each of precision bf16 / fp16, accumulation 2 and world_size 2:
either validation refuses the combination with its reason (before anything runs), or a short run
of it succeeds. Tricks are taken from the registry and their values from the smoke test's
SMOKE_VALUES, so a trick added later is covered without editing this file.

The world_size 2 cases start two processes under torchrun each and are marked slow
(`pytest -m slow tests/test_trick_combinations.py`); the others train in this process.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from bench.base.errors import ConfigError
from bench.cli.main import main
from bench.config.matrix import load_matrix
from bench.store.results import read_rows
from bench.training.train import train
from bench.tricks import TRICKS
from tests.test_train_smoke import SKIPPED, SMOKE_MODELS, SMOKE_VALUES

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

PARTNERS = {
    "precision=bf16": {"precision": "bf16"},
    "precision=fp16": {"precision": "fp16"},
    "accumulation=2": {"accumulation": 2},
    "world_size=2": {"world_size": 2},
}
SLOW_PARTNERS = {"world_size=2"}
# A cold torch.compile per case (~25 s here): its combinations run with the slow tests; its smoke
# case and tests/tricks/test_compile.py still run by default.
SLOW_TRICKS = {"compile"}
# The cheapest run that every check accepts: 6 steps of tiny_cnn on 8x8 noise. A trick that needs
# another model (residual blocks, attention) gets the smoke test's model for it.
BASE = {"model": "tiny_cnn", "dataset": "synthetic", "num_samples": 64, "image_size": 8, "batch_size": 16,
        "steps": 6, "warmup_steps": 1}


def cases() -> list:
    params = []
    for name in TRICKS.names():
        if name in SKIPPED and not SMOKE_VALUES.get(name):
            continue
        for value in SMOKE_VALUES.get(name) or [None]:
            for partner, values in PARTNERS.items():
                if name in values:  # the same key twice: not a combination
                    continue
                marks = [pytest.mark.slow] if partner in SLOW_PARTNERS or name in SLOW_TRICKS else []
                params.append(pytest.param(name, value, partner, id=f"{name}={value}+{partner}", marks=marks))
    return params


def write(tmp_path, config: dict, tag: str):
    """A one-cell matrix with ``config`` as its base (JSON is YAML)."""
    path = tmp_path / f"{tag}.yaml"
    path.write_text(json.dumps({"name": "combo", "base": config, "seeds": [0], "axes": {"warmup_steps": [1]}}))
    return path


def base_accepting(tmp_path, name: str, value) -> dict:
    """BASE on the trick's smoke-test model, which the trick alone must pass validation on."""
    config = {**BASE, "model": SMOKE_MODELS.get(name, BASE["model"]), name: value}
    try:
        load_matrix(write(tmp_path, config, "alone"))
    except ConfigError as err:
        pytest.fail(f"{name}={value} is refused even alone on {config['model']}: {err.message}")
    return config


@pytest.mark.parametrize("name, value, partner", cases())
def test_trick_combines_or_is_refused_with_a_reason(tmp_path, name, value, partner):
    assert name in SMOKE_VALUES and value is not None, f"trick {name!r} has no value in SMOKE_VALUES"
    config = {**base_accepting(tmp_path, name, value), **PARTNERS[partner]}
    path = write(tmp_path, config, "combined")
    try:
        matrix = load_matrix(path)
    except ConfigError as err:  # refused before anything runs: the reason must be there
        assert err.file == str(path) and len(err.message) > 20, str(err)
        return
    if matrix.cells[0].config.world_size > 1:
        out = tmp_path / "out"
        assert main(["run", str(path), "--out", str(out)]) == 0
        (row,) = read_rows(out / "cells.jsonl")
        assert row["status"] == "ok" and math.isfinite(row["final_train_loss"]), row.get("error")
    else:
        metrics = train(matrix.cells[0].config, seed=0, device=torch.device("cpu"))
        assert math.isfinite(metrics["final_train_loss"]) and metrics["steps"] == BASE["steps"]
