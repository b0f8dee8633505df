"""Channels-last memory layout (NHWC) for the model's 4-D weights and the input batches.

Convolution kernels of oneDNN (CPU) and cuDNN (tensor cores) prefer NHWC; a model in
channels-last whose inputs stay NCHW would convert at the first convolution and possibly back,
so both are converted: the weights once in prepare_model, each batch in transform_batch (which
runs before other tricks' transform_batch; elementwise mixing and interpolation keep the layout).
Later layers keep it: PyTorch propagates the memory format through conv, BN and activations.
See the PyTorch tutorial "Channels Last Memory Format".
"""
from __future__ import annotations

import torch
from torch import nn

from bench.tricks.spec import Batch, Switch, register


def to_channels_last(inputs: torch.Tensor) -> torch.Tensor:
    """NHWC strides for a 4-D batch; anything else as it is (channels_last is defined for 4-D)."""
    return inputs.contiguous(memory_format=torch.channels_last) if inputs.dim() == 4 else inputs


@register
class ChannelsLast(Switch):
    name = "channels_last"
    description = "model weights and input batches in torch.channels_last (NHWC) memory layout"

    def prepare_model(self, model: nn.Module) -> nn.Module:
        # Registered before world_size: DDP lays out its gradient buckets with the parameters'
        # strides when it is built, so converting afterwards would copy every gradient.
        return model.to(memory_format=torch.channels_last)

    def transform_batch(self, batch: Batch) -> Batch:
        inputs, targets = batch
        return to_channels_last(inputs), targets
