"""Greedy generation equals Hugging Face ``generate`` token for token, at TP1, TP2 and PP2.

Each layout runs in one spawned gloo group that also checks, on the same loaded model: KV cache
== no cache, batched (prompts of different lengths, left-padded) == one at a time, stop
sequences, the position limit, and seeded sampling being reproducible. The adapter case loads
the adapter written in a TP2 x PP2 layout (so it is resharded at load) and compares with HF +
the exported PEFT adapter merged by PEFT.
"""
from __future__ import annotations

import pytest
import torch

from mindlora.config import ParallelConfig
from tests.distributed.harness import spawn
from tests.generation.conftest import MAX_POS, VOCAB, hf_greedy, prompt_ids, top2_margin

MAX_NEW = 12
PROMPTS = prompt_ids((5, 11, 3))


@pytest.fixture(scope="module")
def references(assets):
    base = hf_greedy(assets.hf, PROMPTS, MAX_NEW)
    lora = hf_greedy(assets.hf, PROMPTS, MAX_NEW, peft_dir=assets.peft)
    # The parity below is only sharp if no step is a near-tie; this is why the model is wide-init.
    assert top2_margin(assets.hf, PROMPTS, base) > 1e-3
    assert base != lora  # the adapter really changes the answers
    return base, lora


def _generator(chunks, **kw):
    from mindlora.generation.engine import Generator

    kw.setdefault("stop_sequences", [])
    return Generator(chunks, VOCAB, MAX_POS, pad_id=0, **kw)


def _tokens(gen, prompts, sampling):
    return [g.token_ids for g in gen.generate(prompts, sampling)]


def _checks(rank, world, tp, pp, assets, ref_base, ref_lora):
    from mindlora.generation.loading import load_for_generation
    from mindlora.generation.sampling import SamplingConfig

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    greedy = SamplingConfig(max_new_tokens=MAX_NEW)
    base = load_for_generation(assets.mg, None, parallel)
    gen = _generator(base.chunks)
    assert _tokens(gen, PROMPTS, greedy) == ref_base, "batched + KV cache vs HF"
    assert [_tokens(gen, [p], greedy)[0] for p in PROMPTS] == ref_base, "one at a time vs HF"
    assert _tokens(_generator(base.chunks, use_cache=False), PROMPTS, greedy) == ref_base
    assert _tokens(_generator(base.chunks, max_batch_size=2), PROMPTS, greedy) == ref_base

    # Stops: a single id and a two-id sequence taken from the reference answers.
    stops = [[ref_base[0][4]], ref_base[1][6:8]]
    out = _generator(base.chunks, stop_sequences=stops).generate(PROMPTS[:2], greedy)
    assert out[0].stopped and out[0].token_ids == ref_base[0][:ref_base[0].index(stops[0][0]) + 1]
    assert out[1].stopped and out[1].token_ids[-2:] == stops[1]
    # The position limit: a prompt 3 short of it gets 3 tokens; one at it is refused by name.
    near = [list(range(1, MAX_POS - 2))]
    assert len(gen.generate(near, greedy)[0].token_ids) == 3
    with pytest.raises(ValueError, match="x.jsonl:4: the prompt has 128 tokens, but the model "
                                         "has only 128 positions"):
        gen.generate([list(range(MAX_POS))], greedy, names=["x.jsonl:4"])

    sample = SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=40, top_p=0.9, seed=3)
    first = _tokens(gen, PROMPTS, sample)
    assert _tokens(gen, PROMPTS, sample) == first, "same seed, same tokens"
    other = SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=40, top_p=0.9, seed=4)
    assert _tokens(gen, PROMPTS, other) != first, "another seed, other tokens"

    lora = load_for_generation(assets.mg, assets.adapter, parallel)
    assert lora.lora is not None and lora.lora.r == 4
    assert _tokens(_generator(lora.chunks), PROMPTS, greedy) == ref_lora, "adapter vs HF+PEFT"
    if tp > 1:  # CCLoRA: LoRA communication folded into the base layers' collectives
        fused = load_for_generation(assets.mg, assets.adapter, parallel, lora_fusion=True)
        assert fused.lora.fold_collectives
        assert _tokens(_generator(fused.chunks), PROMPTS, greedy) == ref_lora, "--lora-fusion"


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_greedy_equals_hf_generate(assets, references, tp, pp):
    ref_base, ref_lora = references
    spawn(_checks, tp * pp, tp, pp, assets, ref_base, ref_lora)


def test_top_k_top_p_keep_only_the_likely_tokens():
    from mindlora.generation.sampling import SamplingConfig, choose_tokens

    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0, 4.5]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    top2 = choose_tokens(logits, SamplingConfig(temperature=1.0, top_k=2), g)
    assert set(top2.tolist()) == {1, 4}
    # p = 0.5: token 1 alone holds 0.504 of the mass, so it is the only one kept.
    nucleus = choose_tokens(logits, SamplingConfig(temperature=1.0, top_p=0.5), g)
    assert set(nucleus.tolist()) == {1}
    assert choose_tokens(logits[:1], SamplingConfig(), None).tolist() == [1]
