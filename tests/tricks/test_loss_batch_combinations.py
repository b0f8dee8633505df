"""label_smoothing, mixup, cutmix, input_grad_penalty and progressive_resizing with half precision,
accumulation and two DDP ranks (gloo): each trains, and under DDP the ranks stay in step (and
equal one process on the whole batch where the trick is deterministic)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.testing import assert_close

from bench.config.train_config import build_train_config
from bench.parts.distributed import unwrap
from bench.training.train import build_tricks, run_step, train
from bench.tricks.spec import Batch, RunContext, Trick

VALUES = {"label_smoothing": 0.1, "mixup": 0.4, "cutmix": 1.0, "input_grad_penalty": 0.1,
          "progressive_resizing": {"start": 0.5, "end": 1.0, "until": 0.75}}
COMBINATIONS = {"bf16": {"precision": "bf16"}, "fp16": {"precision": "fp16"}, "accumulation": {"accumulation": 2}}


@pytest.mark.parametrize("combination", COMBINATIONS)
@pytest.mark.parametrize("name", VALUES)
def test_trains_with_half_precision_and_accumulation(name, combination):
    config = build_train_config({"model": "tiny_cnn", "dataset": "synthetic", "num_samples": 64, "image_size": 16,
                                 "batch_size": 16, "steps": 6, "warmup_steps": 1, name: VALUES[name],
                                 **COMBINATIONS[combination]}, "test")
    for entry in build_tricks(config):
        type(entry).check(config.tricks[entry.name], config)
    metrics = train(config, seed=0, device=torch.device("cpu"))
    assert math.isfinite(metrics["final_train_loss"]) and metrics["steps"] == 6


# --- two gloo ranks -----------------------------------------------------------------------------

WORLD, BATCH, STEPS, CLASSES = 2, 8, 3, 5
DETERMINISTIC = ["label_smoothing", "input_grad_penalty", "progressive_resizing"]  # no per-rank randomness
MIXING = ["mixup", "cutmix"]


def small_net() -> nn.Module:
    """No BatchNorm (so ranks on halves equal one process on the batch), any input size."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, CLASSES)).double()


def batches() -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, 16, 16, generator=g, dtype=torch.float64),
             torch.randint(0, CLASSES, (BATCH,), generator=g)) for _ in range(STEPS)]


class TargetProbe(Trick):
    name, description, values_help, default = "target_probe", "test only", "-", None

    def setup(self, run: RunContext) -> None:
        self.seen = []

    def transform_batch(self, batch: Batch) -> Batch:
        self.seen.append(batch[1].clone())
        return batch


def train_steps(world_size: int, name: str, rank: int = 0) -> dict:
    config = build_train_config({"model": "tiny_cnn", "dataset": "synthetic", "steps": STEPS, "warmup_steps": 5,
                                 "batch_size": BATCH, "world_size": world_size,
                                 "optimizer": {"lr": 0.1, "momentum": 0.0}, name: VALUES[name]}, "test")
    model = small_net()
    tricks = build_tricks(config) + [TargetProbe(None)]
    for trick in tricks:
        model = trick.prepare_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    context = RunContext(torch.device("cpu"), model, optimizer, config, num_classes=CLASSES, total_steps=STEPS)
    for trick in tricks:
        trick.setup(context)
    share = BATCH // world_size
    torch.manual_seed(rank)  # each rank its own generator, as prepare_run seeds them (seed + rank)
    for x, y in batches():
        run_step(model, optimizer, tricks, (x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]))
    return {"params": [p.detach().clone() for p in unwrap(model).parameters()], "targets": tricks[-1].seen}


def ddp_worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.save({name: train_steps(WORLD, name, rank) for name in VALUES}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(ddp_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", VALUES)
def test_ranks_hold_identical_weights(ranks, name):
    for a, b in zip(ranks[0][name]["params"], ranks[1][name]["params"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_two_ranks_on_half_batches_equal_one_process_on_the_batch(ranks, name):
    start = [p.detach() for p in small_net().parameters()]
    reference = train_steps(1, name)["params"]
    assert any(not torch.equal(p, p0) for p, p0 in zip(reference, start))
    assert_close(ranks[0][name]["params"], reference)


def smaller_weight(soft_targets: torch.Tensor) -> float:
    """min(λ, 1-λ) of a mixed batch: the smallest nonzero entry of its soft targets."""
    return soft_targets[soft_targets > 0].min().item()


@pytest.mark.parametrize("name", MIXING)
def test_each_rank_mixes_its_own_batch_with_its_own_lambda(ranks, name):
    weights = [[smaller_weight(t) for t in rank[name]["targets"]] for rank in ranks]
    for rank in ranks:
        assert all(t.shape == (BATCH // WORLD, CLASSES) for t in rank[name]["targets"])  # its own share only
    assert weights[0] != weights[1]  # drawn from each rank's own generator (seed + rank)
