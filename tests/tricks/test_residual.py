"""zero_init_residual: every block starts as its shortcut. stochastic_depth: branches (not sums)
dropped per sample at p·l/L in training, and a deterministic identity in evaluation."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from torch import nn
from torch.testing import assert_close

from bench.base.errors import ConfigError
from bench.config.train_config import build_train_config
from bench.parts.models import build_model
from bench.tricks.residual import StochasticDepthTrick, ZeroInitResidual, residual_blocks

P = 0.5


def shortcut_and_output(model: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(relu(shortcut(input)), output) of every residual block in one forward pass."""
    seen = []

    def record(block, inputs, output):
        identity = block.downsample(inputs[0]) if block.downsample is not None else inputs[0]
        seen.append((torch.relu(identity), output))

    hooks = [b.register_forward_hook(record) for b in residual_blocks(model)]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("name, blocks, size", [("resnet18_cifar", 8, 16), ("resnet50", 16, 32)])
def test_zero_init_residual_blocks_start_as_their_shortcut(name, blocks, size):
    torch.manual_seed(0)
    model = ZeroInitResidual(True).prepare_model(build_model(name, 10)).train()
    x = torch.randn(2, 3, size, size)
    pairs = shortcut_and_output(model, x)
    assert len(pairs) == blocks
    for shortcut, output in pairs:
        assert_close(output, shortcut)

    plain = build_model(name, 10).train()  # without the trick, no block is its shortcut
    assert not any(torch.allclose(out, sc) for sc, out in shortcut_and_output(plain, x))


def test_zero_init_residual_zeroes_what_torchvision_zeroes():
    """torchvision's own flag (``resnet50(zero_init_residual=True)``) as the reference."""
    ours = ZeroInitResidual(True).prepare_model(torchvision.models.resnet50())
    theirs = torchvision.models.resnet50(zero_init_residual=True)
    def zero_weights(model):  # BN biases start at 0 anyway: only the weights (gamma) tell
        return {n for n, p in model.named_parameters() if n.endswith("weight") and not p.any()}

    assert zero_weights(ours) == zero_weights(theirs)
    assert len(zero_weights(ours)) == 16


def with_stochastic_depth(p: float = P) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    plain = build_model("resnet18_cifar", 10)
    return plain, StochasticDepthTrick(p).prepare_model(copy.deepcopy(plain))


def test_stochastic_depth_is_deterministic_and_unchanged_in_eval_mode():
    plain, dropped = with_stochastic_depth()
    plain.eval(), dropped.eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        first, second, reference = dropped(x), dropped(x), plain(x)
    assert torch.equal(first, second)
    assert_close(first, reference)


def test_stochastic_depth_drops_branches_at_a_rate_rising_linearly_to_p():
    plain, model = with_stochastic_depth()
    model.train()
    blocks = residual_blocks(model)
    assert len(blocks) == 8
    stats = [{"dropped": 0, "rows": 0} for _ in blocks]

    def count(i):
        def hook(block, inputs, output):
            # the branch's output after StochasticDepth; a dropped row is all zero
            branch = block.bn2[1].last_output
            dropped = (branch.flatten(1) == 0).all(dim=1)
            identity = block.downsample(inputs[0]) if block.downsample is not None else inputs[0]
            # the branch, not the sum, is dropped: those rows are exactly relu(shortcut)
            assert_close(output[dropped], torch.relu(identity[dropped]))
            assert not torch.allclose(output[~dropped], torch.relu(identity[~dropped]))
            stats[i]["dropped"] += int(dropped.sum())
            stats[i]["rows"] += len(dropped)
        return hook

    for block in blocks:
        block.bn2[1].register_forward_hook(lambda m, i, o: setattr(m, "last_output", o.clone()))  # the block adds to it in place
    for i, block in enumerate(blocks):
        block.register_forward_hook(count(i))
    torch.manual_seed(1)
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(1000, 3, 4, 4))

    for layer, s in enumerate(stats, start=1):
        expected = P * layer / len(blocks)  # Huang et al. 2016: linear in depth, p at the last block
        n = s["rows"]
        bound = 4.5 * math.sqrt(expected * (1 - expected) / n)  # binomial: fails by chance ~1e-5
        assert abs(s["dropped"] / n - expected) < bound, (layer, s["dropped"] / n, expected)


def config(model: str, **tricks):
    return build_train_config({"model": model, "dataset": "synthetic", "steps": 10, **tricks}, "test")


@pytest.mark.parametrize("trick, value", [(ZeroInitResidual, True), (StochasticDepthTrick, 0.1)])
def test_rejected_on_a_model_without_residual_blocks(trick, value):
    with pytest.raises(ValueError, match=f"{trick.name} needs a ResNet.*'tiny_cnn' has none"):
        trick.check(value, config("tiny_cnn"))
    trick.check(value, config("resnet18_cifar"))
    trick.check(value, config("resnext50_32x4d"))  # torchvision's Bottleneck ResNets too


def test_rejection_is_a_one_line_config_error(tmp_path):
    from bench.config.matrix import load_matrix

    path = tmp_path / "m.yaml"
    path.write_text("name: m\nbase: {model: tiny_cnn, dataset: synthetic, steps: 10}\nseeds: [0]\n"
                    "axes: {stochastic_depth: [0.0, 0.2]}\n")
    with pytest.raises(ConfigError, match="stochastic_depth needs a ResNet") as err:
        load_matrix(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("value", [1.0, -0.1, True, "0.1", float("nan")])
def test_stochastic_depth_parse_rejects(value):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        StochasticDepthTrick.parse(value)


def test_checkpointing_redraws_the_same_dropped_rows():
    """The recomputation in backward restores the RNG state, so the loss and gradients match."""
    from bench.tricks.checkpointing import apply_checkpointing

    _, model = with_stochastic_depth()
    checkpointed = apply_checkpointing(copy.deepcopy(model))
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    results = []
    for m in (model, checkpointed):
        torch.manual_seed(3)
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in m.parameters()]))
    assert_close(results[0][0], results[1][0])
    assert_close(results[0][1], results[1][1])
    torch.manual_seed(4)  # another draw gives another loss: the comparison above means something
    assert not torch.allclose(torch.nn.functional.cross_entropy(model(x), y), results[0][0])
