"""The one table of how every parameter is split under tensor parallelism.

Conversion, resharding, adapter gather/shard and PEFT export all ask this module, so a base weight
and its LoRA factors can never disagree about their layout.

The "full" tensor of a parameter is what a TP=1 model holds. A rank's shard is cut from it along
``dim``. ``parts > 1`` marks fused tensors made of equal blocks (SwiGLU ``linear_fc1`` is
``[gate; up]``): each block is split separately and the pieces re-joined, because every rank holds
``[gate_shard; up_shard]``. Grouped-query ``linear_qkv`` needs no such care: megatron-core stores it
interleaved per query group (``[q_g0 k_g0 v_g0 q_g1 ...]``), so a plain split along dim 0 gives
each rank whole groups.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class Split:
    """How one parameter is split under TP."""

    dim: Optional[int]
    """Axis the shards are cut along; None = replicated on every TP rank."""
    parts: int = 1
    """Equal fused blocks along ``dim`` that are split separately (2 for gated fc1)."""


REPLICATED = Split(None)

# (pattern on the key's tail, rule). Order matters: the first match wins.
_RULES: Sequence[tuple[str, Split]] = (
    (r"embedding\.word_embeddings\.weight$", Split(0)),
    (r"output_layer\.weight$", Split(0)),
    (r"linear_qkv\.lora_A\.weight$", REPLICATED),
    (r"linear_qkv\.lora_B\.weight$", Split(0)),
    (r"linear_qkv\.(weight|bias)$", Split(0)),
    (r"linear_fc1\.lora_A\.weight$", REPLICATED),
    (r"linear_fc1\.lora_B\.weight$", Split(0, parts=2)),
    (r"linear_fc1\.(weight|bias)$", Split(0, parts=2)),
    (r"linear_(proj|fc2)\.lora_A\.weight$", Split(1)),
    (r"linear_(proj|fc2)\.lora_B\.weight$", REPLICATED),
    (r"linear_(proj|fc2)\.weight$", Split(1)),
    (r"linear_(proj|fc2)\.bias$", REPLICATED),
    (r"(layernorm|layer_norm|final_layernorm)[^.]*\.(weight|bias)$", REPLICATED),
    (r"mlp\.router\.(weight|bias)$", REPLICATED),
)


def split_rule(name: str, gated_fc1: bool = True) -> Split:
    """The TP split of the parameter with megatron-core state-dict key ``name``.

    Args:
        name: a full or tail state-dict key, e.g. ``decoder.layers.3.mlp.linear_fc1.weight``.
        gated_fc1: whether ``linear_fc1`` is a fused gate/up projection (SwiGLU); every family
            mindlora supports is gated, but the rule stays explicit.
    """
    for pattern, rule in _RULES:
        if re.search(pattern, name):
            if rule.parts == 2 and not gated_fc1:
                return Split(rule.dim)
            return rule
    raise KeyError(f"no tensor-parallel split rule for parameter {name!r}")


def shard(full: torch.Tensor, rule: Split, tp_size: int, tp_rank: int) -> torch.Tensor:
    """Cut rank ``tp_rank``'s shard of a full tensor (a contiguous copy)."""
    if rule.dim is None or tp_size == 1:
        return full.clone()
    blocks = full.chunk(rule.parts, dim=rule.dim) if rule.parts > 1 else (full,)
    pieces = []
    for block in blocks:
        if block.shape[rule.dim] % tp_size:
            raise ValueError(f"dimension {rule.dim} of size {block.shape[rule.dim]} cannot be "
                             f"split into {tp_size} tensor-parallel shards")
        pieces.append(block.chunk(tp_size, dim=rule.dim)[tp_rank])
    return torch.cat(pieces, dim=rule.dim).contiguous()


def gather(shards: Sequence[torch.Tensor], rule: Split) -> torch.Tensor:
    """Re-join per-rank shards (in TP rank order) into the full tensor."""
    if rule.dim is None or len(shards) == 1:
        return shards[0].clone()
    if rule.parts == 1:
        return torch.cat(list(shards), dim=rule.dim)
    per_rank = [s.chunk(rule.parts, dim=rule.dim) for s in shards]
    return torch.cat([torch.cat([p[i] for p in per_rank], dim=rule.dim)
                      for i in range(rule.parts)], dim=rule.dim)


_EXPERT = re.compile(r"^(.*mlp\.experts\.local_experts\.)(\d+)(\..*)$")


def expert_index(name: str) -> Optional[int]:
    """The expert number in a routed-expert key (``...local_experts.{e}.linear_fc1.weight``)."""
    m = _EXPERT.match(name)
    return int(m.group(2)) if m else None


def expert_owner(name: str, num_experts: int, ep_size: int) -> tuple[int, str]:
    """(EP rank, rank-local key) of a key numbering its expert globally; other keys: (-1, key).

    Expert parallelism splits the experts into ``ep_size`` contiguous blocks (megatron-core's
    SequentialMLP: rank ``r`` holds experts ``r*E/EP .. (r+1)*E/EP - 1``, numbered from 0 there).
    Tensor-parallel splitting of an expert follows :func:`split_rule` like the dense MLP.
    """
    m = _EXPERT.match(name)
    if m is None:
        return -1, name
    per_rank = num_experts // ep_size
    e = int(m.group(2))
    return e // per_rank, f"{m.group(1)}{e % per_rank}{m.group(3)}"


def expert_global_key(name: str, ep_rank: int, num_local: int) -> str:
    """Inverse of :func:`expert_owner`: a rank-local expert key numbered globally."""
    m = _EXPERT.match(name)
    if m is None:
        return name
    return f"{m.group(1)}{ep_rank * num_local + int(m.group(2))}{m.group(3)}"


def pad_vocab(vocab_size: int, tp_size: int, divisible_by: int = 1) -> int:
    """Padded vocabulary so the embedding splits evenly over TP (Megatron's rule)."""
    multiple = divisible_by * tp_size
    return ((vocab_size + multiple - 1) // multiple) * multiple
