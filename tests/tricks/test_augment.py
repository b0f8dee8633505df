"""augment: what each policy does to a training image, that the eval split is never touched, and
that the image is augmented in [0, 1] and normalized again."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.base.errors import ConfigError
from bench.config.train_config import build_train_config
from bench.parts.data import build_dataset
from bench.training.train import prepare_run
from bench.tricks import TRICKS
from bench.tricks.augment import CHOICES, augmentation

CPU = torch.device("cpu")
SIZE = 16
PAD = SIZE // 8


def digits_config(augment) -> object:
    return build_train_config({"model": "tiny_cnn", "dataset": "digits", "image_size": SIZE, "batch_size": 64,
                               "steps": 5, "augment": augment}, "test")


def shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``image`` moved by (dy, dx) pixels, zeros shifted in: what pad-by-p-then-crop produces."""
    padded = F.pad(image, (PAD, PAD, PAD, PAD))
    return padded[:, PAD - dy:PAD - dy + SIZE, PAD - dx:PAD - dx + SIZE]


def matching_shifts(augmented: torch.Tensor, raw: torch.Tensor) -> list[tuple[int, int, bool]]:
    """Every (dy, dx, mirrored) within the padding that turns ``raw`` into ``augmented``."""
    return [(dy, dx, mirrored) for dy in range(-PAD, PAD + 1) for dx in range(-PAD, PAD + 1)
            for mirrored in (False, True)
            if torch.allclose(shifted(raw.flip(-1) if mirrored else raw, dy, dx), augmented, atol=1e-5)]


def test_parse_keeps_the_old_boolean_meaning_and_names_the_values():
    cls = TRICKS.get("augment")
    assert cls.parse(True) == "basic" and cls.parse(False) == "none"
    assert [cls.parse(v) for v in CHOICES] == CHOICES
    with pytest.raises(ConfigError, match="augment: 'trivial' is not one of none, basic, autoaugment, randaugment, "
                                          "trivialaugment"):
        build_train_config({"epochs": 1, "augment": "trivial"}, "m.yaml")
    assert build_train_config({"epochs": 1, "augment": True}, "m.yaml").to_dict()["augment"] == "basic"


def test_basic_is_a_shift_within_the_padding_and_flips_only_where_allowed():
    torch.manual_seed(0)
    image = torch.rand(3, SIZE, SIZE)  # no symmetry: each result has exactly one explanation
    for flip in (False, True):
        pipeline = augmentation("basic", SIZE, SIZE, flip)
        found = [matching_shifts(pipeline(image), image) for _ in range(200)]
        assert all(len(f) == 1 for f in found)
        mirrored = sum(f[0][2] for f in found) / len(found)
        shifts = {f[0][:2] for f in found}
        assert len(shifts) > (2 * PAD + 1) ** 2 / 2  # the crop position is random, not fixed
        if flip:
            assert 0.4 < mirrored < 0.6  # RandomHorizontalFlip's p = 0.5; 200 draws: sd 0.035
        else:
            assert mirrored == 0


def test_eval_split_is_never_augmented_and_train_samples_are():
    torch.manual_seed(0)
    raw = build_dataset(digits_config("none"))
    run = prepare_run(digits_config("trivialaugment"), seed=0, device=CPU)
    assert run.splits.test is not raw.test
    assert torch.equal(run.splits.test.tensors[0], raw.test.tensors[0])  # the eval set reads the stored tensors
    test_again = torch.stack([run.splits.test[i][0] for i in range(20)])
    assert torch.equal(test_again, raw.test.tensors[0][:20])  # and every access returns them unchanged
    changed = 0
    for i in range(50):
        x, y = run.splits.train[i]
        raw_x, raw_y = raw.train[i]
        assert x.shape == raw_x.shape and x.dtype == raw_x.dtype and y == raw_y
        changed += not torch.allclose(x, raw_x)
    assert changed >= 45  # a shift of (0, 0) and an identity op together are rare


@pytest.mark.parametrize("policy", ["basic", "autoaugment", "randaugment", "trivialaugment"])
def test_policies_augment_images_in_unit_range_and_normalize_again(policy):
    """The policies assume images in [0, 1]: augmented samples, un-normalized with the dataset's
    statistics, must lie in [0, 1], and the normalized batch keeps roughly zero mean, unit std
    (without un-normalizing first, the re-normalization alone moves the mean by mean/std ≈ -1)."""
    torch.manual_seed(0)
    run = prepare_run(digits_config(policy), seed=0, device=CPU)
    (mean, *_), (std, *_) = run.splits.normalization
    batch = torch.stack([run.splits.train[i][0] for i in range(200)])
    images = batch * std + mean
    assert images.min() >= -1e-5 and images.max() <= 1 + 1e-5
    assert abs(batch.mean().item()) < 0.3 and 0.6 < batch.std().item() < 1.3
    assert torch.equal(batch[:, 0], batch[:, 2])  # grey stays grey: colour ops act alike on equal channels


def test_augmented_loader_in_workers_draws_new_augmentations_each_epoch():
    run = prepare_run(digits_config("basic"), seed=0, device=CPU)
    loader = torch.utils.data.DataLoader(run.splits.train, batch_size=32, num_workers=2, shuffle=False)
    first, second = (next(iter(loader))[0] for _ in range(2))
    assert first.shape == (32, 3, SIZE, SIZE) and not torch.equal(first, second)


def test_basic_never_mirrors_digits():
    torch.manual_seed(0)
    raw = build_dataset(digits_config("none"))
    run = prepare_run(digits_config("basic"), seed=0, device=CPU)
    (mean, *_), (std, *_) = raw.normalization
    for i in range(40):
        found = matching_shifts(run.splits.train[i][0] * std + mean, raw.train[i][0] * std + mean)
        assert any(not mirrored for *_, mirrored in found), f"sample {i} is not an unmirrored shift"
