"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

megatron-core's local ``DotProductAttention`` materialises the ``[b, heads, s, s]`` scores and a
causal mask built with ``device="cuda"``; SDPA uses the fused (flash) kernel on CPU and GPU alike,
handles grouped-query heads without repeating K/V, and needs no mask for the causal case. Same
constructor and ``forward`` contract as megatron-core's class, so it drops into the layer spec.

Packed rows (several samples in one row) pass the block-diagonal causal mask of
:func:`packed_attention_mask`; SDPA then runs its masked kernel (math/flash on CPU, the
memory-efficient one on CUDA). megatron-core's ``PackedSeqParams`` / ``cu_seqlens`` varlen path
needs Transformer Engine's attention in the thd layout, which this module replaces, so it is not
taken: CUDA and CPU run the same mask path.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask of packed rows, megatron's convention (True = masked).

    Token ``q`` may attend to token ``k`` iff ``k <= q`` and both carry the same segment id, so
    each sample of a row sees only its own earlier tokens, exactly as it would alone.

    Args:
        segment_ids: ``[b, s]`` sample number of each token (padding is its own segment).

    Returns:
        ``[b, 1, s, s]`` bool on ``segment_ids``' device.
    """
    s = segment_ids.shape[1]
    future = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).triu(1)
    other = segment_ids[:, :, None] != segment_ids[:, None, :]
    return (other | future).unsqueeze(1)


class SDPAttention(MegatronModule):
    """Causal (or explicitly masked) attention over TP-local heads: [s, b, n, d] -> [s, b, n*d]."""

    def __init__(self, config: TransformerConfig, layer_number: int,
                 attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism is not supported by mindlora's SDPAttention")
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor],
                attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("packed sequences / attention bias are not supported by SDPAttention")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        mask_type = attn_mask_type or self.attn_mask_type
        # megatron's masks are True where attention is NOT allowed; SDPA's are the opposite.
        mask = None if attention_mask is None else ~attention_mask
        causal = mask is None and mask_type == AttnMaskType.causal and q.shape[2] > 1
        dropout = self.dropout_p if self.training else 0.0
        with get_cuda_rng_tracker().fork() if dropout > 0 else nullcontext():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=causal, scale=self.softmax_scale,
                                                 enable_gqa=q.shape[1] != k.shape[1])
        s, b = out.shape[2], out.shape[0]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

