"""compile: compile time, graph breaks and recompilations are recorded; the memory and FLOP steps
run the eager model (Dynamo does not run compiled code under a TorchDispatchMode); a compiler
failure becomes an error row with the compiler's message.

Tiny MLPs (a few seconds to compile) except the end-to-end run, which compiles tiny_cnn (slow).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench.training.memory import track_step_memory
from bench.training.train import run_step
from bench.tricks.spec import RunContext
from bench.tricks.torch_compile import Compile

CPU = torch.device("cpu")


class Breaking(nn.Module):
    """Two linear layers with a graph break between them."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        return self.b(h)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def compiled(model: nn.Module, mode: str = "default") -> tuple[Compile, nn.Module, torch.optim.Optimizer]:
    trick = Compile(mode)
    wrapped = trick.prepare_model(model)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    trick.setup(RunContext(CPU, wrapped, opt, None))
    return trick, wrapped, opt


def batch(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def frames_compiled() -> int:
    from torch._dynamo.utils import counters

    return counters["frames"]["total"]


def test_first_step_compiles_and_the_metrics_say_so():
    trick, model, opt = compiled(mlp())
    for _ in range(3):
        run_step(model, opt, [trick], batch())
    metrics = trick.metrics()
    assert metrics["compile_time_s"] > 0
    assert metrics["compile_graphs"] == 1 and metrics["compile_graph_breaks"] == 0
    assert metrics["compile_recompilations"] == 0
    assert metrics["compile_steps_compiling"] == [0]  # only the first step compiled
    assert metrics["compile_cudagraphs_applied"] is False


def test_compiled_steps_match_eager():
    eager = mlp()
    trick, model, opt = compiled(mlp())
    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.1)
    for seed in range(3):
        run_step(model, opt, [trick], batch(seed=seed))
        run_step(eager, eager_opt, [], batch(seed=seed))
    for p, q in zip(eager.parameters(), trick.compiled._orig_mod.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    assert trick.eval_model(model) is trick.compiled._orig_mod  # evaluation runs eagerly


def test_graph_breaks_are_counted():
    trick, model, opt = compiled(Breaking())
    run_step(model, opt, [trick], batch())
    metrics = trick.metrics()
    assert metrics["compile_graph_breaks"] >= 1 and metrics["compile_graphs"] == 2


def test_recompilation_is_counted_with_its_reason_and_step():
    trick, model, opt = compiled(mlp())
    run_step(model, opt, [trick], batch(4))
    run_step(model, opt, [trick], batch(4))
    run_step(model, opt, [trick], batch(5))  # a new batch size: the guard on the shape fails
    metrics = trick.metrics()
    assert metrics["compile_recompilations"] == 1
    assert "size mismatch" in metrics["compile_recompile_reasons"][0]
    assert metrics["compile_steps_compiling"] == [0, 2]


def test_memory_and_flop_steps_run_the_eager_model_without_recompiling():
    """Under a dispatch mode Dynamo skips the compiled frame, so the ledger and the FLOP counter
    see exactly the eager model's operators: the same numbers as for the uncompiled model."""
    trick, model, opt = compiled(mlp())
    eager = mlp()
    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.1)
    run_step(model, opt, [trick], batch())
    run_step(eager, eager_opt, [], batch())
    frames = frames_compiled()
    reports, flops = [], []
    for m, o, tricks in ((model, opt, [trick]), (eager, eager_opt, [])):
        with track_step_memory(m, o, tricks, batch(), CPU) as ledger:
            run_step(m, o, tricks, batch(), ledger.instrument)
        reports.append(ledger.report())
        with FlopCounterMode(display=False) as counter:
            run_step(m, o, tricks, batch())
        flops.append(counter.get_total_flops())
    assert frames_compiled() == frames  # nothing compiled under the modes
    assert reports[0].breakdown["activations"] == reports[1].breakdown["activations"] > 0
    assert reports[0].peak_memory_bytes == reports[1].peak_memory_bytes
    macs = 4 * (6 * 8 + 8 * 3)  # batch 4 through both layers
    # forward + weight gradients + the input gradient of the second layer only (the batch needs none)
    assert flops[0] == flops[1] == 2 * (macs + macs + 4 * 8 * 3)


def test_compiler_failure_is_an_error_row_with_the_compilers_message():
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    from bench.training.worker import run_job
    from tests.tricks.speed_helpers import tiny_config

    config = tiny_config(compile="default", device="cpu")
    # torch's own config patching (monkeypatch would delete these virtual attributes on undo);
    # the caches off, since a cached graph would need no compiler.
    with inductor_config.patch({"cpp.cxx": ("no-such-compiler",), "fx_graph_cache": False}), \
            functorch_config.patch(enable_autograd_cache=False):
        row = run_job({"matrix": "m", "cell_id": "c", "seed": 0, "axes": {}, "config": config.to_dict()})
    assert row["status"] == "error"
    assert row["error"].startswith("RuntimeError: torch.compile failed: ")
    assert "InvalidCxxCompiler: No working C++ compiler found" in row["error"]
    assert row["failed_at_step"] == 0


@pytest.mark.parametrize("value", [True, "fast", None, "max_autotune"])
def test_parse_rejects(value):
    with pytest.raises(ValueError, match="false, default, reduce-overhead, max-autotune"):
        Compile.parse(value)


@pytest.mark.slow
def test_compiled_run_end_to_end():
    """tiny_cnn through the real loop: compilation inside the warm-up, memory and FLOPs of the eager
    model (the same as an uncompiled run's), timed steps after it."""
    from bench.training.train import train
    from tests.tricks.speed_helpers import tiny_config

    eager = train(tiny_config(), seed=0, device=CPU)
    run = train(tiny_config(compile="default", warmup_steps=2), seed=0, device=CPU)
    assert run["compile_graph_breaks"] == 0 and run["compile_time_s"] > 0
    assert run["compile_steps_compiling"] and max(run["compile_steps_compiling"]) < 2  # in the warm-up
    assert run["flops_per_step"] == eager["flops_per_step"]
    assert run["peak_memory_bytes"] == eager["peak_memory_bytes"]
    assert run["compile_time_s"] < run["warmup_time_s"]


@pytest.fixture
def one_rank_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield
    dist.destroy_process_group()


def test_under_ddp_the_module_inside_the_wrapper_is_compiled(one_rank_group):
    """torch.compile(DDP(m)) compiles no graph in this torch; DDP(compile(m)) compiles all of it."""
    from torch.nn.parallel import DistributedDataParallel

    from bench.parts.distributed import unwrap

    plain = mlp()
    trick, model, opt = compiled(DistributedDataParallel(plain))
    assert isinstance(model, DistributedDataParallel) and model.module is trick.compiled
    assert unwrap(model) is plain
    for _ in range(2):
        run_step(model, opt, [trick], batch())
    metrics = trick.metrics()
    assert metrics["compile_graphs"] == 1 and metrics["compile_graph_breaks"] == 0


def test_reduce_overhead_on_cpu_runs_and_says_no_cuda_graphs():
    trick, model, opt = compiled(mlp(), "reduce-overhead")
    for _ in range(2):
        run_step(model, opt, [trick], batch())
    metrics = trick.metrics()
    assert metrics["compile_graphs"] == 1 and metrics["compile_cudagraphs_applied"] is False
