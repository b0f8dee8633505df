"""optimizer_impl: the optimizer is built with the implementation flag, and every implementation
takes the same steps (up to floating-point rounding)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

from bench.config.train_config import build_train_config
from bench.parts.models import build_model
from bench.training.train import build_optimizer, build_tricks, run_step
from bench.tricks.optimizer_impl import OptimizerImpl

OPTIMIZERS = {"sgd": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True},
              "adamw": {"name": "adamw", "lr": 0.01, "weight_decay": 0.05}}
FLAGS = {"default": {}, "for_loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def config(impl: str, optimizer: str):
    return build_train_config({"model": "tiny_cnn", "dataset": "synthetic", "image_size": 8, "batch_size": 8,
                               "steps": 6, "optimizer": OPTIMIZERS[optimizer], "optimizer_impl": impl}, "test")


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("impl", list(FLAGS))
def test_defaults_carry_the_flag(impl, optimizer):
    cfg = config(impl, optimizer)
    opt = build_optimizer(cfg, build_model("tiny_cnn", 10), build_tricks(cfg))
    for key in ("foreach", "fused"):  # the flag asked for; torch's choice (None) for the other
        assert opt.defaults[key] == FLAGS[impl].get(key), key


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_implementations_take_the_same_steps(optimizer):
    torch.manual_seed(0)
    start = build_model("tiny_cnn", 10).train()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(4)]
    params = {}
    for impl in ("for_loop", "foreach", "fused"):
        cfg = config(impl, optimizer)
        model = copy.deepcopy(start)
        opt = build_optimizer(cfg, model, build_tricks(cfg))
        for batch in batches:
            run_step(model, opt, [], batch)
        params[impl] = [p.detach().clone() for p in model.parameters()]
    moved = max((a - b).abs().max().item() for a, b in zip(params["for_loop"], start.parameters()))
    assert moved > 1e-3  # the steps did something, so agreeing means something
    for impl in ("foreach", "fused"):
        for a, b in zip(params["for_loop"], params[impl], strict=True):
            assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_runs_the_fused_kernel(monkeypatch):
    import torch.optim.sgd as sgd_module

    calls = []
    real = sgd_module._fused_sgd
    monkeypatch.setattr(sgd_module, "_fused_sgd", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    cfg = config("fused", "sgd")
    model = build_model("tiny_cnn", 10)
    opt = build_optimizer(cfg, model, build_tricks(cfg))
    run_step(model, opt, [], (torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))))
    assert calls


def test_fused_is_rejected_where_torch_has_no_kernel(monkeypatch):
    import bench.tricks.optimizer_impl as module

    monkeypatch.setattr(module, "fused_devices", lambda: ["cuda"])
    with pytest.raises(ValueError, match="no kernel for device 'cpu'"):
        OptimizerImpl.check("fused", config("fused", "sgd").__class__(device="cpu"))


def test_parse_rejects_unknown():
    with pytest.raises(ValueError, match="default, for_loop, foreach, fused.*did you mean 'fused'"):
        OptimizerImpl.parse("fuse")
