"""Precision: autocast dtypes, fp16 loss scaling that skips non-finite steps, the TF32 switches."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from bench.training.train import make_step
from bench.tricks.precision import Precision
from bench.tricks.spec import RunContext

CPU = torch.device("cpu")


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)


def set_up(value: str, model: nn.Module) -> tuple[Precision, torch.optim.Optimizer]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trick = Precision(value)
    trick.setup(RunContext(device=CPU, model=model, optimizer=opt, config=None))
    return trick, opt


@pytest.fixture(autouse=True)
def restore_tf32_flags():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("value, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                          ("fp32", torch.float32), ("tf32", torch.float32)])
def test_conv_output_dtype(value, dtype):
    model = net()
    trick, opt = set_up(value, model)
    seen = []
    model[0].register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    with trick.forward_context():
        model(batch()[0])
    make_step(model, opt, [trick], batch()).compute_grads()  # the loop enters the context too
    assert seen == [dtype, dtype]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32


def test_fp16_skips_step_with_non_finite_gradients():
    model = net()
    trick, opt = set_up("fp16", model)
    before = [p.detach().clone() for p in model.parameters()]
    scale = trick.scaler.get_scale()
    handle = model[0].weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    step = make_step(model, opt, [trick], batch())
    step.compute_grads()
    step.apply_update()
    handle.remove()
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)  # the whole step is skipped, not only the bad tensor
    assert trick.scaler.get_scale() < scale


def test_fp16_normal_step_is_unscaled_sgd_step():
    model = net()
    reference = copy.deepcopy(model)
    trick, opt = set_up("fp16", model)
    scale = trick.scaler.get_scale()
    assert scale > 1  # the loss really is scaled
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch()
    step = make_step(model, opt, [trick], (x, y))
    loss = step.compute_grads()
    step.apply_update()
    assert trick.scaler.get_scale() == scale  # no overflow: scale kept

    # Reference: the same fp16 autocast pass without any scaling. The scale is a power of two,
    # so scaling then unscaling is exact: the optimizer must see exactly this gradient.
    with torch.autocast("cpu", dtype=torch.float16):
        ref_loss = F.cross_entropy(reference(x), y)
    ref_loss.backward()
    assert_close(loss, ref_loss.detach().float())
    for p, b, r in zip(model.parameters(), before, reference.parameters(), strict=True):
        assert not torch.equal(p, b)
        assert_close(p.grad, r.grad)  # left unscaled in place by scaler.step
        assert_close(p.detach(), b - 0.1 * r.grad)


def test_tf32_switches():
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    set_up("tf32", net())
    assert torch.backends.cudnn.allow_tf32 is True
    assert torch.backends.cuda.matmul.allow_tf32 is True
    set_up("fp32", net())
    assert torch.backends.cudnn.allow_tf32 is False
    assert torch.backends.cuda.matmul.allow_tf32 is False
    for value in ("bf16", "fp16"):
        torch.backends.cudnn.allow_tf32 = True
        set_up(value, net())
        assert torch.backends.cudnn.allow_tf32 is False


def test_fp32_is_always_active():
    assert Precision.is_active("fp32")  # must run to switch cuDNN's default TF32 off


def test_parse():
    for value in Precision.choices:
        assert Precision.parse(value) == value
    with pytest.raises(ValueError) as err:
        Precision.parse("bf17")
    for allowed in ("fp32", "tf32", "fp16", "bf16"):
        assert allowed in str(err.value)
    with pytest.raises(ValueError):
        Precision.parse(None)
