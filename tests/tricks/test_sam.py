"""SAM: two passes per step, the update from the perturbed gradient applied at the original weights."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from bench.config.train_config import build_train_config
from bench.training.train import run_step
from bench.tricks.accumulation import Accumulation
from bench.tricks.sam import SAM
from bench.tricks.spec import RunContext

RHO = 0.5  # large, so the perturbed gradient differs clearly from the plain one
LR = 0.1
BATCH = 8


def bn_free_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)
    ).double()


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 5),
    ).double()


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (BATCH,), generator=g)


def with_tricks(model: nn.Module, tricks: list, **sgd) -> torch.optim.Optimizer:
    opt = torch.optim.SGD(model.parameters(), lr=LR, **sgd)
    for t in tricks:
        t.setup(RunContext(device=torch.device("cpu"), model=model, optimizer=opt, config=None))
    return opt


def full_batch_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def reference_sam_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """By hand: (loss at w, SAM's new weights, plain SGD's new weights)."""
    model = copy.deepcopy(model)
    w = [p.detach().clone() for p in model.parameters()]
    loss, g1 = full_batch_grads(model, x, y)
    norm = torch.sqrt(sum((g ** 2).sum() for g in g1))  # one global norm over all parameters
    with torch.no_grad():
        for p, w0, g in zip(model.parameters(), w, g1):
            p.copy_(w0 + RHO * g / norm)
    _, g2 = full_batch_grads(model, x, y)
    sam = [w0 - LR * g for w0, g in zip(w, g2)]
    sgd = [w0 - LR * g for w0, g in zip(w, g1)]
    return loss, sam, sgd


class PassCounter:
    """Forward passes (with their batch sizes) and backward passes through a model."""

    def __init__(self, model: nn.Module) -> None:
        self.forwards: list[int] = []
        self.backwards = 0
        model.register_forward_hook(lambda m, args, out: self.forwards.append(args[0].shape[0]))
        first = next(model.parameters())  # gets a gradient once per backward pass
        first.register_hook(self._count_backward)

    def _count_backward(self, grad: torch.Tensor) -> None:
        self.backwards += 1


@pytest.mark.parametrize("k", [1, 2])
def test_two_forward_and_two_backward_passes_per_micro_batch(k):
    model = bn_free_net()
    tricks = ([Accumulation(k)] if k > 1 else []) + [SAM(0.05)]
    opt = with_tricks(model, tricks)
    counter = PassCounter(model)
    run_step(model, opt, tricks, batch())
    assert counter.forwards == [BATCH // k] * (2 * k)
    assert counter.backwards == 2 * k


@pytest.mark.parametrize("k", [1, 2, 4])
def test_update_equals_hand_computed_sam_step(k):
    """Covers: global-norm perturbation, gradient taken at w+e, step applied from w (not w+e),
    and, with k > 1, accumulation of both passes over the micro-batches."""
    model = bn_free_net()
    x, y = batch()
    ref_loss, expected, plain_sgd = reference_sam_step(model, x, y)

    tricks = ([Accumulation(k)] if k > 1 else []) + [SAM(RHO)]
    opt = with_tricks(model, tricks)
    loss = run_step(model, opt, tricks, (x, y))

    assert_close(loss, ref_loss.float())  # the loss reported is the one at the unperturbed w
    for p, e, _ in zip(model.parameters(), expected, plain_sgd, strict=True):
        assert_close(p.detach(), e)
    assert any(not torch.allclose(e, s) for e, s in zip(expected, plain_sgd))  # SAM ≠ plain SGD here


def test_two_steps_with_momentum_and_weight_decay_match_reference():
    """The base optimizer sees only the second gradient and the restored weights w (weight decay
    makes the step depend on them: stepping at w + e and subtracting e afterwards is wrong);
    its state carries over between steps."""
    model = bn_free_net()
    reference = copy.deepcopy(model)
    tricks = [SAM(RHO)]
    opt = with_tricks(model, tricks, momentum=0.9, weight_decay=0.5)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=LR, momentum=0.9, weight_decay=0.5)
    for seed in (1, 2):
        x, y = batch(seed)
        run_step(model, opt, tricks, (x, y))
        # reference: gradient at w + e, then the momentum step from w
        w = [p.detach().clone() for p in reference.parameters()]
        _, g1 = full_batch_grads(reference, x, y)
        norm = torch.sqrt(sum((g ** 2).sum() for g in g1))
        with torch.no_grad():
            for p, _, g in zip(reference.parameters(), w, g1):
                p.add_(RHO * g / norm)
        full_batch_grads(reference, x, y)
        with torch.no_grad():
            for p, w0 in zip(reference.parameters(), w):
                p.copy_(w0)
        ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert_close(p, q)


def test_batchnorm_statistics_move_once_per_step():
    model = bn_net()
    plain = copy.deepcopy(model)
    x, y = batch()
    tricks = [SAM(RHO)]
    opt = with_tricks(model, tricks)
    run_step(model, opt, tricks, (x, y))
    with torch.no_grad():
        plain.train()(x)  # one forward in training mode from the same initial state
    bn, ref = model[1], plain[1]
    assert not torch.equal(ref.running_mean, torch.zeros_like(ref.running_mean))
    assert_close(bn.running_mean, ref.running_mean)
    assert_close(bn.running_var, ref.running_var)
    assert bn.num_batches_tracked.item() == 1
    assert bn.momentum == ref.momentum  # the freeze is undone after the second pass


def test_check_rejects_fp16():
    fp16 = build_train_config({"epochs": 1, "precision": "fp16"}, "x")
    with pytest.raises(ValueError, match="fp16"):
        SAM.check(0.05, fp16)
    SAM.check(None, fp16)  # SAM off: fine
    SAM.check(0.05, build_train_config({"epochs": 1, "precision": "bf16"}, "x"))
    SAM.check(0.05, build_train_config({"epochs": 1}, "x"))


@pytest.mark.parametrize("value", [0, -0.1, True, "0.05"])
def test_parse_rejects(value):
    with pytest.raises(ValueError):
        SAM.parse(value)


def test_parse_accepts():
    assert SAM.parse(None) is None
    assert SAM.parse(1) == 1.0 and isinstance(SAM.parse(1), float)
