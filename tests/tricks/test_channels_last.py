"""channels_last: inside a real training step every convolution reads and writes NHWC tensors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.tricks.channels_last import ChannelsLast
from tests.tricks.speed_helpers import tiny_run

NHWC = torch.channels_last


def conv_layouts(run, batch) -> list[tuple[bool, bool]]:
    """(input is NHWC, output is NHWC) of every convolution call in one training step."""
    seen = []

    def hook(module, inputs, output):
        seen.append((inputs[0].is_contiguous(memory_format=NHWC), output.is_contiguous(memory_format=NHWC)))

    handles = [m.register_forward_hook(hook) for m in run.model.modules() if isinstance(m, nn.Conv2d)]
    try:
        run.step(batch)
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen) == 6  # tiny_cnn's six convolutions all ran
    return seen


def test_convolutions_run_in_channels_last():
    run, batch = tiny_run(channels_last=True)
    assert all(layout == (True, True) for layout in conv_layouts(run, batch))
    assert all(m.weight.is_contiguous(memory_format=NHWC) for m in run.model.modules() if isinstance(m, nn.Conv2d))


def test_without_the_trick_nothing_is_channels_last():
    """The check above can tell: the default layout is NCHW (8x8 maps, >1 channel: not ambiguous)."""
    run, batch = tiny_run()
    assert not any(i or o for i, o in conv_layouts(run, batch))


def test_converting_only_the_model_is_caught(monkeypatch):
    """Inputs left NCHW: the first convolution reads NCHW, so the property above fails."""
    monkeypatch.setattr(ChannelsLast, "transform_batch", lambda self, batch: batch)
    run, batch = tiny_run(channels_last=True)
    assert conv_layouts(run, batch)[0][0] is False


@pytest.mark.parametrize("value", [1, "yes", None])
def test_parse_rejects(value):
    with pytest.raises(ValueError, match="false, true"):
        ChannelsLast.parse(value)
