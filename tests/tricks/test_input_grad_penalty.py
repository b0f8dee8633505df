"""Input-gradient penalty: loss + λ·mean_i ‖∂ℓ_i/∂x_i‖², checked against the closed form of a
linear classifier; its double backward shows in the FLOP count; it composes with accumulation and
checkpointing."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close
from torch.utils.flop_counter import FlopCounterMode

from bench.parts.models import build_model
from bench.training.train import make_step, run_step
from bench.tricks.accumulation import Accumulation
from bench.tricks.checkpointing import apply_checkpointing
from bench.tricks.input_grad_penalty import InputGradPenalty
from bench.tricks.spec import RunContext

LAMBDA = 0.7
CPU = torch.device("cpu")


def linear_problem() -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    return model, torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 1, 0])


def closed_form_loss(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CE + λ·mean_i ‖Wᵀ(softmax(W x_i + b) - onehot(y_i))‖²: the input gradient of a linear
    classifier's cross-entropy, written out (no autograd through the loss)."""
    p = torch.softmax(x @ weight.T + bias, dim=1)
    residual = p - F.one_hot(y, p.shape[1]).to(p.dtype)
    ce = -torch.log(p[torch.arange(len(y)), y]).mean()
    return ce + LAMBDA * (residual @ weight).pow(2).sum(dim=1).mean()


def step_with(tricks, model, batch):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for t in tricks:
        t.setup(RunContext(CPU, model, opt, None))
    return make_step(model, opt, tricks, batch).compute_grads()


def test_loss_and_gradients_equal_the_closed_form_on_a_linear_model():
    model, x, y = linear_problem()
    loss = step_with([InputGradPenalty(LAMBDA)], model, (x, y))
    weight, bias = (p.detach().clone().requires_grad_(True) for p in (model.weight, model.bias))
    reference = closed_form_loss(weight, bias, x, y)
    reference.backward()  # differentiates the written-out penalty: no double backward involved
    assert_close(loss, reference.detach().float())
    assert_close(model.weight.grad, weight.grad)
    assert_close(model.bias.grad, bias.grad)
    plain = F.cross_entropy(model(x), y)
    assert loss.item() > plain.item() + 1e-3  # the penalty is really there


def test_penalty_is_a_per_sample_mean_so_accumulation_gives_the_unsplit_gradient():
    model, x, y = linear_problem()
    reference = copy.deepcopy(model)
    loss = step_with([InputGradPenalty(LAMBDA), Accumulation(3)], model, (x, y))
    ref_loss = step_with([InputGradPenalty(LAMBDA)], reference, (x, y))
    assert_close(loss, ref_loss)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert_close(p.grad, q.grad)


def test_double_backward_works_through_non_reentrant_checkpointing():
    torch.manual_seed(0)
    model = build_model("tiny_cnn", 10).double()
    checkpointed = apply_checkpointing(copy.deepcopy(model))
    g = torch.Generator().manual_seed(1)
    batch = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (4,), generator=g)
    loss = step_with([InputGradPenalty(LAMBDA)], model, batch)
    ckpt_loss = step_with([InputGradPenalty(LAMBDA)], checkpointed, batch)
    assert_close(loss, ckpt_loss)
    for p, q in zip(model.parameters(), checkpointed.parameters(), strict=True):
        assert_close(p.grad, q.grad)
    norms = [[m for m in net.modules() if isinstance(m, nn.BatchNorm2d)] for net in (model, checkpointed)]
    for m, c in zip(*norms, strict=True):  # the recomputations left BN statistics alone
        assert_close(m.running_mean, c.running_mean)


def step_flops(value: float) -> int:
    torch.manual_seed(0)
    model = build_model("tiny_cnn", 10)
    tricks = [InputGradPenalty(value)] if value else []
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    with FlopCounterMode(display=False) as counter:
        run_step(model, opt, tricks, batch)
    return counter.get_total_flops()


def test_double_backward_shows_in_the_flop_count():
    plain, penalised = step_flops(0.0), step_flops(LAMBDA)
    # A plain step is forward + backward (≈ 3 forwards); the penalty adds the backward's own
    # forward-mode graph and its backward: at least half again.
    assert penalised > 1.5 * plain


@pytest.mark.parametrize("value", [-0.1, True, "0.1", None, math.inf, math.nan])
def test_parse_rejects(value):
    with pytest.raises(ValueError, match="lambda >= 0"):
        InputGradPenalty.parse(value)


def test_parse_accepts_and_zero_is_off():
    assert InputGradPenalty.parse(0) == 0.0 and not InputGradPenalty.is_active(0.0)
    assert InputGradPenalty.parse(1) == 1.0


class Attend(nn.Module):
    """Self-attention over the 3 channels of a 4x4 image as tokens; logits of 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2)
        return self.attention(tokens, tokens, tokens, need_weights=False)[0].mean(dim=2)


def test_attention_is_differentiated_twice():
    """CPU's fused (flash) attention kernel has no double backward; the trick runs attention in
    its math form, so an attention model trains with the penalty."""
    torch.manual_seed(0)
    model = Attend()
    batch = torch.randn(4, 3, 4, 4), torch.randint(0, 3, (4,))
    step_with([InputGradPenalty(LAMBDA)], model, batch)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
