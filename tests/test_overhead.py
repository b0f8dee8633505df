"""Benchmark: the harness's timed step against a plain hand-written PyTorch step.

Skipped in the default test run (timing belongs in benchmarks, not unit tests). Run with
    .venv/bin/python -m pytest tests/test_overhead.py -o addopts="" --benchmark-only
Both benchmarks run in one session on identical models and data; compare their medians.
"""
import pytest
import torch
import torch.nn.functional as F

from bench.config.train_config import build_train_config
from bench.parts.clock import StepClock
from bench.parts.models import build_model
from bench.training.train import Run, prepare_run

BATCH = (torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,)))


def fresh():
    torch.manual_seed(0)
    model = build_model("tiny_cnn", num_classes=10)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def harness_run() -> Run:
    """The run the harness builds for this model (precision fp32: the trick every run carries)."""
    config = build_train_config({"model": "tiny_cnn", "dataset": "synthetic", "num_samples": 64, "image_size": 16,
                                 "steps": 10, "optimizer": {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0}},
                                "bench")
    return prepare_run(config, seed=0, device=torch.device("cpu"))


@pytest.mark.benchmark(group="step overhead: tiny_cnn, batch 64, 16x16, fp32")
def test_plain_pytorch_step(benchmark):
    model, optimizer = fresh()
    inputs, targets = BATCH

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
        return loss.detach()

    benchmark.pedantic(step, rounds=60, warmup_rounds=5)


@pytest.mark.benchmark(group="step overhead: tiny_cnn, batch 64, 16x16, fp32")
def test_harness_step(benchmark):
    run = harness_run()
    scheduler = torch.optim.lr_scheduler.ConstantLR(run.optimizer, factor=1.0, total_iters=0)
    clock = StepClock(torch.device("cpu"))
    losses = []

    def step():  # what bench.training.train.train does per timed step
        started = clock.start()
        loss = run.step(BATCH)
        clock.stop(started)
        scheduler.step()
        losses.append(loss)

    benchmark.pedantic(step, rounds=60, warmup_rounds=5)


@pytest.mark.benchmark(group="step overhead, interleaved")
def test_interleaved_harness_over_plain(benchmark):
    """Both steps alternate, so drift of a shared machine hits them equally; the ratio of
    medians lands in ``extra_info`` (shown with --benchmark-json)."""
    import statistics
    import time

    plain_model, plain_opt = fresh()
    run = harness_run()
    inputs, targets = BATCH

    def plain():
        plain_opt.zero_grad(set_to_none=True)
        F.cross_entropy(plain_model(inputs), targets).backward()
        plain_opt.step()

    def harness():
        run.step(BATCH)

    def both(rounds=100):
        times = {plain: [], harness: []}
        for i in range(rounds):
            for step in (plain, harness) if i % 2 else (harness, plain):
                started = time.perf_counter()
                step()
                times[step].append(time.perf_counter() - started)
        return statistics.median(times[harness]) / statistics.median(times[plain])

    both(10)  # warm-up
    ratio = benchmark.pedantic(both, rounds=3, iterations=1)
    benchmark.extra_info["harness_over_plain_median_ratio"] = ratio
    print(f"harness / plain median step time: {ratio:.4f}")
