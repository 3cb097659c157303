"""A whole LoRA GPTModel under TP = 1, 2, 4 (with and without sequence parallel) vs plain PyTorch.

One seeded FULL state dict (megatron layout, non-zero lora_B) is sharded per rank with the
sharding table and loaded into the built model; ``tests/lora/reference.py`` runs the same weights
unsharded. Compared: logits, the gradient w.r.t. the embedding output (the decoder's input) and
every LoRA gradient, after a backward pass with a random upstream gradient on the logits.
Variants cover each target alone and all-linear, GQA and MHA, qk-layernorm, qkv bias, tied
embeddings, a head dim other than hidden / heads, a padded vocabulary and rsLoRA scaling.
"""
from __future__ import annotations

import math

import pytest
import torch
from megatron.core import parallel_state

from mindlora.config import LoRAConfig, ModelConfig, ParallelConfig
from mindlora.models.builder import build_model
from mindlora.parallel.layout import pad_vocab
from mindlora.parallel.layout import REPLICATED, Split, shard, split_rule
from mindlora.runtime import init_parallel
from tests.distributed.harness import spawn
from tests.lora import reference
from tests.lora.checks import SEQ, compare_all, gather_tp, load_sharded

SEQ_LEN, BATCH = 8, 2


def _model(**kw) -> ModelConfig:
    # 8 heads / 4 query groups: at TP=4 each rank holds 2 query heads of 1 group. rotary_base is
    # not the default, so a builder that dropped it would fail the comparison.
    base = dict(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=96,
                num_attention_heads=8, num_query_groups=4, vocab_size=64, rotary_base=1000.0)
    return ModelConfig(**{**base, **kw})


VARIANTS = {
    "all-linear, GQA, qk-norm, qkv-bias": (
        _model(qk_layernorm=True, add_qkv_bias=True), LoRAConfig(r=4, alpha=8.0,
                                                                 target_modules=("all-linear",))),
    "linear_qkv, GQA, qkv-bias, tied": (
        _model(add_qkv_bias=True, tie_word_embeddings=True),
        LoRAConfig(r=4, alpha=8.0, target_modules=("linear_qkv",))),
    # Qwen3-like: head dim 16 != hidden / heads (8), so linear_proj's input is 128 wide.
    "linear_proj, MHA, qk-norm, head-dim 16": (
        _model(num_query_groups=8, qk_layernorm=True, kv_channels=16),
        LoRAConfig(r=4, alpha=8.0, target_modules=("linear_proj",))),
    # vocab 62 is padded to 64 at TP=4: logits of padded rows are compared too.
    "linear_fc1, GQA, vocab 62": (
        _model(vocab_size=62), LoRAConfig(r=4, alpha=8.0, target_modules=("linear_fc1",))),
    "linear_fc2, GQA, rsLoRA": (
        _model(), LoRAConfig(r=4, alpha=8.0, target_modules=("linear_fc2",), use_rslora=True)),
}


def _scaling(lora: LoRAConfig) -> float:
    return lora.alpha / (math.sqrt(lora.r) if lora.use_rslora else lora.r)


def model_parity(name: str, tp: int, rank: int, sp: bool, seed: int = 0, perturb: bool = False):
    """Run variant ``name`` sharded and unsharded; return ``(what, actual, expected)`` triples.

    Args:
        perturb: nudge one element of the last TP rank's fc2 lora_A shard by 1e-3 after loading
            (the "can fail" check).
    """
    mc, lc = VARIANTS[name]
    group = parallel_state.get_tensor_model_parallel_group()
    pc = ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp)
    model = build_model(mc, pc, lc)[0]
    vocab = pad_vocab(mc.vocab_size, tp)
    full = reference.make_state_dict(mc, lc, vocab, seed)
    load_sharded(model, full, tp, rank)
    if perturb and rank == tp - 1:
        with torch.no_grad():
            model.decoder.layers[1].mlp.linear_fc2.lora_A.weight[0, 0] += 1e-3

    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, mc.vocab_size, (BATCH, SEQ_LEN), generator=gen)
    pos = torch.arange(SEQ_LEN).expand(BATCH, -1)
    grad_logits = torch.randn(BATCH, SEQ_LEN, vocab, generator=gen)
    embedded = []

    def make_leaf(module, args, output):  # the decoder's input becomes a leaf we can read .grad of
        embedded.append(output.detach().requires_grad_(True))
        return embedded[-1]

    hook = model.embedding.register_forward_hook(make_leaf)
    logits = model(ids, pos, attention_mask=None)
    hook.remove()
    (logits * shard(grad_logits, Split(-1), tp, rank)).sum().backward()

    sd = {k: v.clone().requires_grad_("lora_" in k) for k, v in full.items()}
    hidden = reference.embed(sd, ids).detach().requires_grad_(True)
    ref_logits = reference.decoder_logits(sd, mc, _scaling(lc), hidden)
    (ref_logits * grad_logits).sum().backward()

    act_rule = SEQ if sp else REPLICATED
    pairs = [(f"{name}: logits", gather_tp(logits, Split(-1), group), ref_logits.detach()),
             (f"{name}: embedding output", gather_tp(embedded[0], act_rule, group), hidden),
             (f"{name}: decoder input grad", gather_tp(embedded[0].grad, act_rule, group),
              hidden.grad)]
    for key, param in model.named_parameters():
        if "lora_" in key:
            assert param.requires_grad and param.grad is not None, f"{key} got no gradient"
            pairs.append((f"{name}: {key} grad",
                          gather_tp(param.grad, split_rule(key), group), sd[key].grad))
        else:
            assert not param.requires_grad and param.grad is None, f"base {key} is trainable"
    assert sum("lora_" in p[0] for p in pairs) == 2 * mc.num_layers * len(lc.target_modules)
    return pairs


def _all_variants(rank: int, world: int) -> None:
    tp = world
    init_parallel(ParallelConfig(tensor_model_parallel_size=tp))
    for sp in ((False, True) if tp > 1 else (False,)):
        for i, name in enumerate(VARIANTS):
            compare_all(model_parity(name, tp, rank, sp, seed=i))
    # The comparison can fail: a 1e-3 nudge to one element of one rank's shard must be caught.
    with pytest.raises(AssertionError, match="logits"):
        compare_all(model_parity("linear_fc2, GQA, rsLoRA", tp, rank, tp > 1, perturb=True))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gpt_model_matches_reference(tp: int) -> None:
    spawn(_all_variants, tp)
