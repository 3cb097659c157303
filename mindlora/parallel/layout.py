"""Which rank holds which slice of the model: the one place these facts are computed.

Conversion, resharding, model building, adapter gather/shard, checkpoint metadata and PEFT export
all ask this module, so a base weight and its LoRA factors, or a model chunk and the checkpoint
file it loads, can never disagree about their layout. A leaf: it imports only torch and
mindlora.config.

* Tensor parallelism: the split table. The "full" tensor of a parameter is what a TP=1 model
  holds; a rank's shard is cut from it along ``dim``. ``parts > 1`` marks fused tensors made of
  equal blocks (SwiGLU ``linear_fc1`` is ``[gate; up]``): each block is split separately and the
  pieces re-joined, because every rank holds ``[gate_shard; up_shard]``. Grouped-query
  ``linear_qkv`` needs no such care: megatron-core stores it interleaved per query group
  (``[q_g0 k_g0 v_g0 q_g1 ...]``), so a plain split along dim 0 gives each rank whole groups.
  LoRA factors are in the table too (column base: A replicated, B split like W's rows; row base:
  A split like W's columns, B replicated), which is also what ``sharded_state_dict`` reports.
* Pipeline parallelism: decoder layers per (stage, virtual stage) -- even, uneven
  (``--num-layer-list``, Megatron-LM's first/last-stage counts) or interleaved -- and their
  global ids.
* Expert parallelism: which rank owns a routed expert and its rank-local number.
* Vocabulary padding: the embedding rows every TP rank holds.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from mindlora.config import ModelConfig, ParallelConfig


# ---------------------------------------------------------------- tensor parallelism

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


def lora_factor_splits(prefix: str, gated_fc1: bool = True) -> dict[str, Split]:
    """``{"lora_A.weight": Split, "lora_B.weight": Split}`` of the LoRA layer at ``prefix``
    (``decoder.layers.0.mlp.linear_fc1.``): the axes its ``sharded_state_dict`` reports."""
    return {k: split_rule(prefix + k, gated_fc1) for k in ("lora_A.weight", "lora_B.weight")}


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


def shard_shape(shape: Sequence[int], rule: Split, tp_size: int) -> tuple[int, ...]:
    """Shape of one rank's shard of a full tensor of ``shape``."""
    out = list(shape)
    if rule.dim is not None:
        out[rule.dim] //= tp_size
    return tuple(out)


def gather(shards: Sequence[torch.Tensor], rule: Split) -> torch.Tensor:
    """Re-join per-rank shards (in TP rank order) into the full tensor."""
    if rule.dim is None or len(shards) == 1:
        return shards[0].clone()
    if rule.parts == 1:
        return torch.cat(list(shards), dim=rule.dim)
    per_rank = [s.chunk(rule.parts, dim=rule.dim) for s in shards]
    return torch.cat([torch.cat([p[i] for p in per_rank], dim=rule.dim)
                      for i in range(rule.parts)], dim=rule.dim)


def pad_vocab(vocab_size: int, tp_size: int, divisible_by: int = 1) -> int:
    """Padded vocabulary so the embedding splits evenly over TP (Megatron's rule)."""
    multiple = divisible_by * tp_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


# ---------------------------------------------------------------- expert parallelism

_EXPERT = re.compile(r"^(.*mlp\.experts\.local_experts\.)(\d+)(\..*)$")


def expert_index(name: str) -> Optional[int]:
    """The expert number in a routed-expert key (``...local_experts.{e}.linear_fc1.weight``)."""
    m = _EXPERT.match(name)
    return int(m.group(2)) if m else None


def experts_per_rank(num_experts: int, ep_size: int) -> int:
    """Routed experts each EP rank holds (``num_experts`` divides by ``ep_size``, checked by
    ParallelConfig.check_model)."""
    return num_experts // ep_size


def expert_owner(name: str, num_experts: int, ep_size: int) -> tuple[int, str]:
    """(EP rank, rank-local key) of a key numbering its expert globally; other keys: (-1, key).

    Expert parallelism splits the experts into ``ep_size`` contiguous blocks (megatron-core's
    SequentialMLP: rank ``r`` holds experts ``r*E/EP .. (r+1)*E/EP - 1``, numbered from 0 there).
    Tensor-parallel splitting of an expert follows :func:`split_rule` like the dense MLP.
    """
    m = _EXPERT.match(name)
    if m is None:
        return -1, name
    per_rank = experts_per_rank(num_experts, ep_size)
    e = int(m.group(2))
    return e // per_rank, f"{m.group(1)}{e % per_rank}{m.group(3)}"


