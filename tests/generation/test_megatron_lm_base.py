"""Generation from a Megatron-LM / MindSpeed-LLM base checkpoint (no mindlora metadata, padded
vocabulary with garbage rows, transformer-engine key names): the true vocabulary size comes from
the HF config.json in the tokenizer folder, as in training, and the greedy answers equal HF +
PEFT's. Without that folder the load fails with the check's own message."""
from __future__ import annotations

import pytest

from tests.checkpoint.megatron_lm_files import to_megatron_lm
from tests.distributed.harness import spawn
from tests.generation.conftest import MAX_POS, VOCAB, hf_greedy, prompt_ids

PROMPTS = prompt_ids((4, 9))


def _checks(rank, world, megatron_dir, assets, expect):
    from mindlora.config import ParallelConfig
    from mindlora.generation.engine import Generator
    from mindlora.generation.loading import load_for_generation
    from mindlora.generation.sampling import SamplingConfig

    with pytest.raises(ValueError, match=r"the true vocabulary size is unknown"):
        load_for_generation(megatron_dir, None, ParallelConfig())
    loaded = load_for_generation(megatron_dir, assets.adapter, ParallelConfig(),
                                 hf_config_dir=assets.hf)
    assert loaded.model.vocab_size == VOCAB
    gen = Generator(loaded.chunks, VOCAB, MAX_POS, stop_sequences=[], pad_id=0)
    out = [g.token_ids for g in gen.generate(PROMPTS, SamplingConfig(max_new_tokens=8))]
    assert out == expect, "Megatron-LM base + adapter vs HF + PEFT"


def test_generate_from_megatron_lm_base(assets, tmp_path):
    megatron_dir = to_megatron_lm(assets.mg, str(tmp_path / "megatron"))
    expect = hf_greedy(assets.hf, PROMPTS, 8, peft_dir=assets.peft)
    spawn(_checks, 1, megatron_dir, assets, expect)
