"""world_size > 1: DDP on CPU (gloo) gives the updates of one process on the whole batch, and the
runner launches, measures and cleans up after torchrun."""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from bench.base.errors import ConfigError
from bench.cli.main import main
from bench.config.matrix import load_matrix
from bench.config.train_config import build_train_config
from bench.execution.children import WORKER, worker_command
from bench.parts.distributed import threads_per_rank, unwrap
from bench.store.results import read_rows
from bench.training.memory import track_step_memory
from bench.training.train import build_tricks, run_step
from bench.tricks.spec import RunContext, Trick

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

WORLD = 2
BATCH = 8  # global; 4 per rank
STEPS = 3
LR = 0.1
RHO = 0.5
CASES = {  # name → trick values; the model has no BatchNorm, so W ranks must equal one process
    "plain": {},
    "accumulation": {"accumulation": 2},
    "sam": {"sam": RHO},
    "ema": {"ema": 0.5, "accumulation": 2},
    "clip_gc_lookahead": {"grad_clip": {"norm": 0.05}, "grad_centralization": True, "lookahead": {"k": 2},
                          "accumulation": 2},
}


def bn_free_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).double()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (BATCH,), generator=g))
            for _ in range(STEPS)]


class GradProbe(Trick):
    """Records every parameter's gradient after each micro-batch's backward (entered last, it
    exits first, while the other tricks' sync contexts are still open)."""

    name, description, values_help, default = "grad_probe", "test only", "-", None

    def setup(self, run: RunContext) -> None:
        self.params, self.seen = list(run.model.parameters()), []

    @contextlib.contextmanager
    def sync_context(self, is_last: bool):
        yield
        self.seen.append(torch.cat([p.grad.flatten() for p in self.params]).clone())


def train_steps(world_size: int, tricks_values: dict, rank: int = 0) -> dict:
    """STEPS harness steps on this rank's share of each batch; parameters, probes and EMA weights."""
    config = build_train_config({"model": "tiny_cnn", "dataset": "synthetic", "steps": 10, "batch_size": BATCH,
                                 "world_size": world_size, "optimizer": {"lr": LR, "momentum": 0.0},
                                 **tricks_values}, "test")
    model = bn_free_net()
    tricks = build_tricks(config) + [GradProbe(None)]
    for trick in tricks:
        model = trick.prepare_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for trick in tricks:
        trick.setup(RunContext(torch.device("cpu"), model, optimizer, config))
    share = BATCH // world_size
    for x, y in batches():
        run_step(model, optimizer, tricks, (x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]))
    ema = [t for t in tricks if t.name == "ema"]
    return {"params": [p.detach().clone() for p in unwrap(model).parameters()], "probes": tricks[-1].seen,
            "ema": [p.detach().clone() for p in ema[0].averaged.module.parameters()] if ema else None}


def tracked_step_memory(rank: int) -> dict:
    """The breakdown of a DDP step tracked after STEPS steps (DDP has rebuilt its buckets by then)."""
    config = build_train_config({"model": "tiny_cnn", "dataset": "synthetic", "steps": 10, "batch_size": BATCH,
                                 "world_size": WORLD}, "test")
    model = bn_free_net()
    tricks = build_tricks(config)
    for trick in tricks:
        model = trick.prepare_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for trick in tricks:
        trick.setup(RunContext(torch.device("cpu"), model, optimizer, config))
    share = BATCH // WORLD
    data = [(x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]) for x, y in batches()]
    for batch in data:
        run_step(model, optimizer, tricks, batch)
    with track_step_memory(model, optimizer, tricks, data[0], torch.device("cpu")) as ledger:
        run_step(model, optimizer, tricks, data[0], instrument=ledger.instrument)
    return {"breakdown": ledger.report().breakdown, "param_bytes": sum(p.nbytes for p in model.parameters())}


