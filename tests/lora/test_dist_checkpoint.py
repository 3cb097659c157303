"""LoRA factors through megatron-core's distributed checkpointing: saved at TP2, loaded at TP1.

Two gloo ranks build a LoRA model (all four targets, gated ``linear_fc1``) at TP2 with seeded,
non-zero factors, save the LoRA entries of ``model.sharded_state_dict()`` with
``dist_checkpointing.save`` (the default ``torch_dist`` backend works on CPU/gloo), then rebuild the
model at TP1 (two data-parallel replicas) and load. Every loaded factor must equal the TP2 factors
gathered with the sharding table, bit for bit; ``linear_fc1``'s B also proves the gate/up halves are
split separately. The test can fail: with the inherited ``sharded_state_dict`` (factors marked
replicated) the load stops on megatron-core's global-shape check.
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch
import torch.distributed as dist

from tests.distributed.harness import spawn

KEYS = 2 * 4 * 2  # layers x targets x factors


def _model_and_lora():
    from mindlora.config import LoRAConfig, ModelConfig

    model = ModelConfig(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=96,
                        num_attention_heads=8, num_query_groups=4, vocab_size=64)
    return model, LoRAConfig(r=4, alpha=8.0, target_modules=("all-linear",))


def _build(tp: int):
    from mindlora.config import ParallelConfig
    from mindlora.models.builder import build_model
    from mindlora.runtime import init_parallel

    parallel = ParallelConfig(tensor_model_parallel_size=tp)
    init_parallel(parallel)
    model, lora = _model_and_lora()
    return build_model(model, parallel, lora)[0]


def _lora_sharded(model) -> dict:
    sharded = {k: v for k, v in model.sharded_state_dict().items() if "lora_" in k}
    assert len(sharded) == KEYS, sorted(sharded)
    return sharded


def _save_tp2(root: str, inherited: bool) -> dict[str, torch.Tensor]:
    """Save the TP2 factors; return them gathered (full, TP1 layout)."""
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from mindlora.lora.layers import LORA_LAYER_TYPES
    from mindlora.parallel.layout import split_rule
    from tests.lora.checks import gather_tp

    model = _build(2)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # replicated factors: the same values on both TP ranks
                sharded = split_rule(name).dim is not None
                gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) + sharded * tp_rank)
                p.copy_(torch.randn(p.shape, generator=gen))
    group = parallel_state.get_tensor_model_parallel_group()
    full = {n: gather_tp(p, split_rule(n), group) for n, p in model.named_parameters()
            if "lora_" in n}
    if inherited:  # the behaviour before LoRAMixin.sharded_state_dict: factors "replicated"
        for m in model.modules():
            if isinstance(m, LORA_LAYER_TYPES):
                base = ColumnParallelLinear if isinstance(m, ColumnParallelLinear) else \
                    RowParallelLinear
                m.sharded_state_dict = base.sharded_state_dict.__get__(m)
    sharded = _lora_sharded(model)
    if not inherited:
        _check_axes(sharded)
    if dist.get_rank() == 0:
        os.makedirs(root)
    dist.barrier()
    dist_checkpointing.save(sharded, root)
    return full


def _check_axes(sharded: dict) -> None:
    """The fragmentation megatron-core sees is the sharding table's (the layer axis comes first)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from mindlora.parallel.layout import split_rule

    for key, sh in sharded.items():
        rule = split_rule(key)
        if rule.parts > 1:
            assert isinstance(sh, ShardedTensorFactory), key
            continue
        assert isinstance(sh, ShardedTensor), key
        expected = [1] * len(sh.axis_fragmentations)
        if rule.dim is not None:
            expected[sh.prepend_axis_num + rule.dim] = 2
        assert list(sh.axis_fragmentations[1:]) == expected[1:], (key, sh.axis_fragmentations)


def _load_tp1(root: str) -> dict[str, torch.Tensor]:
    from megatron.core import dist_checkpointing

    model = _build(1)
    loaded = dist_checkpointing.load(_lora_sharded(model), root)
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k], (missing, unexpected)
    return {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}


def _body(rank, world, root):
    from torch.distributed.checkpoint.api import CheckpointException

    full = _save_tp2(os.path.join(root, "table"), inherited=False)
    loaded = _load_tp1(os.path.join(root, "table"))
    assert loaded.keys() == full.keys() and len(full) == KEYS
    for name, tensor in full.items():
        assert torch.equal(loaded[name], tensor), f"{name} differs after TP2 -> TP1"
    _save_tp2(os.path.join(root, "inherited"), inherited=True)
    with pytest.raises(CheckpointException,
                       match=r"Global shape mismatch for loaded .* tensor for key "
                             r"decoder\.layers\.\S+\.lora_[AB]\.weight"):
        _load_tp1(os.path.join(root, "inherited"))


def test_lora_dist_checkpoint_tp2_to_tp1(tmp_path):
    spawn(_body, 2, str(tmp_path))
