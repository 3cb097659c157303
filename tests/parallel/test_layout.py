"""mindlora.parallel.layout, the one owner of "which rank holds which slice", on its own.

The distributed tests (tests/lora, tests/checkpoint, tests/training) show that models, checkpoint
files and adapters built from these answers agree with a single process; here each answer is
checked against a value worked out by hand, so a wrong rule fails here first, naming the rule.
"""
from __future__ import annotations

import pytest
import torch

from mindlora.config import ModelConfig, ParallelConfig
from mindlora.parallel import layout
from mindlora.parallel.layout import REPLICATED, Split


def _model(num_layers: int = 8, vocab_size: int = 50) -> ModelConfig:
    return ModelConfig(family="llama", num_layers=num_layers, hidden_size=64, ffn_hidden_size=96,
                       num_attention_heads=8, num_query_groups=4, vocab_size=vocab_size)


# ---------------------------------------------------------------- pipeline stages

def test_even_uneven_and_first_last_layer_counts() -> None:
    assert layout.layer_counts(8, 2) == [[4], [4]]
    assert layout.layer_counts(8, 2, vpp=2) == [[2, 2], [2, 2]]
    assert layout.layer_counts(8, 2, num_layer_list=[3, 5]) == [[3], [5]]
    # Megatron-LM's decoder_first/last_pipeline_num_layers: the middle stages share the rest
    assert layout.layer_counts(10, 4, first=1, last=3) == [[1], [3], [3], [3]]
    assert layout.layer_counts(10, 3, first=2) == [[2], [4], [4]]


def test_num_layer_list_assigns_consecutive_layers() -> None:
    parallel = ParallelConfig(pipeline_model_parallel_size=3, num_layer_list=[1, 4, 3])
    ids = [layout.chunk_layer_ids(_model(), parallel, p) for p in range(3)]
    assert ids == [[0], [1, 2, 3, 4], [5, 6, 7]]
    assert layout.stage_totals(layout.parallel_layer_counts(_model(), parallel)) == [1, 4, 3]


def test_virtual_stages_interleave() -> None:
    """Chunk (p, v) follows every chunk of virtual stage v-1 (Megatron's interleaved order)."""
    parallel = ParallelConfig(pipeline_model_parallel_size=2,
                              virtual_pipeline_model_parallel_size=2)
    got = {(p, v): layout.chunk_layer_ids(_model(), parallel, p, v)
           for p in range(2) for v in range(2)}
    assert got == {(0, 0): [0, 1], (1, 0): [2, 3], (0, 1): [4, 5], (1, 1): [6, 7]}
    counts = layout.parallel_layer_counts(_model(), parallel)
    assert layout.stage_totals(counts) == [4, 4]
    assert layout.pipeline_layout(counts) == [
        ["embedding", "decoder", "decoder"], ["decoder", "decoder"],
        ["decoder", "decoder"], ["decoder", "decoder", "loss"]]
    with pytest.raises(ValueError, match=r"no chunk \(0, 2\) in a 2-stage pipeline with 2 "
                                         r"virtual stages"):
        layout.chunk_layer_ids(_model(), parallel, 0, 2)


def test_layers_per_virtual_stage_and_its_inverse() -> None:
    assert layout.layers_per_virtual_stage(24, 2, 3) == 4
    assert layout.layers_per_virtual_stage(24, 2, 4) == 3
    assert layout.virtual_stages(24, 2, 4) == 3
    assert layout.virtual_stages(24, 2, 3) == 4


# ---------------------------------------------------------------- vocabulary

def test_vocab_padding() -> None:
    assert layout.pad_vocab(50, 4) == 52  # the last TP rank holds 2 padding rows
    assert layout.pad_vocab(52, 4) == 52
    assert layout.pad_vocab(50, 1) == 50
    assert layout.pad_vocab(50, 2, divisible_by=128) == 256


# ---------------------------------------------------------------- experts