def ddp_worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        results = {name: train_steps(WORLD, values, rank) for name, values in CASES.items()}
        torch.save({**results, "memory": tracked_step_memory(rank)}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Every case trained once by two gloo ranks in spawned processes; each rank's results."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(ddp_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]



def assert_same_on_every_rank(ranks: list[dict], case: str, key: str) -> None:
    for other in ranks[1:]:
        for a, b in zip(ranks[0][case][key], other[case][key]):
            assert torch.equal(a, b), f"{case}: {key} differ between ranks"


@pytest.mark.parametrize("case", ["plain", "accumulation", "clip_gc_lookahead"])
def test_two_ranks_on_half_batches_equal_one_process_on_the_batch(ranks, case):
    reference = train_steps(1, CASES[case])
    assert_same_on_every_rank(ranks, case, "params")
    assert_close(ranks[0][case]["params"], reference["params"])


def test_accumulation_all_reduces_only_the_last_micro_batch(ranks):
    first, second = ranks[0]["accumulation"]["probes"], ranks[1]["accumulation"]["probes"]
    assert len(first) == len(second) == 2 * STEPS
    for step in range(STEPS):
        assert not torch.allclose(first[2 * step], second[2 * step])  # no_sync: each rank's own gradient
        assert torch.equal(first[2 * step + 1], second[2 * step + 1])  # averaged over the ranks


def test_sam_perturbs_each_rank_with_its_own_gradient(ranks):
    first, second = ranks[0]["sam"]["probes"], ranks[1]["sam"]["probes"]
    for step in range(STEPS):
        assert not torch.allclose(first[2 * step], second[2 * step])  # the perturbation gradient: local
        assert torch.equal(first[2 * step + 1], second[2 * step + 1])  # the update gradient: averaged
    assert_same_on_every_rank(ranks, "sam", "params")  # the weights come back bit-exactly

    # By hand: each rank's share perturbs on its own; the gradients at the perturbed weights average.
    model, share = bn_free_net(), BATCH // WORLD
    params = list(model.parameters())
    for x, y in batches():
        w = [p.detach().clone() for p in params]
        update = [torch.zeros_like(p) for p in params]
        for r in range(WORLD):
            xs, ys = x[r * share:(r + 1) * share], y[r * share:(r + 1) * share]
            with torch.no_grad():
                for p, w0 in zip(params, w):
                    p.copy_(w0)
            g = torch.autograd.grad(F.cross_entropy(model(xs), ys), params)
            norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
            with torch.no_grad():
                for p, w0, gi in zip(params, w, g):
                    p.copy_(w0 + RHO * gi / norm)
            for u, gi in zip(update, torch.autograd.grad(F.cross_entropy(model(xs), ys), params)):
                u += gi / WORLD
        with torch.no_grad():
            for p, w0, u in zip(params, w, update):
                p.copy_(w0 - LR * u)
    assert_close(ranks[0]["sam"]["params"], [p.detach() for p in params])


def test_ddp_gradient_buckets_count_as_trick_state(ranks):
    """DDP's buckets live in C++ (no Python object holds them); the tracker finds them when the
    step first writes to them, and counts them from the start of the step."""
    for rank in ranks:
        memory = rank["memory"]
        assert memory["breakdown"]["trick_state"] >= memory["param_bytes"]  # one bucket slot per parameter


def test_ema_weights_are_identical_on_every_rank(ranks):
    assert_same_on_every_rank(ranks, "ema", "ema")
    assert_close(ranks[0]["ema"]["ema"], train_steps(1, CASES["ema"])["ema"])


# --- through the runner and torchrun ------------------------------------------------------------

TINY_DDP = """
name: ddp
base: {{model: tiny_cnn, dataset: synthetic, num_samples: 64, image_size: 8, batch_size: 16,
       steps: 5, warmup_steps: 1, time_limit_s: {limit}}}
seeds: [0]
axes:
  world_size: {worlds}
"""


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text`` (no psutil: a scan of /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            command = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if text in command:
                found.append(command)
    return found


@pytest.fixture
def work_in_tmp(tmp_path, monkeypatch):
    """The runner's job files (named on every worker's command line) go under tmp_path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_a_failing_rank_fails_the_cell_and_leaves_no_process(write_matrix, work_in_tmp, monkeypatch):
    monkeypatch.setenv("TRICKBENCH_FAULT", "raise@1")  # rank 1 raises after its first step
    out = work_in_tmp / "out"
    started = time.monotonic()
    assert main(["run", str(write_matrix(TINY_DDP.format(limit=120, worlds=[2]))), "--out", str(out)]) == 1
    assert time.monotonic() - started < 120
    [row] = read_rows(out / "cells.jsonl")
    assert row["status"] == "error"
    assert row["error"].startswith("rank 1: RuntimeError: injected fault") and row["failed_at_step"] == 1
    assert processes_mentioning(str(work_in_tmp)) == []


def test_scaling_end_to_end(write_matrix, work_in_tmp, capsys):
    out = work_in_tmp / "out"
    assert main(["run", str(write_matrix(TINY_DDP.format(limit=300, worlds=[1, 2]))), "--out", str(out)]) == 0
    assert "scaling efficiency" in capsys.readouterr().out
    rows = read_rows(out / "cells.jsonl")
    assert [r["world_size"] for r in rows] == [1, 2] and all(r["status"] == "ok" for r in rows)
    assert rows[1]["config"]["world_size"] == 2 and len(rows[1]["peak_memory_bytes_per_rank"]) == 2
    assert rows[1]["peak_memory_bytes"] == max(rows[1]["peak_memory_bytes_per_rank"])
    for row in rows:  # the allocator's peak on every rank; the largest rank's parts sum to it
        assert row["peak_memory_source"] == "cpu_allocator_events"
        assert sum(row["memory_breakdown"].values()) == row["peak_memory_bytes"]
    assert rows[1]["env"]["torch_threads"] == max(1, (os.cpu_count() or 1) // 2)
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "### Scaling" in report and "scaling efficiency" in report
    assert processes_mentioning(str(work_in_tmp)) == []


@pytest.mark.slow  # waits out a time limit
def test_a_hanging_rank_times_out_and_leaves_no_process(write_matrix, work_in_tmp, monkeypatch):
    monkeypatch.setenv("TRICKBENCH_FAULT", "hang@1")
    out = work_in_tmp / "out"
    assert main(["run", str(write_matrix(TINY_DDP.format(limit=20, worlds=[2]))), "--out", str(out)]) == 1
    [row] = read_rows(out / "cells.jsonl")
    assert row["status"] == "timeout"
    assert processes_mentioning(str(work_in_tmp)) == []


# --- configuration and launch ------------------------------------------------------------------------

def test_batch_scaling_sets_the_per_rank_batch(write_matrix):
    base = "name: m\nbase: {model: tiny_cnn, dataset: digits, epochs: 2, batch_size: 96, batch_scaling: %s}\n" \
           "axes: {world_size: [1, 3]}"
    assert [c.config.per_rank_batch_size for c in load_matrix(write_matrix(base % "global")).cells] == [96, 32]
    assert [c.config.per_rank_batch_size for c in load_matrix(write_matrix(base % "per_rank")).cells] == [96, 96]
    with pytest.raises(ConfigError, match="'weak' is not one of global, per_rank"):
        load_matrix(write_matrix(base % "weak"))


@pytest.mark.parametrize("launcher,key,message", [
    ("{nnodes: 2}", "base.launcher", "nnodes 2 needs rdzv_endpoint"),
    ("{nnodes: 2, rdzv_endpoint: node0, rdzv_id: j}", "base.launcher.rdzv_endpoint", "'node0' is not host:port"),
    ("{nnodes: 3, rdzv_endpoint: 'node0:29400', rdzv_id: j}", "axes (world_size=4)",
     "world_size 4 is not a multiple of launcher.nnodes 3"),
])
def test_bad_launcher_is_rejected(write_matrix, launcher, key, message):
    path = write_matrix(f"name: m\nbase: {{model: tiny_cnn, dataset: digits, epochs: 1, launcher: {launcher}}}\n"
                        "axes: {world_size: [4]}")
    with pytest.raises(ConfigError) as caught:
        load_matrix(path)
    assert caught.value.key == key and message in caught.value.message


def test_launch_commands():
    def config(**fields):
        return build_train_config({"model": "tiny_cnn", "dataset": "digits", "epochs": 1, **fields}, "t")

    assert worker_command(config(), Path("j.json"), "c-0") == ([*WORKER, "j.json"], None)
    command, env = worker_command(config(world_size=2), Path("j.json"), "c-0")
    assert command[3:] == ["--standalone", "--nproc-per-node", "2", "-m", "bench.training.worker", "j.json"]
    assert env["OMP_NUM_THREADS"] == str(threads_per_rank(2))
    command, env = worker_command(config(world_size=16, launcher={"nnodes": 2, "rdzv_endpoint": "node0:29400",
                                                                 "rdzv_id": "job1"}), Path("j.json"), "c-0")
    assert command[3:] == ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:29400",
                           "--rdzv-id", "job1-c-0", "--nproc-per-node", "8", "-m", "bench.training.worker", "j.json"]
