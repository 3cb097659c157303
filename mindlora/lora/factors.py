"""LoRA factors outside a layer: how their state-dict keys look, and the merge arithmetic.

The merge, ``W' = W + s * B @ A``, lives here once, for a layer and for a converter alike. It is
computed in float32 whatever the base and factor dtypes, and cast once at the end, so a bf16 base
merged for float32 output is not rounded to bf16 on the way, and merge then unmerge of a float32
layer gives W back up to float32 rounding.
"""
from __future__ import annotations

from typing import Optional

import torch


def is_lora_key(key: str) -> bool:
    """A LoRA factor's state-dict key (``...lora_A.weight`` / ``...lora_B.default.weight``)."""
    return ".lora_A." in key or ".lora_B." in key


def delta_weight(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * B @ A`` in float32 (``A [r, in]``, ``B [out, r]``; a full tensor or a shard)."""
    return scaling * (b.float() @ a.float())


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                  dtype: Optional[torch.dtype] = None, sign: int = 1) -> torch.Tensor:
    """``W + sign * scaling * B @ A`` in float32, cast to ``dtype`` (default: W's).

    Args:
        sign: ``-1`` takes the delta back out (a layer's unmerge).
    """
    return (weight.float() + sign * delta_weight(a, b, scaling)).to(dtype or weight.dtype)
