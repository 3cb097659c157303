"""megatron-core's GPTModel with mindlora's loss head.

Only the last step changes: when labels are given, the final hidden states go straight into the
fused, vocab-parallel output-projection + cross-entropy (``mindlora.models.cross_entropy``) for
the labelled tokens alone, instead of materialising ``[tokens, vocab]`` logits. Without labels the
model behaves exactly like GPTModel (logits ``[b, s, vocab/tp]``).

Packed rows: ``forward(..., segment_ids=)`` builds the block-diagonal causal mask from the
per-token sample numbers and makes RoPE follow ``position_ids`` (which restart at every sample);
megatron-core's GPTModel otherwise rotates by the token's index in the row and ignores them.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from mindlora.models.attention import packed_attention_mask
from mindlora.models.cross_entropy import fused_linear_cross_entropy


class MindloraGPTModel(GPTModel):
    """GPTModel whose ``forward(..., labels=)`` returns per-token losses ``[b, s]`` (0 where the
    label is -100), computed by the fused head. ``labels`` are already shifted: ``labels[:, t]``
    is the target of position ``t``.
    """

    def __init__(self, *args, real_vocab_size: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.real_vocab_size = real_vocab_size
        self._rope_follows_positions = False

    def forward(self, input_ids, position_ids, attention_mask, *args,
                segment_ids: Optional[torch.Tensor] = None, **kwargs):
        """GPTModel's forward; ``segment_ids`` ``[b, s]`` marks packed rows (see module doc)."""
        if segment_ids is None:
            return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
        if attention_mask is not None:
            raise ValueError("pass either segment_ids or attention_mask, not both")
        if self.position_embedding_type != "rope":
            raise ValueError(f"packed rows need RoPE, not {self.position_embedding_type!r}")
        self._rope_follows_positions = True
        try:
            return super().forward(input_ids, position_ids, packed_attention_mask(segment_ids),
                                   *args, **kwargs)
        finally:
            self._rope_follows_positions = False

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        out = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        if not self._rope_follows_positions:
            return out
        # The table holds rotations for positions 0..S-1 as [S, 1, 1, d]; picking each token's
        # own position gives [s, b, 1, d], which megatron-core's unfused RoPE broadcasts.
        table = out[1]
        if table is None or position_ids is None:
            raise ValueError("packed rows need position_ids on every pipeline stage")
        rope = table[:, 0][position_ids.t()]
        return (out[0], rope, *out[2:])

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        if labels is None or not self.post_process or self.config.mtp_num_layers:
            return super()._postprocess(hidden_states, input_ids, position_ids, labels,
                                        *args, **kwargs)
        tp_group = self.output_layer.tp_group
        if self.output_layer.sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(hidden_states, group=tp_group)
        else:
            hidden_states = copy_to_tensor_model_parallel_region(hidden_states, group=tp_group)
        weight = (self.shared_embedding_or_output_weight()
                  if self.share_embeddings_and_output_weights else self.output_layer.weight)
        s, b, h = hidden_states.shape
        flat_labels = labels.t().reshape(-1)  # [s*b], matching hidden's [s, b] order
        picked = (flat_labels != -100).nonzero().squeeze(1)
        tp_rank = torch.distributed.get_rank(tp_group) if tp_group is not None else 0
        v_local = weight.shape[0]
        losses = fused_linear_cross_entropy(
            hidden_states.reshape(s * b, h).index_select(0, picked), weight,
            flat_labels.index_select(0, picked), vocab_start=tp_rank * v_local,
            vocab_valid=self.real_vocab_size - tp_rank * v_local, tp_group=tp_group)
        per_token = losses.new_zeros(s * b).index_put((picked,), losses)
        return per_token.view(s, b).t()