def expert_global_key(name: str, ep_rank: int, num_local: int) -> str:
    """Inverse of :func:`expert_owner`: a rank-local expert key numbered globally."""
    m = _EXPERT.match(name)
    if m is None:
        return name
    return f"{m.group(1)}{ep_rank * num_local + int(m.group(2))}{m.group(3)}"


# ---------------------------------------------------------------- pipeline parallelism

def layer_counts(num_layers: int, pp: int, vpp: Optional[int] = None,
                 num_layer_list: Optional[Sequence[int]] = None,
                 first: Optional[int] = None, last: Optional[int] = None) -> list[list[int]]:
    """``counts[pp_rank][vp_stage]``: decoder layers in each model chunk.

    Args:
        vpp: virtual stages per pipeline rank (interleaved schedule); None or 1: one chunk each.
        num_layer_list: layers of each stage (``--num-layer-list``, MindSpeed-LLM); no VPP.
        first, last: layers of the first / last stage, the rest split evenly over the middle
            ones (Megatron-LM's ``decoder_first/last_pipeline_num_layers``); no VPP.
    """
    if num_layer_list:
        return [[int(n)] for n in num_layer_list]
    if first or last:
        middle = pp - (1 if first else 0) - (1 if last else 0)
        each = (num_layers - (first or 0) - (last or 0)) // middle if middle else 0
        counts = [each] * pp
        if first:
            counts[0] = first
        if last:
            counts[-1] = last
        return [[c] for c in counts]
    v = vpp or 1
    return [[num_layers // (pp * v)] * v for _ in range(pp)]


def parallel_layer_counts(model: ModelConfig, parallel: ParallelConfig) -> list[list[int]]:
    """:func:`layer_counts` of ``model`` under ``parallel`` (what a training run builds)."""
    return layer_counts(model.num_layers, parallel.pipeline_model_parallel_size,
                        parallel.virtual_pipeline_model_parallel_size, parallel.num_layer_list)


def layer_ids(counts: list[list[int]]) -> dict[tuple[int, int], list[int]]:
    """Global (0-based) ids of the decoder layers of every chunk ``(pp_rank, vp_stage)``.

    Interleaved order: chunk (p, v) comes after all chunks (*, v-1) and (< p, v).
    """
    ids, start = {}, 0
    for v in range(len(counts[0])):
        for p in range(len(counts)):
            ids[p, v] = list(range(start, start + counts[p][v]))
            start += counts[p][v]
    return ids


def chunk_layer_ids(model: ModelConfig, parallel: ParallelConfig, pp_rank: int,
                    vp_stage: int = 0) -> list[int]:
    """Global ids of the decoder layers chunk ``(pp_rank, vp_stage)`` of a run holds."""
    ids = layer_ids(parallel_layer_counts(model, parallel))
    if (pp_rank, vp_stage) not in ids:
        raise ValueError(f"no chunk ({pp_rank}, {vp_stage}) in a "
                         f"{parallel.pipeline_model_parallel_size}-stage pipeline with "
                         f"{parallel.virtual_pipeline_model_parallel_size or 1} virtual stages")
    return ids[pp_rank, vp_stage]


def stage_totals(counts: list[list[int]]) -> list[int]:
    """Layers held by each pipeline stage, its virtual chunks counted together."""
    return [sum(row) for row in counts]


def layers_per_virtual_stage(num_layers: int, pp: int, vpp: int) -> int:
    """Layers in each virtual stage when every pipeline rank holds ``vpp`` of them (Megatron's
    ``num_layers_per_virtual_pipeline_stage``)."""
    return num_layers // (pp * vpp)


def virtual_stages(num_layers: int, pp: int, layers_per_stage: int) -> int:
    """Virtual stages per pipeline rank for ``--num-layers-per-virtual-pipeline-stage``
    ``layers_per_stage`` (the inverse of :func:`layers_per_virtual_stage`)."""
    return num_layers // (pp * layers_per_stage)


def pipeline_layout(counts: list[list[int]]) -> list[list[str]]:
    """megatron-core's ``pipeline_model_parallel_layout`` for ``counts``: one row per chunk in
    interleaved order, the embedding on the first chunk and the loss on the last."""
    pp, vpp = len(counts), len(counts[0])
    layout = []
    for v in range(vpp):
        for p in range(pp):
            row = ["decoder"] * counts[p][v]
            if (p, v) == (0, 0):
                row = ["embedding"] + row
            if (p, v) == (pp - 1, vpp - 1):
                row = row + ["loss"]
            layout.append(row)
    return layout
