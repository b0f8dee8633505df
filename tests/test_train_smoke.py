"""Every registered trick trains end to end on CPU, and a run is reproducible from its seed."""
from __future__ import annotations

import math

import pytest
import torch

from bench.config.train_config import build_train_config
from bench.training.train import train
from bench.tricks import TRICKS

CPU = torch.device("cpu")
STEPS, WARMUP = 6, 1

# A representative non-default value per registered trick. A trick registered without an entry
# here fails test_every_trick_has_a_smoke_value and its own smoke case.
SMOKE_VALUES: dict[str, list] = {
    "accumulation": [2],
    "checkpointing": [True],
    "precision": ["bf16", "fp16"],
    "sam": [0.05],
    "ema": [0.9],
    "augment": ["trivialaugment"],
    "world_size": [],  # W > 1 needs W processes: tests/test_ddp.py
    "grad_clip": [{"norm": 0.5}, {"value": 0.01}],
    "grad_centralization": [True],
    "lookahead": [{"k": 2, "alpha": 0.5}],
    "zero_init_residual": [True],
    "stochastic_depth": [0.2],
    "no_decay_bn_bias": [True],
    "attention": ["math", "sdpa", {"chunked": 2}],
    "label_smoothing": [0.1],
    "mixup": [0.2],
    "cutmix": [1.0],
    "input_grad_penalty": [0.01],
    "progressive_resizing": [{"start": 0.5, "end": 1.0, "until": 0.75}],
    "channels_last": [True],
    "inplace_activations": [False],
    "optimizer_impl": ["for_loop", "foreach", "fused"],
    "zero_grad": ["zeros"],
    "cudnn_benchmark": [True],
    "compile": ["default"],
}
# Tricks that need another model than tiny_cnn (check() rejects it).
SMOKE_MODELS = {"zero_init_residual": "resnet18_cifar", "stochastic_depth": "resnet18_cifar", "attention": "vit_tiny"}
SKIPPED = {"world_size": "world_size > 1 needs one process per rank: trained under gloo in tests/test_ddp.py"}
MISSING = object()


def smoke_cases() -> list:
    cases = []
    for name in TRICKS.names():
        if name in SKIPPED:
            cases.append(pytest.param(name, None, id=name, marks=pytest.mark.skip(reason=SKIPPED[name])))
            continue
        for value in SMOKE_VALUES.get(name) or [MISSING]:
            cases.append(pytest.param(name, value, id=f"{name}={value}"))
    return cases


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def tiny_config(model="tiny_cnn", **tricks):
    return build_train_config({"model": model, "dataset": "synthetic", "num_samples": 64, "image_size": 8,
                               "batch_size": 16, "steps": STEPS, "warmup_steps": WARMUP, **tricks}, "test")


def assert_sane(metrics: dict) -> None:
    assert math.isfinite(metrics["final_train_loss"])
    assert metrics["throughput_samples_per_s"] > 0
    assert metrics["peak_memory_bytes"] > 0
    assert len(metrics["step_times_ms"]) == STEPS - WARMUP - 2  # less the memory and FLOP steps
    assert metrics["steps"] == STEPS
    assert metrics["curve"] and all(math.isfinite(p["train_loss"]) for p in metrics["curve"])


def test_every_trick_has_a_smoke_value():
    missing = [n for n in TRICKS.names() if not SMOKE_VALUES.get(n) and n not in SKIPPED]
    assert not missing, f"registered tricks without a smoke-test value: {missing}"


@pytest.mark.parametrize("name, value", smoke_cases())
def test_trick_trains(name, value):
    assert value is not MISSING, f"trick {name!r} has no value in SMOKE_VALUES"
    cls = TRICKS.get(name)
    assert cls.parse(value) == value and value != cls.default
    config = tiny_config(SMOKE_MODELS.get(name, "tiny_cnn"), **{name: value})
    cls.check(config.tricks[name], config)  # a representative value must pass its own check
    assert_sane(train(config, seed=0, device=CPU))


def test_baseline_trains():
    assert_sane(train(tiny_config(), seed=0, device=CPU))


def test_compatible_tricks_train_together():
    config = tiny_config(accumulation=2, checkpointing=True, precision="bf16", sam=0.05, ema=0.9)
    for entry in TRICKS:
        entry.obj.check(config.tricks[entry.name], config)
    assert_sane(train(config, seed=0, device=CPU))


def determinism_config(**tricks):
    # 1437 digits training images // 512 = 2 batches per epoch: 5 steps cross two reshuffles
    return build_train_config({"model": "tiny_cnn", "dataset": "digits", "image_size": 8, "batch_size": 512,
                               "steps": 5, "warmup_steps": 1, **tricks}, "test")


def test_same_seed_same_run():
    config = determinism_config()
    runs = [train(config, seed=0, device=CPU) for _ in range(2)]
    curves = [[p["train_loss"] for p in r["curve"]] for r in runs]
    assert len(curves[0]) == 3
    assert curves[0] == curves[1]  # bit-identical, not merely close
    assert runs[0]["final_train_loss"] == runs[1]["final_train_loss"]
    assert [p["accuracy_top1"] for p in runs[0]["curve"]] == [p["accuracy_top1"] for p in runs[1]["curve"]]

    other = train(config, seed=1, device=CPU)  # the seed matters, so equality above means something
    assert other["final_train_loss"] != runs[0]["final_train_loss"]


def test_time_to_target_is_the_first_epoch_reaching_it():
    import torch

    from bench.config.train_config import build_train_config
    from bench.training.train import train

    base = {"model": "tiny_cnn", "dataset": "digits", "image_size": 8, "batch_size": 512, "epochs": 2,
            "warmup_steps": 1}
    reached = train(build_train_config({**base, "target_accuracy": 0.0}, "t"), 0, torch.device("cpu"))
    assert reached["time_to_target_s"] == reached["curve"][0]["train_time_s"]
    never = train(build_train_config({**base, "target_accuracy": 1.0}, "t"), 0, torch.device("cpu"))
    assert never["time_to_target_s"] is None or never["accuracy_top1"] == 1.0
    unset = train(build_train_config(base, "t"), 0, torch.device("cpu"))
    assert unset["time_to_target_s"] is None


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gradient_and_resnet_tricks_train_with_half_precision_and_accumulation(precision):
    config = tiny_config("resnet18_cifar", precision=precision, accumulation=2, checkpointing=True,
                         grad_clip={"norm": 0.5}, grad_centralization=True, lookahead={"k": 2, "alpha": 0.5},
                         zero_init_residual=True, stochastic_depth=0.2, no_decay_bn_bias=True,
                         optimizer={"weight_decay": 1e-4})
    for entry in TRICKS:
        entry.obj.check(config.tricks[entry.name], config)
    metrics = train(config, seed=0, device=CPU)
    assert_sane(metrics)
    assert 0 < metrics["grad_norm_median"] <= metrics["grad_norm_max"] < math.inf
    assert 0 <= metrics["grad_clip_fraction"] <= 1
