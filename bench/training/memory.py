"""Peak tensor memory of one training step, and what it consists of at that instant.

Every tensor storage on the run's device that is live during the step is counted once, from
whenever it exists until it is freed, whoever created it and when:

- storages that exist before the step: the model's parameters and buffers, gradients, the
  optimizer's state and the batch are registered up front; a trick's state (EMA's averaged copy,
  GradScaler's scale) is found by walking the trick objects' attributes; anything else that the
  step touches and that existed before it (e.g. DDP's gradient buckets, held in C++) is found
  the first time an op reads or writes it, and counted from the start of the step, since it was
  live all along;
- storages created in the step are seen as op outputs (a ``TorchDispatchMode``). An output whose
  storage is already known is a view or an in-place result (``weight.t()``, ``buf.mul_()``) and
  costs nothing new.

A storage is released when it is freed: ``untyped_storage()`` returns the same Python object for
as long as the storage lives (PyTorch preserves it), so a weak finalizer on it fires exactly when
the memory goes back to the allocator. The breakdown is copied whenever the total reaches a new
high, so the peak and its parts are taken at the same instant and sum to it exactly.

What is not seen: memory a kernel allocates for itself and frees before returning (cuDNN/oneDNN
workspaces), allocator caching and fragmentation. The row's peak is therefore the allocator's
(``bench.training.allocator``), read in the same step; the ledger gives its parts, and the
difference is the row's ``untracked`` part.
"""
from __future__ import annotations

import contextlib
import types
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench.store.results import MEMORY_CATEGORIES as CATEGORIES
from bench.tricks.spec import Batch, StepFns, Trick


@dataclass
class MemoryReport:
    peak_memory_bytes: int
    breakdown: dict[str, int]  # CATEGORIES -> bytes live at the peak; sums to peak_memory_bytes
    # Most activation bytes live at any instant of the step (not necessarily at the peak): shows
    # forward-time transients, e.g. a ReLU's output beside its input when it is not in place.
    activations_high_water_bytes: int = 0
    live_at_start_bytes: int = 0  # the step's own storages that existed before it began


class _Record:
    __slots__ = ("nbytes", "category", "finalizer")

    def __init__(self, nbytes: int, category: str) -> None:
        self.nbytes, self.category = nbytes, category
        self.finalizer: weakref.finalize | None = None


