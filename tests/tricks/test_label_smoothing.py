"""Label smoothing: the loss equals its closed form, for class-index and probability targets."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from bench.training.train import make_step
from bench.tricks.label_smoothing import LabelSmoothing
from bench.tricks.spec import RunContext

EPS = 0.2
LOGITS = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], dtype=torch.float64)
LABELS = torch.tensor([0, 1])


def neg_log_softmax_by_hand(logits: torch.Tensor) -> torch.Tensor:
    """-log p_k = log Σ_j e^z_j - z_k, written out (no torch loss function involved)."""
    return torch.log(torch.exp(logits).sum(dim=1, keepdim=True)) - logits


def test_loss_with_class_indices_equals_the_closed_form():
    nll = neg_log_softmax_by_hand(LOGITS)
    k = LOGITS.shape[1]
    # (1 - ε)·(-log p_y) + ε·mean_k(-log p_k), averaged over the batch
    by_hand = sum((1 - EPS) * nll[i, y] + EPS * nll[i].sum() / k for i, y in enumerate(LABELS.tolist())) / 2
    smoothed = LabelSmoothing(EPS).criterion(F.cross_entropy)(LOGITS, LABELS)
    assert_close(smoothed, by_hand)
    assert not torch.allclose(smoothed, F.cross_entropy(LOGITS, LABELS))  # the smoothing changes something


def test_loss_with_probability_targets_equals_the_closed_form():
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.25, 0.75]], dtype=torch.float64)  # as mixup makes them
    k = LOGITS.shape[1]
    by_hand = (((1 - EPS) * soft + EPS / k) * neg_log_softmax_by_hand(LOGITS)).sum(dim=1).mean()
    assert_close(LabelSmoothing(EPS).criterion(F.cross_entropy)(LOGITS, soft), by_hand)


def test_the_loop_uses_the_smoothed_loss():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trick = LabelSmoothing(EPS)
    trick.setup(RunContext(torch.device("cpu"), model, opt, None))
    loss = make_step(model, opt, [trick], (x, y)).compute_grads()
    nll = neg_log_softmax_by_hand(model(x).detach())
    by_hand = ((1 - EPS) * nll[torch.arange(6), y] + EPS * nll.mean(dim=1)).mean()
    assert_close(loss, by_hand.float())


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, True, "0.1", None, math.nan])
def test_parse_rejects(value):
    with pytest.raises(ValueError, match="eps in"):
        LabelSmoothing.parse(value)


def test_parse_accepts_and_zero_is_off():
    assert LabelSmoothing.parse(0) == 0.0 and not LabelSmoothing.is_active(0.0)
    assert LabelSmoothing.parse(0.1) == 0.1 and LabelSmoothing.is_active(0.1)
