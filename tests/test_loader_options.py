"""The input-pipeline fields reach the DataLoader; pin_memory defaults to "on for CUDA"."""
from __future__ import annotations

import pytest
import torch

from bench.training.train import prepare_run
from tests.tricks.speed_helpers import tiny_config

CPU = torch.device("cpu")


def loader(**fields):
    return prepare_run(tiny_config(**fields), seed=0, device=CPU).train_loader(seed=0)


def test_defaults_load_in_process_unpinned_on_cpu():
    dl = loader()
    assert (dl.num_workers, dl.pin_memory, dl.persistent_workers, dl.prefetch_factor) == (0, False, False, None)


def test_fields_are_passed_through():
    dl = loader(num_workers=1, pin_memory=True, persistent_workers=True, prefetch_factor=3)
    assert (dl.num_workers, dl.pin_memory, dl.persistent_workers, dl.prefetch_factor) == (1, True, True, 3)


def test_workers_without_prefetch_factor_get_torchs_default():
    assert loader(num_workers=1).prefetch_factor == 2


@pytest.mark.parametrize("field, value", [("persistent_workers", True), ("prefetch_factor", 2)])
def test_worker_options_without_workers_are_refused_at_validation(field, value):
    from bench.base.errors import ConfigError

    with pytest.raises(ConfigError, match="needs num_workers > 0"):
        tiny_config(**{field: value})


def test_pin_memory_on_cpu_is_recorded_as_not_applied():
    from bench.training.train import train

    assert train(tiny_config(pin_memory=True), seed=0, device=CPU)["pin_memory_applied"] is False