class StorageLedger(TorchDispatchMode):
    """Live bytes per category of every storage on ``device``, and their values at the peak."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.live = dict.fromkeys(CATEGORIES, 0)
        self.total = 0
        self.peak = 0
        self.at_peak = dict(self.live)
        self.activations_high_water = 0
        self.live_at_start = 0  # bytes of the storages that existed before the step (add_existing)
        self.forward_depth = 0  # > 0 while some module's forward runs
        self.in_loop = False  # inside the loop's own forward/backward or optimizer step
        self._records: dict[int, _Record] = {}  # id(storage) -> record; ids are unique while alive

    # ---- registering storages ----
    def add_existing(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        """Storages live before the step (first label wins); counted as live since it began."""
        for storage in self._storages(tensors):
            if id(storage) not in self._records:
                record = self._record(storage, category)
                self.live_at_start += record.nbytes
                self.peak += record.nbytes  # live at every instant so far, so at the peak too
                self.at_peak[category] += record.nbytes

    def relabel(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        """What these storages are from now on (a gradient accumulated into .grad, new optimizer state)."""
        for storage in self._storages(tensors):
            record = self._records.get(id(storage))
            if record is None:
                self._new(storage, category)
            elif record.category != category:
                self.live[record.category] -= record.nbytes
                self.live[category] += record.nbytes
                record.category = category

    def _new(self, storage: torch.UntypedStorage, category: str) -> None:
        self._record(storage, category)
        self._check_peak()
        self.activations_high_water = max(self.activations_high_water, self.live["activations"])

    def _record(self, storage: torch.UntypedStorage, category: str) -> _Record:
        record = _Record(storage.nbytes(), category)
        key = id(storage)
        record.finalizer = weakref.finalize(storage, self._free, key)
        self._records[key] = record
        self.live[category] += record.nbytes
        self.total += record.nbytes
        return record

    def _free(self, key: int) -> None:
        record = self._records.pop(key)
        self.live[record.category] -= record.nbytes
        self.total -= record.nbytes

    def _check_peak(self) -> None:
        if self.total > self.peak:
            self.peak = self.total
            self.at_peak = dict(self.live)

    def _storages(self, tensors: Iterable[Any]) -> Iterator[torch.UntypedStorage]:
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.device.type != self.device.type:
                continue
            if self.device.index is not None and t.device.index != self.device.index:
                continue
            try:
                storage = t.untyped_storage()
            except (NotImplementedError, RuntimeError):  # sparse, nested, wrapper subclasses
                continue
            if storage.nbytes():
                yield storage

    # ---- the step ----
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        # An input never seen before existed before the step (it is not new: nothing made it).
        self.add_existing(tree_leaves((args, kwargs)), "trick_state")
        out = func(*args, **kwargs)
        for storage in self._storages(tree_leaves(out)):
            record = self._records.get(id(storage))
            if record is None:
                self._new(storage, self._category_of_new())
            elif record.nbytes != storage.nbytes():  # resized in place (out= arguments)
                grown = storage.nbytes() - record.nbytes
                record.nbytes += grown
                self.live[record.category] += grown
                self.total += grown
                self._check_peak()
        return out

    def _category_of_new(self) -> str:
        if self.forward_depth:
            return "activations"
        return "other" if self.in_loop else "trick_state"

    def in_loop_part(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """``fn`` with its allocations counted as the loop's (not a trick's) own."""

        def run() -> Any:
            outer, self.in_loop = self.in_loop, True
            try:
                return fn()
            finally:
                self.in_loop = outer

        return run

    def instrument(self, step: StepFns) -> StepFns:
        """Mark the loop's own step (before tricks wrap it): what tricks add outside is theirs."""
        return StepFns(self.in_loop_part(step.compute_grads), self.in_loop_part(step.apply_update))

    def close(self) -> None:
        """Stop following storages that outlive the step."""
        for record in self._records.values():
            record.finalizer.detach()
        self._records.clear()

    def report(self) -> MemoryReport:
        return MemoryReport(self.peak, dict(self.at_peak), self.activations_high_water, self.live_at_start)


def tensors_held_by(root: Any) -> Iterator[torch.Tensor]:
    """Every tensor reachable from ``root`` through attributes, dicts and sequences.

    Generic on purpose, so a new trick's state is found without the trick declaring it.
    """
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (type, types.ModuleType, types.FunctionType,
                                                               types.MethodType)):
            stack.extend(vars(obj).values())


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


@contextlib.contextmanager
def track_step_memory(model: nn.Module, optimizer: torch.optim.Optimizer, tricks: list[Trick],
                      batch: Batch, device: torch.device) -> Iterator[StorageLedger]:
    """Track the one training step run inside the block; ``ledger.report()`` afterwards.

    Run the step with ``instrument=ledger.instrument`` so allocations of trick code are told
    apart from the loop's own.
    """
    ledger = StorageLedger(device)
    params = [p for p in model.parameters()]
    ledger.add_existing(params, "parameters")
    ledger.add_existing(model.buffers(), "buffers")
    ledger.add_existing((p.grad for p in params if p.grad is not None), "gradients")
    ledger.add_existing(optimizer_state_tensors(optimizer), "optimizer_state")
    ledger.add_existing(batch, "other")
    ledger.add_existing(tensors_held_by(tricks), "trick_state")

    def enter_forward(*_: Any) -> None:
        ledger.forward_depth += 1

    def exit_forward(*_: Any) -> None:
        ledger.forward_depth -= 1

    hooks = [module_hooks.register_module_forward_pre_hook(enter_forward),
             module_hooks.register_module_forward_hook(exit_forward, always_call=True),
             optimizer.register_step_post_hook(
                 lambda *_: ledger.relabel(optimizer_state_tensors(optimizer), "optimizer_state"))]
    hooks += [p.register_post_accumulate_grad_hook(lambda p: ledger.relabel([p.grad], "gradients"))
              for p in params if p.requires_grad]
    try:
        with ledger:
            yield ledger
    finally:
        for hook in hooks:
            hook.remove()
        ledger.close()
