"""cudnn_benchmark: set on CUDA; elsewhere accepted and recorded as not applied."""
from __future__ import annotations

import pytest
import torch

from bench.tricks.cudnn_benchmark import CudnnBenchmark
from bench.tricks.spec import RunContext


def set_up(value: bool, device: str) -> CudnnBenchmark:
    trick = CudnnBenchmark(value)
    model = torch.nn.Linear(2, 2)
    trick.setup(RunContext(torch.device(device), model, torch.optim.SGD(model.parameters(), lr=0.1), None))
    return trick


def test_cpu_records_not_applied_and_leaves_the_flag(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert set_up(True, "cpu").metrics() == {"cudnn_benchmark_applied": False}
    assert torch.backends.cudnn.benchmark is False


def test_cpu_row_says_not_applied():
    from bench.training.train import train
    from tests.tricks.speed_helpers import CPU, tiny_config

    assert train(tiny_config(cudnn_benchmark=True), seed=0, device=CPU)["cudnn_benchmark_applied"] is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("value", [True, False])
def test_cuda_sets_the_flag(monkeypatch, value):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not value)
    assert set_up(value, "cuda").metrics() == {"cudnn_benchmark_applied": True}
    assert torch.backends.cudnn.benchmark is value
