"""Which kernel computes self-attention: explicit math, PyTorch's fused SDPA, or query chunks.

Every ``nn.MultiheadAttention`` of the model (the encoder blocks of torchvision's ViT) is replaced
by :class:`KernelAttention`, which holds the *same* projection parameters (same objects, same
state-dict keys) and differs only in how softmax(QKᵀ/√d)V is computed:

- ``math``: the explicit formula; autograd keeps the (B, heads, L, L) probabilities for backward,
  so activation memory grows with L².
- ``sdpa``: ``F.scaled_dot_product_attention``; PyTorch picks a backend (flash, memory-efficient,
  cuDNN or math) from the device, dtype and shapes. The one it picked is recorded in the row
  (``attention_sdpa_backend``).
- ``{chunked: N}``: queries in chunks of N rows, each chunk's attention under non-reentrant
  ``torch.utils.checkpoint``, so backward recomputes it instead of keeping it. Only one chunk's
  (B, heads, N, L) matrix exists at a time: the idea of memory-efficient attention (Rabe & Staats
  2021, "Self-attention does not need O(n²) memory", arXiv:2112.05682), written in PyTorch ops
  rather than a fused kernel. Backward recomputes each chunk's QKᵀ and softmax only (the QKV
  projections and the output projection are not recomputed): +6% FLOPs over math on vit_tiny.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend
from torch.utils.checkpoint import checkpoint

from bench.base.safeyaml import shorten
from bench.parts.distributed import unwrap
from bench.parts.models import build_model
from bench.tricks.spec import Trick, register

KERNELS = ("math", "sdpa", "chunked")


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q kᵀ / √d) v over (..., L, d) tensors, spelled out."""
    scores = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(q.shape[-1]))
    probs = torch.softmax(scores, dim=-1)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return probs @ v


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_chunk: int,
                      dropout_p: float = 0.0) -> torch.Tensor:
    """:func:`math_attention` over chunks of ``q_chunk`` queries, each recomputed in backward.

    Each query row's softmax runs over all keys, so chunking queries changes nothing in the
    result; checkpointing (which restores the RNG state) makes dropout the same on recompute.
    """
    if not torch.is_grad_enabled():  # evaluation: nothing to keep for backward anyway
        return torch.cat([math_attention(c, k, v, dropout_p) for c in q.split(q_chunk, dim=-2)], dim=-2)
    return torch.cat([checkpoint(math_attention, c, k, v, dropout_p, use_reentrant=False)
                      for c in q.split(q_chunk, dim=-2)], dim=-2)


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> str:
    """The backend ``F.scaled_dot_product_attention`` picks for these inputs (its own choice
    function, ``torch._fused_sdp_choice``; a test checks it against the profiler's op names)."""
    return SDPBackend(torch._fused_sdp_choice(q, k, v, dropout_p=dropout_p)).name.lower()


class KernelAttention(nn.Module):
    """Drop-in for a batch-first ``nn.MultiheadAttention`` without masks, with a chosen kernel."""

    def __init__(self, mha: nn.MultiheadAttention, kernel: str, q_chunk: int | None = None) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.dropout = mha.embed_dim, mha.num_heads, mha.dropout
        self.in_proj_weight, self.in_proj_bias, self.out_proj = mha.in_proj_weight, mha.in_proj_bias, mha.out_proj
        self.kernel, self.q_chunk = kernel, q_chunk
        self.backend: str | None = None  # the SDPA backend of the last training forward

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, E) -> (B, heads, L, E / heads)
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: Any = None,
                need_weights: bool = True, attn_mask: Any = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        if key_padding_mask is not None or attn_mask is not None or is_causal or need_weights:
            raise NotImplementedError("KernelAttention computes unmasked attention without returning weights "
                                      "(call it with need_weights=False, as torchvision's ViT does)")
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
        q, k, v = (self._heads(F.linear(x, w, b))
                   for x, w, b in ((query, w_q, b_q), (key, w_k, b_k), (value, w_v, b_v)))
        dropout_p = self.dropout if self.training else 0.0
        if self.kernel == "math":
            out = math_attention(q, k, v, dropout_p)
        elif self.kernel == "sdpa":
            if self.training:
                self.backend = sdpa_backend(q, k, v, dropout_p)
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            out = chunked_attention(q, k, v, self.q_chunk, dropout_p)
        return self.out_proj(out.transpose(1, 2).flatten(-2)), None


def replaceable(module: nn.Module) -> bool:
    """A self-attention KernelAttention can stand in for: batch-first, one packed in-projection."""
    return (isinstance(module, nn.MultiheadAttention) and module.batch_first
            and module._qkv_same_embed_dim and module.bias_k is None and not module.add_zero_attn)


def replace_attention(model: nn.Module, kernel: str, q_chunk: int | None = None) -> list[KernelAttention]:
    """Swap every replaceable ``nn.MultiheadAttention`` in ``model`` (in place); the new modules."""
    swaps = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children() if replaceable(child)]
    for parent, name, child in swaps:
        setattr(parent, name, KernelAttention(child, kernel, q_chunk))
    return [getattr(parent, name) for parent, name, _ in swaps]


def _kernel_of(value: Any) -> tuple[str, int | None]:
    return ("chunked", value["chunked"]) if isinstance(value, dict) else (value, None)


@register
class Attention(Trick):
    name = "attention"
    description = "self-attention kernel of nn.MultiheadAttention models (vit_tiny): math, SDPA or query chunks"
    values_help = "null (the model's own) | math | sdpa | {chunked: N} (N queries per chunk, recomputed in backward)"
    default = None

    @classmethod
    def parse(cls, value: Any) -> Any:
        if value is None or value in ("math", "sdpa"):
            return value
        if isinstance(value, dict) and set(value) == {"chunked"}:
            size = value["chunked"]
            if isinstance(size, int) and not isinstance(size, bool) and size >= 1:
                return {"chunked": size}
        raise ValueError(f"{shorten(value)} is not one of null, math, sdpa, {{chunked: N}} with N >= 1 "
                         "queries per chunk")

    @classmethod
    def check(cls, value: Any, config: Any) -> None:
        if value is None:
            return

        with torch.device("meta"):  # shapes only: no memory, no init cost
            model = build_model(config.model, num_classes=10)
        if not any(replaceable(m) for m in model.modules()):
            raise ValueError(f"model {config.model!r} has no batch-first nn.MultiheadAttention to replace "
                             "(use vit_tiny or a torchvision vit_*)")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        # unwrap: the same parameters stay registered with a DDP wrapper built before this hook.
        self.modules = [] if self.value is None else replace_attention(unwrap(model), *_kernel_of(self.value))
        return model

    def metrics(self) -> dict[str, Any]:
        kernel, q_chunk = _kernel_of(self.value)
        found = {"attention_kernel": kernel, "attention_layers": len(self.modules)}
        if q_chunk is not None:
            found["attention_q_chunk"] = q_chunk
        if kernel == "sdpa":
            found["attention_sdpa_backend"] = ",".join(sorted({m.backend for m in self.modules if m.backend}))
        return found
