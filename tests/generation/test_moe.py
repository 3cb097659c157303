"""Greedy generation of a mixture-of-experts model equals Hugging Face ``generate``.

A random Qwen3-MoE (4 layers, 4 experts, top-2, GQA; weights N(0, 0.1), router N(0, 1) so that
neither the next token nor a routing decision is a near tie) is converted and generated with at
TP1, TP2 and EP2 (with and without the KV cache); the converted checkpoint is also loaded at
TP2 x EP2 on 4 ranks.
"""
from __future__ import annotations

import pytest
import torch

from mindlora.config import ParallelConfig
from tests.checkpoint.conftest import run_convert
from tests.distributed.harness import spawn
from tests.generation.conftest import MAX_POS, VOCAB, hf_greedy, prompt_ids, top2_margin

MAX_NEW = 10
PROMPTS = prompt_ids((5, 9, 3))


def build_qwen3_moe(path: str) -> str:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                            head_dim=16, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=VOCAB, num_experts=4,
                            num_experts_per_tok=2, norm_topk_prob=True,
                            max_position_embeddings=MAX_POS, tie_word_embeddings=False,
                            bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.0 if name.endswith("gate.weight") else 0.1
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else
                    scale * torch.randn_like(p))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def moe_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_moe")
    hf = build_qwen3_moe(str(root / "hf"))
    mg = run_convert(load_model_type="hf", save_model_type="mg", load_dir=hf,
                     save_dir=str(root / "mg"), model_type_hf="qwen3-moe")
    ref = hf_greedy(hf, PROMPTS, MAX_NEW)
    assert top2_margin(hf, PROMPTS, ref) > 1e-3
    return mg, ref


def _checks(rank, world, mg, ref, layouts):
    from mindlora.generation.engine import Generator
    from mindlora.generation.loading import load_for_generation
    from mindlora.generation.sampling import SamplingConfig

    greedy = SamplingConfig(max_new_tokens=MAX_NEW)
    for tp, ep in layouts:
        loaded = load_for_generation(mg, None, ParallelConfig(tensor_model_parallel_size=tp,
                                                              expert_model_parallel_size=ep))
        for cache in (True, False):
            gen = Generator(loaded.chunks, VOCAB, MAX_POS, pad_id=0, stop_sequences=[],
                            use_cache=cache)
            out = [g.token_ids for g in gen.generate(PROMPTS, greedy)]
            assert out == ref, f"TP{tp} EP{ep} cache={cache}: {out} != {ref}"


def test_moe_greedy_equals_hf_generate(moe_assets):
    mg, ref = moe_assets
    spawn(_checks, 1, mg, ref, [(1, 1)])
    spawn(_checks, 2, mg, ref, [(2, 1), (1, 2)])
    spawn(_checks, 4, mg, ref, [(2, 2)])


def test_generate_cli_takes_expert_parallelism():
    from mindlora.generation.args import parse_args

    cfg = parse_args(["--load", "x", "--tokenizer-name-or-path", "t", "--prompt-type", "qwen",
                      "--prompts", "p.jsonl", "--expert-model-parallel-size", "2"])
    assert cfg.parallel.expert_model_parallel_size == 2