def test_expert_ownership_and_renumbering() -> None:
    key = "decoder.layers.1.mlp.experts.local_experts.{}.linear_fc1.weight"
    # 8 experts over EP=4: rank r holds experts 2r, 2r+1, numbered 0, 1 there
    assert layout.experts_per_rank(8, 4) == 2
    assert [layout.expert_owner(key.format(e), 8, 4) for e in (0, 5, 7)] == [
        (0, key.format(0)), (2, key.format(1)), (3, key.format(1))]
    for e in range(8):
        owner, local = layout.expert_owner(key.format(e), 8, 4)
        assert layout.expert_global_key(local, owner, 2) == key.format(e)
        assert layout.expert_index(local) == e % 2
    dense = "decoder.layers.1.mlp.router.weight"
    assert layout.expert_owner(dense, 8, 4) == (-1, dense)
    assert layout.expert_index(dense) is None and layout.expert_global_key(dense, 3, 2) == dense


# ---------------------------------------------------------------- the TP split table

@pytest.mark.parametrize("key,rule", [
    ("embedding.word_embeddings.weight", Split(0)),
    ("decoder.layers.0.self_attention.linear_qkv.weight", Split(0)),
    ("decoder.layers.0.self_attention.linear_qkv.lora_A.weight", REPLICATED),
    ("decoder.layers.0.self_attention.linear_qkv.lora_B.weight", Split(0)),
    ("decoder.layers.0.self_attention.linear_proj.weight", Split(1)),
    ("decoder.layers.0.self_attention.linear_proj.lora_A.weight", Split(1)),
    ("decoder.layers.0.self_attention.linear_proj.lora_B.weight", REPLICATED),
    ("decoder.layers.0.mlp.linear_fc1.weight", Split(0, parts=2)),
    ("decoder.layers.0.mlp.linear_fc1.lora_B.weight", Split(0, parts=2)),
    ("decoder.layers.0.mlp.experts.local_experts.3.linear_fc2.lora_A.weight", Split(1)),
    ("decoder.layers.0.input_layernorm.weight", REPLICATED),
    ("decoder.layers.0.mlp.router.weight", REPLICATED),
])
def test_split_table(key: str, rule: Split) -> None:
    assert layout.split_rule(key) == rule


def test_lora_factor_axes_follow_the_table() -> None:
    fc1 = layout.lora_factor_splits("decoder.layers.0.mlp.linear_fc1.")
    assert fc1 == {"lora_A.weight": REPLICATED, "lora_B.weight": Split(0, parts=2)}
    assert layout.lora_factor_splits("decoder.layers.0.mlp.linear_fc1.", gated_fc1=False)[
        "lora_B.weight"] == Split(0)
    proj = layout.lora_factor_splits("decoder.layers.0.self_attention.linear_proj.")
    assert proj == {"lora_A.weight": Split(1), "lora_B.weight": REPLICATED}
    with pytest.raises(KeyError, match="no tensor-parallel split rule for parameter "
                                       "'decoder.layers.0.mlp.linear_fc3.weight'"):
        layout.split_rule("decoder.layers.0.mlp.linear_fc3.weight")


def test_gated_shards_hold_their_gate_and_up_halves() -> None:
    gate, up = torch.arange(8.0).reshape(4, 2), 100 + torch.arange(8.0).reshape(4, 2)
    full = torch.cat([gate, up])
    rule = layout.split_rule("mlp.linear_fc1.weight")
    shards = [layout.shard(full, rule, 2, r) for r in range(2)]
    assert torch.equal(shards[1], torch.cat([gate[2:], up[2:]]))
    assert layout.shard_shape(full.shape, rule, 2) == tuple(shards[0].shape) == (4, 2)
    assert layout.shard_shape((8, 6), Split(1), 2) == (8, 3)
    assert layout.shard_shape((8, 6), REPLICATED, 2) == (8, 6)
    assert torch.equal(layout.gather(shards, rule), full)
    assert torch.equal(layout.gather([layout.shard(full, Split(1), 2, r) for r in range(2)],
                                     Split(1)), full)
    with pytest.raises(ValueError, match="dimension 0 of size 4 cannot be split into 3 "
                                         "tensor-parallel shards"):
        layout.shard(full, rule, 3, 0)
