"""A tiny real run for the speed-trick tests: the config, the run and one batch as the loop builds them."""
from __future__ import annotations

import torch

from bench.config.train_config import build_train_config
from bench.training.train import Run, endless_batches, prepare_run

CPU = torch.device("cpu")


def tiny_config(**fields):
    return build_train_config({"model": "tiny_cnn", "dataset": "synthetic", "num_samples": 32, "image_size": 8,
                               "batch_size": 8, "steps": 6, "warmup_steps": 1, **fields}, "test")


def tiny_run(**fields) -> tuple[Run, tuple[torch.Tensor, torch.Tensor]]:
    run = prepare_run(tiny_config(**fields), seed=0, device=CPU)
    return run, next(endless_batches(run.train_loader(seed=0), CPU))
