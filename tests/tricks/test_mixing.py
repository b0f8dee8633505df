"""MixUp and CutMix: the mixed batch is the stated mixture, the soft targets state λ, CutMix's box
has the area the targets say, mixing happens before accumulation splits the batch."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from bench.config.train_config import build_train_config
from bench.training.train import make_step
from bench.tricks.accumulation import Accumulation
from bench.tricks.mixing import MAX_ALPHA, MIN_ALPHA, CutMix, MixUp
from bench.tricks.spec import Batch, RunContext, Trick

CLASSES = 10
BATCH = 8


def batch(seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    # distinct labels, so every row of the soft targets shows both of its weights
    return torch.randn(BATCH, 3, 8, 8, generator=g, dtype=torch.float64), torch.randperm(CLASSES, generator=g)[:BATCH]


def set_up(trick: Trick, model: nn.Module | None = None, **tricks) -> Trick:
    config = build_train_config({"epochs": 1, **tricks}, "test")
    model = model or nn.Linear(1, 1)
    trick.setup(RunContext(torch.device("cpu"), model, torch.optim.SGD(model.parameters(), lr=0.1), config,
                           num_classes=CLASSES))
    return trick


def weights_of(targets: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight of each sample's own label, weight of its partner's label (sample i-1))."""
    rows = torch.arange(len(labels))
    return targets[rows, labels], targets[rows, labels.roll(1)]


@pytest.mark.parametrize("seed", range(5))
def test_mixup_blends_each_sample_with_its_partner_by_the_lambda_of_the_targets(seed):
    x, y = batch(seed)
    torch.manual_seed(seed)
    mixed, targets = set_up(MixUp(0.4), mixup=0.4).transform_batch((x, y))
    own, partner = weights_of(targets, y)
    lam = own[0].item()
    assert 0 < lam < 1
    assert_close(own, torch.full_like(own, lam))
    assert_close(partner, torch.full_like(own, 1 - lam))
    assert_close(targets.sum(dim=1), torch.ones(BATCH, dtype=targets.dtype))
    assert_close(mixed, lam * x + (1 - lam) * x.roll(1, 0))
    assert targets.dtype == x.dtype  # the inputs' float dtype: cross-entropy takes them as probabilities
    logits = torch.randn(BATCH, CLASSES, dtype=torch.float64)
    assert_close(F.cross_entropy(logits, targets), -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean())


