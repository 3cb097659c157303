"""RMSNorm for the local (non-Transformer-Engine) spec that also works under sequence parallel.

megatron-core's ``WrappedTorchNorm`` refuses ``sequence_parallel``; the maths does not care. Under
sequence parallel each rank normalises its slice of the sequence, so the norm's weight gradient is
a partial sum over TP: we mark the parameters ``sequence_parallel=True`` as Megatron does, which is
what its gradient reduction looks for. q/k norms run on full-sequence, head-sharded tensors and
are not marked.
"""
from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm with megatron-core's constructor signature."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                 for_qk: bool = False, **_: object) -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        if config.sequence_parallel and not for_qk:
            for p in self.parameters():
                p.sequence_parallel = True


class QKRMSNorm(RMSNorm):
    """RMSNorm applied per head to queries and keys (Qwen3)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                 **kw: object) -> None:
        super().__init__(config, hidden_size, eps=eps, for_qk=True)
