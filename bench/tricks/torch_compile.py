"""``torch.compile`` of the model (TorchDynamo + TorchInductor).

The model is compiled, not the whole step: the step is the loop's Python (optimizer, trick hooks
such as GradScaler, SAM or EMA, the measurement instrumentation), which must stay composable;
compiling the model already compiles its forward and, through AOTAutograd, its backward. It is
the LAST prepare_model (registered last), so it compiles what checkpointing and the other tricks
made of the model. Under DDP (world_size > 1) it compiles the module INSIDE the wrapper, i.e.
DDP(compile(model)): torch.compile(DDP(model)) graph-breaks in DDP's forward in torch 2.14 and
compiled no graph at all here (measured: 3 breaks, 0 graphs). The cost: the compiled backward
is one autograd node, so DDP all-reduces the gradients after it instead of overlapping.

Compilation is lazy: the first forward and backward of the first warm-up step compile (so
``check`` asks for at least one warm-up step) and ``warmup_time_s`` includes it. The row records

- ``compile_time_s``: Dynamo's own compile-time records of this run (forward frames, Dynamo +
  AOTAutograd + Inductor, and the lazily compiled backward graphs), not a difference of step times;
  Inductor's on-disk graph caches are off, so every run pays a cold compile, as the first run of a
  model on a machine does (later runs with the caches on compile faster);
- ``compile_graphs``, ``compile_graph_breaks`` (Dynamo's counters), ``compile_recompilations``
  with their reasons, and ``compile_steps_compiling``: the optimizer steps (0 = first) during
  which something compiled; a step at or after ``warmup_steps`` means compilation was timed.

The memory and FLOP steps run under ``TorchDispatchMode``s, and Dynamo does not run compiled
code while a non-infra dispatch mode is active: it runs those frames eagerly, without compiling
again (tested). So under compile, the row's ``peak_memory_bytes``/breakdown and
``flops_per_step`` are those of the EAGER model; the step times and throughput are compiled.
Evaluation also runs the eager module (the same function; compiling it would be a second,
untimed compile in eval mode). ``reduce-overhead`` adds CUDA graphs, which exist only on CUDA:
elsewhere it behaves as ``default`` and the row says ``compile_cudagraphs_applied: false``.
A compiler failure stops the run with the compiler's first message line (an ``error`` row).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bench.base.registry import did_you_mean
from bench.tricks.spec import RunContext, StepFns, Trick, register

MODES = ["default", "reduce-overhead", "max-autotune"]
MAX_REASONS = 5  # distinct recompile reasons kept in the row


def compile_records() -> list[Any]:
    """Dynamo's compile records of this process, one per compiled forward frame or backward graph."""
    # lazy: importing the compiler stack costs seconds; only compile cells need it
    from torch._dynamo.utils import get_compilation_metrics

    return get_compilation_metrics()


def compile_seconds(records: list[Any]) -> float:
    """Forward frames' whole compile time plus the backward graphs' (compiled at first backward)."""
    forward = sum(r.entire_frame_compile_time_s or 0.0 for r in records)
    backward = sum((r.backward_cumulative_compile_time_us or 0) / 1e6 for r in records)
    return forward + backward