@pytest.mark.parametrize("seed", range(8))
def test_cutmix_box_area_is_one_minus_the_lambda_of_the_targets(seed):
    x, y = batch(seed)
    torch.manual_seed(seed)
    mixed, targets = set_up(CutMix(1.0), cutmix=1.0).transform_batch((x, y))
    own, partner = weights_of(targets, y)
    lam = own[0].item()
    assert_close(partner, torch.full_like(own, 1 - lam))
    pasted = (mixed != x).any(dim=1)  # (N, H, W): pixels that came from the partner
    assert torch.equal(pasted, pasted[:1].expand_as(pasted))  # the same box in every sample
    box = pasted[0]
    rows, cols = box.any(dim=1).nonzero().flatten(), box.any(dim=0).nonzero().flatten()
    if len(rows):  # a rectangle: every pixel between its first and last row and column
        assert box[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all() and box.sum() == len(rows) * len(cols)
    assert box.float().mean().item() == pytest.approx(1 - lam)
    assert torch.equal(mixed[:, :, box], x.roll(1, 0)[:, :, box]) and torch.equal(mixed[:, :, ~box], x[:, :, ~box])


def test_some_cutmix_boxes_are_nonempty():
    """The area test above is not satisfied vacuously by empty boxes."""
    areas = []
    for seed in range(8):
        torch.manual_seed(seed)
        x, y = batch(seed)
        mixed, _ = set_up(CutMix(1.0), cutmix=1.0).transform_batch((x, y))
        areas.append((mixed != x).any(dim=1)[0].float().mean().item())
    assert sum(a > 0 for a in areas) >= 4


def kind_of_mixing(x: torch.Tensor, mixed: torch.Tensor) -> str:
    changed = (mixed != x).any(dim=1)[0]
    return "mixup" if changed.all() else "cutmix"


def test_both_on_mixup_trick_picks_one_per_batch_and_cutmix_trick_stands_aside():
    cutmix = set_up(CutMix(1.0), mixup=0.4, cutmix=1.0)
    x, y = batch()
    assert cutmix.transform_batch((x, y)) == (x, y)
    mixup = set_up(MixUp(0.4), mixup=0.4, cutmix=1.0)
    torch.manual_seed(0)
    kinds = [kind_of_mixing(x, mixup.transform_batch((x, y))[0]) for _ in range(200)]
    # Binomial(200, 1/2): 100 ± 7 (one sd); allow 4 sd. A CutMix box covering the whole image
    # would count as mixup, which Beta(1, 1) makes vanishingly rare.
    assert 72 <= kinds.count("mixup") <= 128


class BatchProbe(Trick):
    """Records the batch as the tricks before it left it."""

    name, description, values_help, default = "batch_probe", "test only", "-", None

    def transform_batch(self, batch: Batch) -> Batch:
        self.seen = batch
        return batch


@pytest.mark.parametrize("name", ["mixup", "cutmix"])
def test_accumulated_gradient_equals_the_gradient_of_the_unsplit_mixed_batch(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 8 * 8, CLASSES))
    model = model.double()
    reference = copy.deepcopy(model)
    mixing = set_up((MixUp if name == "mixup" else CutMix)(1.0), model, **{name: 1.0})
    probe, accumulation = BatchProbe(None), Accumulation(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    loss = make_step(model, opt, [mixing, probe, accumulation], batch()).compute_grads()
    mixed, targets = probe.seen
    assert len(seen) == 2 and torch.equal(torch.cat(seen), mixed)  # two micro-batches of the mixed batch
    assert not torch.equal(mixed, batch()[0])
    ref_loss = F.cross_entropy(reference(mixed), targets)
    ref_loss.backward()
    assert_close(loss, ref_loss.detach().float())
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert_close(p.grad, q.grad)


@pytest.mark.parametrize("value", [0, -1.0, True, "0.2", float("inf"), [0.2]])
@pytest.mark.parametrize("cls", [MixUp, CutMix])
def test_parse_rejects(cls, value):
    with pytest.raises(ValueError, match="alpha > 0"):
        cls.parse(value)


def test_parse_accepts():
    assert MixUp.parse(None) is None and MixUp.parse(1) == 1.0 and CutMix.parse(0.2) == 0.2
    assert MixUp.parse(MIN_ALPHA) == MIN_ALPHA and CutMix.parse(MAX_ALPHA) == MAX_ALPHA


@pytest.mark.parametrize("value", [0.005, 1e-5, 1e-50, 1e39])
@pytest.mark.parametrize("cls", [MixUp, CutMix])
def test_parse_rejects_alphas_torch_cannot_sample(cls, value):
    with pytest.raises(ValueError, match=r"is outside \[0.01, 1e\+06\]"):
        cls.parse(value)


def test_the_bound_is_where_torchs_beta_sampling_stops_giving_the_half_artefact():
    """Both float32 Gamma draws underflow for small alpha and torch returns lambda = 0.5 exactly,
    where the true Beta(a, a) has almost all its mass at 0 and 1 (bench/tricks/mixing.py)."""
    torch.manual_seed(0)

    def halves(alpha: float) -> int:
        return int((torch.distributions.Beta(torch.tensor([alpha]), torch.tensor([alpha])).sample((20_000,)) == 0.5).sum())
    assert halves(0.003) > 50 and halves(1e-5) > 19_000
    assert halves(MIN_ALPHA) == 0
