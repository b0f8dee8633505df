"""Progressive resizing: the size schedule against hand values, the model trains on exactly those
sizes (measurement steps at the end size), and the row says which sizes ran."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.testing import assert_close

from bench.base.errors import ConfigError
from bench.config.matrix import load_matrix
from bench.config.train_config import build_train_config
from bench.training.train import train
from bench.tricks.progressive_resizing import ProgressiveResizing, model_flops, resize, scale_at, side_at

CPU = torch.device("cpu")


def schedule(total: int, full: int, start=0.5, end=1.0, until=0.75) -> list[int]:
    return [side_at(scale_at(t, total, start, end, until), full) for t in range(total)]


def test_schedule_against_hand_values():
    # 20 steps, ramp over 15: the target side 8 + 8t/15 goes to the nearest of 8, 12, 16
    # (t=3: 9.6 -> 8; t=4: 10.13 -> 12; t=11: 13.87 -> 12; t=12: 14.4 -> 16)
    assert schedule(20, 16) == [8] * 4 + [12] * 8 + [16] * 8
    assert scale_at(0, 20, 0.5, 1.0, 0.75) == 0.5 and scale_at(15, 20, 0.5, 1.0, 0.75) == 1.0
    assert scale_at(6, 20, 0.25, 0.75, 0.6) == pytest.approx(0.25 + 0.5 * 6 / 12)
    # 32 pixels from 0.25 over all 10 steps: target 8 + 2.4t = 8, 10.4, 12.8, 15.2, 17.6, 20, 22.4,
    # 24.8, 27.2, 29.6 -> the nearest multiple of 4
    assert schedule(10, 32, start=0.25, until=1.0) == [8, 12, 12, 16, 16, 20, 24, 24, 28, 28]
    assert schedule(4, 30, start=1.0) == [30] * 4  # the full side itself, not the nearest multiple of 4
    assert side_at(0.5, 6) == 6  # an image smaller than 8 stays as it is
    assert schedule(5, 16, until=0.0) == [16] * 5  # until 0: the end size from the first step
    assert schedule(5, 16, start=0.5, end=0.5) == [8] * 5


@pytest.mark.parametrize("side", [4, 8, 12])
def test_resize_matches_pillows_antialiased_bilinear_reduction(side):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 16, 16, generator=g)
    pillow = Image.fromarray(x[0, 0].numpy(), mode="F").resize((side, side), Image.BILINEAR)
    assert_close(resize(x, side)[0, 0], torch.from_numpy(np.array(pillow)), atol=1e-5, rtol=0)
    assert resize(x, 16) is x  # the full size is left alone


def run_recording_sizes(progressive, steps=20, warmup=1):
    """Train on digits at 16x16 and record the input side of every training-mode forward."""
    config = build_train_config({"model": "tiny_cnn", "dataset": "digits", "image_size": 16, "batch_size": 64,
                                 "steps": steps, "warmup_steps": warmup, "progressive_resizing": progressive}, "t")
    sides = []

    def record(module: nn.Module, args) -> None:
        if isinstance(module, nn.Conv2d) and module.in_channels == 3 and module.training \
                and args[0].device.type != "meta":  # not the per-size FLOP count after training
            sides.append(args[0].shape[-1])

    hook = module_hooks.register_module_forward_pre_hook(record)
    try:
        metrics = train(config, seed=0, device=CPU)
    finally:
        hook.remove()
    return sides, metrics


@pytest.fixture(scope="module")
def resized_run():
    threads = torch.get_num_threads()  # module-scoped: runs before the autouse one-thread fixture
    torch.set_num_threads(1)
    try:
        return run_recording_sizes({"start": 0.5, "end": 1.0, "until": 0.75})
    finally:
        torch.set_num_threads(threads)


def test_the_model_trains_on_the_scheduled_sizes(resized_run):
    sides, metrics = resized_run
    expected = schedule(20, 16)
    expected[1] = expected[2] = 16  # warm-up 1: steps 1 and 2 measure memory and FLOPs at the end size
    assert sides == expected
    assert metrics["progressive_steps"] == {str(s): n for s, n in sorted(Counter(expected).items())}
    timed = set(expected[3:])
    assert sorted(metrics["progressive_step_time_ms"], key=int) == [str(s) for s in sorted(timed)]
    assert all(ms > 0 for ms in metrics["progressive_step_time_ms"].values())


def test_measurement_steps_run_at_the_end_size(resized_run):
    _, metrics = resized_run
    plain = train(build_train_config({"model": "tiny_cnn", "dataset": "digits", "image_size": 16, "batch_size": 64,
                                      "steps": 5, "warmup_steps": 1}, "t"), seed=0, device=CPU)
    assert metrics["flops_per_step"] == plain["flops_per_step"]  # the full-size step
    assert metrics["peak_memory_bytes"] == plain["peak_memory_bytes"]  # the run's real (largest) peak


def test_per_size_flops_are_the_loops_count_and_scale_with_the_area(resized_run):
    _, metrics = resized_run
    flops = metrics["progressive_model_flops"]
    assert flops["16"] == metrics["flops_per_step"]  # a plain full-size step, counted by the loop
    # convolutions dominate tiny_cnn and scale with the pixel count; the classifier head does not
    assert flops["8"] / flops["16"] == pytest.approx(0.25, abs=0.01)
    assert flops["12"] == model_flops("tiny_cnn", 10, (64, 3, 12, 12))


@pytest.mark.parametrize("value, message", [
    ({"start": 0}, "0 < start"), ({"start": 0.8, "end": 0.5}, "start <= end"), ({"end": 1.5}, "end <= 1"),
    ({"until": -0.1}, "until <= 1"), ({"start": "half"}, "must be numbers"), ({"begin": 0.5}, "start: s"),
    (0.5, "start: s"), ({"until": True}, "must be numbers"),
])
def test_parse_rejects(value, message):
    with pytest.raises(ValueError, match=message):
        ProgressiveResizing.parse(value)


def test_parse_fills_the_defaults():
    assert ProgressiveResizing.parse({}) == {"start": 0.5, "end": 1.0, "until": 0.75}
    assert ProgressiveResizing.parse({"start": 0.25}) == {"start": 0.25, "end": 1.0, "until": 0.75}
    assert ProgressiveResizing.parse(None) is None


def test_a_model_that_cannot_take_the_small_sizes_is_rejected_before_anything_runs(write_matrix):
    # alexnet's pooling needs at least 63 pixels: 64 works, the 32-pixel start does not
    path = write_matrix("name: m\nbase: {model: alexnet, dataset: digits, image_size: 64, epochs: 1, batch_size: 32}\n"
                        "axes: {progressive_resizing: [null, {start: 0.5}]}")
    with pytest.raises(ConfigError, match=r"progressive_resizing reaches 32x32 images, which alexnet cannot take"):
        load_matrix(path)
    load_matrix(write_matrix("name: m\nbase: {model: alexnet, dataset: digits, image_size: 64, epochs: 1, "
                             "batch_size: 32}\naxes: {progressive_resizing: [null, {start: 1.0}]}"))
