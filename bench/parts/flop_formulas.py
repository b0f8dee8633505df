"""FLOP formulas ``torch.utils.flop_counter`` lacks, registered on import (by bench.training.train).

PyTorch counts its CUDA attention kernels (flash, memory-efficient, cuDNN) but has no formula for
the CPU flash kernel that ``F.scaled_dot_product_attention`` (and ``nn.MultiheadAttention``) run
on CPU, so without this an attention model's FLOPs on CPU leave the attention out. The formulas
are PyTorch's own ones for the CUDA kernels: the same matrix products.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import (
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

aten = torch.ops.aten


@register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
def cpu_flash_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
def cpu_flash_attention_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args,
                                      out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)