def first_message_line(error: BaseException) -> str:
    """The compiler's own message on one line: the first line of it, after Dynamo's
    "backend='inductor' raised:" header when there is one, never its closing TORCHDYNAMO_VERBOSE hint."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith("raised:"):
        return f"{lines[0]} {lines[1]}"
    return lines[0] if lines else type(error).__name__


@register
class Compile(Trick):
    name = "compile"
    description = "torch.compile of the model (Inductor); compile time, graph breaks, recompilations recorded"
    values_help = "false | default | reduce-overhead | max-autotune"
    default = False

    @classmethod
    def parse(cls, value: Any) -> Any:
        if value is not False and value not in MODES:
            allowed = ["false"] + MODES
            raise ValueError(f"{value!r} is not one of {', '.join(allowed)}{did_you_mean(value, MODES)}")
        return value

    @classmethod
    def check(cls, value: Any, config: Any) -> None:
        if value and config.tricks.get("checkpointing"):
            raise ValueError("compile with checkpointing compiles no graph: Dynamo breaks the graph at every "
                             "checkpointed block (measured: 4 breaks, 0 graphs on tiny_cnn), so the run would "
                             "time the eager model")
        if value and config.tricks.get("input_grad_penalty"):
            raise ValueError("compile with input_grad_penalty fails every step: the penalty's double backward "
                             "(create_graph=True) does not run through a compiled graph (AOTAutograd)")
        if value and config.warmup_steps < 1:
            raise ValueError("compile needs warmup_steps >= 1: the first step compiles, and it must not be the "
                             "memory step (which runs eagerly) or a timed step")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        # lazy: importing the compiler stack costs seconds; only compile cells need it
        import torch._dynamo

        # lazy: importing the compiler stack costs seconds; only compile cells need it
        import torch._functorch.config as functorch_config

        # lazy: importing the compiler stack costs seconds; only compile cells need it
        import torch._inductor.config as inductor_config

        # lazy: importing the compiler stack costs seconds; only compile cells need it
        from torch._dynamo.utils import clear_compilation_metrics, counters

        # Every run compiles from scratch, so its compile_time_s does not depend on which runs
        # came before it on this machine (Inductor's on-disk caches would make seed 0 pay for all).
        inductor_config.fx_graph_cache = False
        functorch_config.enable_autograd_cache = False
        # One run per process: start counting from zero (tests run several in one process).
        torch._dynamo.reset()
        clear_compilation_metrics()
        counters.clear()
        self.steps_compiling: list[int] = []
        self._steps = self._records_seen = 0
        mode = None if self.value == "default" else self.value
        if isinstance(model, DistributedDataParallel):  # DDP(compile(model)): see the module docstring
            model.module = self.compiled = torch.compile(model.module, mode=mode)
            return model
        self.compiled = torch.compile(model, mode=mode)
        return self.compiled

    def setup(self, run: RunContext) -> None:
        self.device_type = run.device.type

    def wrap_step(self, step: StepFns) -> StepFns:
        def compute_grads() -> torch.Tensor:
            # lazy: importing the compiler stack costs seconds; only compile cells need it
            from torch._dynamo.exc import TorchDynamoException

            try:
                return step.compute_grads()
            except TorchDynamoException as error:  # the row shows the cause, not the traceback hint
                raise RuntimeError(f"torch.compile failed: {first_message_line(error)}") from None

        return StepFns(compute_grads, step.apply_update)

    def after_step(self) -> None:
        records = len(compile_records())
        if records > self._records_seen:
            self.steps_compiling.append(self._steps)
        self._records_seen, self._steps = records, self._steps + 1

    def eval_model(self, model: nn.Module) -> nn.Module:
        return self.compiled._orig_mod if model is self.compiled else model

    def metrics(self) -> dict[str, Any]:
        # lazy: importing the compiler stack costs seconds; only compile cells need it
        from torch._dynamo.utils import counters

        records = compile_records()
        # The guard that failed, without Dynamo's user stack trace
        reasons = [r.recompile_reason.splitlines()[0] for r in records if getattr(r, "recompile_reason", None)]
        skipped_cudagraphs = counters["inductor"].get("cudagraph_skips", 0)
        return {
            "compile_time_s": compile_seconds(records),
            "compile_graphs": counters["stats"].get("unique_graphs", 0),
            "compile_graph_breaks": sum(counters["graph_break"].values()),
            "compile_recompilations": len(reasons),
            "compile_recompile_reasons": list(dict.fromkeys(reasons))[:MAX_REASONS],
            "compile_steps_compiling": self.steps_compiling,
            "compile_cudagraphs_applied": (self.value == "reduce-overhead" and self.device_type == "cuda"
                                           and not skipped_cudagraphs),
        }
