"""LoRA initialisation, merge/unmerge and the frozen base, on a real GPTModel in 4 gloo ranks.

* TP-invariant init: the gathered A of a TP=4 model equals a TP=1 model's bit for bit (kaiming
  and gaussian), B is zero, every (layer, target) draws its own A, and a PP=2 stage holds the
  same A for its layers as the TP=1 model does.
* Merge per TP shard (TP=2, with and without sequence parallel): merged logits equal unmerged
  ones, each merged shard equals the shard of the full ``W + s * B @ A``, and unmerge restores W.
* Only LoRA parameters are trainable: megatron-core's DDP allocates grad buffers for them alone,
  and ``parameter_report`` counts exactly them.
"""
from __future__ import annotations

import math

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

from mindlora.config import LoRAConfig, ModelConfig, ParallelConfig
from mindlora.lora.layers import LORA_LAYER_TYPES
from mindlora.models.builder import build_model, parameter_report, transformer_config
from mindlora.parallel.layout import chunk_layer_ids, shard, split_rule
from mindlora.runtime import init_parallel
from tests.distributed.harness import spawn
from tests.lora import reference
from tests.lora.checks import assert_matches, gather_tp, load_sharded

MODEL = ModelConfig(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=96,
                    num_attention_heads=8, num_query_groups=4, vocab_size=64,
                    qk_layernorm=True, add_qkv_bias=True)
ALL = LoRAConfig(r=4, alpha=8.0, target_modules=("all-linear",))


def _gathered_lora(tp: int, lora: LoRAConfig) -> dict[str, torch.Tensor]:
    parallel = ParallelConfig(tensor_model_parallel_size=tp)
    init_parallel(parallel)
    model = build_model(MODEL, parallel, lora)[0]
    group = parallel_state.get_tensor_model_parallel_group()
    return {k: gather_tp(p.detach(), split_rule(k), group)
            for k, p in model.named_parameters() if "lora_" in k}


def _check_tp_invariant_init() -> None:
    for init_a in ("kaiming", "gaussian"):
        lora = LoRAConfig(r=4, alpha=8.0, target_modules=("all-linear",), init_a=init_a, seed=7)
        tp1, tp4 = _gathered_lora(1, lora), _gathered_lora(4, lora)
        assert tp1.keys() == tp4.keys() and len(tp1) == 2 * 4 * MODEL.num_layers
        for key in tp1:
            assert torch.equal(tp1[key], tp4[key]), f"{init_a}: {key} depends on the TP size"
        a_mats = {k: v for k, v in tp1.items() if "lora_A" in k}
        for key, a in a_mats.items():
            assert not tp1[key.replace("lora_A", "lora_B")].any(), f"{key}: B is not zero"
            if init_a == "kaiming":  # kaiming_uniform_(a=sqrt(5)) as HF PEFT: U(+-1/sqrt(in))
                bound = 1.0 / math.sqrt(a.shape[1])
                assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound, key
        if init_a == "gaussian":  # N(0, (1/r)^2), as PEFT's "gaussian"; all A pooled for the std
            std = torch.cat([a.flatten() for a in a_mats.values()]).std().item()
            assert abs(std - 1.0 / lora.r) < 0.05 / lora.r, std
        flat = [a.flatten()[:32] for a in a_mats.values()]
        assert len({tuple(f.tolist()) for f in flat}) == len(flat), "two targets share one A"
        _check_pipeline_invariant_init(lora, tp1)


def _check_pipeline_invariant_init(lora: LoRAConfig, tp1: dict[str, torch.Tensor]) -> None:
    """A layer's A depends on its global layer number, not on which pipeline stage holds it."""
    parallel = ParallelConfig(pipeline_model_parallel_size=2)
    init_parallel(parallel)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    model = build_model(MODEL, parallel, lora)[0]
    global_ids = chunk_layer_ids(MODEL, parallel, pp_rank)
    for key, p in model.named_parameters():
        if "lora_" in key:
            local = int(key.split(".")[2])
            global_key = key.replace(f"layers.{local}.", f"layers.{global_ids[local]}.", 1)
            assert torch.equal(p, tp1[global_key]), f"PP stage {pp_rank}: {key} != {global_key}"


def _check_merge(sp: bool) -> None:
    tp = 2
    parallel = ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp)
    init_parallel(parallel)
    rank = parallel_state.get_tensor_model_parallel_rank()
    model = build_model(MODEL, parallel, ALL)[0]
    full = reference.make_state_dict(MODEL, ALL, 64, seed=3)
    load_sharded(model, full, tp, rank)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(8).expand(2, -1)
    named = {n: m for n, m in model.named_modules() if isinstance(m, LORA_LAYER_TYPES)}
    before = {n: m.weight.detach().clone() for n, m in named.items()}
    with torch.no_grad():
        unmerged = model(ids, pos, attention_mask=None)
        for m in named.values():
            m.merge()
            m.merge()  # idempotent: a second merge must not add the delta twice
        for n, m in named.items():
            w = full[n + ".weight"] + ALL.scaling * full[n + ".lora_B.weight"] @ full[
                n + ".lora_A.weight"]
            assert_matches(m.weight, shard(w, split_rule(n + ".weight"), tp, rank),
                           f"merged shard {n}")
        assert_matches(model(ids, pos, attention_mask=None), unmerged, f"merged logits sp={sp}")
        for m in named.values():
            m.unmerge()
        for n, m in named.items():
            assert not m.merged
            assert_matches(m.weight, before[n], f"unmerged {n}")
        assert_matches(model(ids, pos, attention_mask=None), unmerged, f"unmerged logits sp={sp}")


def _check_frozen_base() -> None:
    parallel = ParallelConfig(tensor_model_parallel_size=2)
    init_parallel(parallel)
    config = transformer_config(MODEL, parallel)
    model = build_model(MODEL, parallel, ALL, config=config)[0]
    lora = {k: p for k, p in model.named_parameters() if "lora_" in k}
    assert {k for k, p in model.named_parameters() if p.requires_grad} == set(lora)
    # Expected trainable count from the full shapes and the sharding table, not from the model.
    expected = 0
    for target, (out, inp) in reference.linear_shapes(MODEL).items():
        for factor, shape in (("lora_A", (ALL.r, inp)), ("lora_B", (out, ALL.r))):
            rule = split_rule(f"{target}.{factor}.weight")
            expected += shard(torch.empty(shape), rule, 2, 0).numel() * MODEL.num_layers
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in lora.values()) == expected
    assert parameter_report([model]) == (f"trainable params: {expected:,} || all params: "
                                         f"{total:,} || trainable%: {100 * expected / total:.4f}")
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    assert sum(b.numel_unpadded for b in ddp.buffers) == expected, "base got a grad buffer"


def _body(rank: int, world: int) -> None:
    _check_tp_invariant_init()
    _check_merge(sp=False)
    _check_merge(sp=True)
    _check_frozen_base()


def test_init_merge_and_frozen_base() -> None:
    spawn(_body, 4)
