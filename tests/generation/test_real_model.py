"""TP1 greedy parity with Hugging Face on the real SmolLM2-135M-Instruct (slow; opt-in).

Runs when ``MINDLORA_SLOW=1`` and the quickstart's cached HF copy of the model exists
(``$MINDLORA_SMOLLM2_HF``, default ``~/.cache/mindlora/smollm2-135m-instruct-hf``, written by the
quickstart's asset step). It converts the model, answers chat prompts with the ChatML template
(the model's own) with and without a random adapter, and compares with transformers (+ PEFT,
merged) ``generate`` token for token, the stop at ``<|im_end|>`` included.
"""
from __future__ import annotations

import os

import pytest

from mindlora.config import LoRAConfig
from tests.checkpoint.conftest import random_adapter, run_convert, write_adapter
from tests.distributed.harness import spawn
from tests.generation.conftest import hf_greedy

HF_DIR = os.environ.get("MINDLORA_SMOLLM2_HF",
                        os.path.expanduser("~/.cache/mindlora/smollm2-135m-instruct-hf"))
MAX_NEW = 24
CHATS = [{"prompt": "Who are you?"},
         {"prompt": "Give three tips for staying healthy."},
         {"messages": [{"role": "system", "content": "You are a concise assistant."},
                       {"role": "user", "content": "What is the capital of France?"}]}]

pytestmark = pytest.mark.skipif(
    os.environ.get("MINDLORA_SLOW") != "1" or not os.path.isdir(HF_DIR),
    reason="slow real-model test: set MINDLORA_SLOW=1 and have the quickstart's SmolLM2 HF copy "
           f"at {HF_DIR} (or MINDLORA_SMOLLM2_HF)")


def _generate(rank, world, mg, adapter, ids, stops, pad_id, out):
    from mindlora.config import ParallelConfig
    from mindlora.generation import Generator, SamplingConfig
    from mindlora.generation.loading import load_for_generation

    for name, lora in (("base", None), ("lora", adapter)):
        loaded = load_for_generation(mg, lora, ParallelConfig())
        gen = Generator(loaded.chunks, loaded.model.vocab_size,
                        loaded.model.max_position_embeddings, stops, pad_id)
        res = gen.generate(ids, SamplingConfig(max_new_tokens=MAX_NEW))
        with open(os.path.join(out, f"{name}.txt"), "w") as f:
            f.write(repr([r.token_ids for r in res]))


def test_smollm2_tp1_equals_hf(tmp_path):
    import ast

    from mindlora.checkpoint.hf_format import HFSource
    from mindlora.data.tokenizer import load_tokenizer
    from mindlora.generation import ChatFormat, PromptRecord

    mg = run_convert(load_model_type="hf", save_model_type="mg", load_dir=HF_DIR,
                     save_dir=str(tmp_path / "mg"), model_type_hf="llama")
    cfg = HFSource(HF_DIR, "llama").model_config
    lora = LoRAConfig(r=4, alpha=2.0, target_modules=("linear_qkv", "linear_fc2"))
    adapter = write_adapter(str(tmp_path / "adapter"), cfg, lora,
                            random_adapter(cfg, lora, seed=2), tp=1, pp=1)
    peft = str(tmp_path / "peft")
    run_convert(load_model_type="hf", save_model_type="hf", load_dir=HF_DIR,
                model_type_hf="llama", lora_load=adapter, save_lora_to_hf=True, save_dir=peft,
                lora_r=lora.r)
    chat = ChatFormat(load_tokenizer(HF_DIR), "chatml")
    ids = chat.encode([PromptRecord(c, "x") for c in CHATS])
    stops = chat.stop_sequences()
    spawn(_generate, 1, mg, adapter, ids, stops, chat.tok.pad_id, str(tmp_path))
    stop_ids = {s[0] for s in stops if len(s) == 1}

    def cut(seq):
        ends = [i for i, t in enumerate(seq) if t in stop_ids]
        return seq[:ends[0] + 1] if ends else seq

    for name, peft_dir in (("base", None), ("lora", peft)):
        ours = ast.literal_eval((tmp_path / f"{name}.txt").read_text())
        refs = [cut(r) for r in hf_greedy(HF_DIR, ids, MAX_NEW, peft_dir=peft_dir)]
        assert ours == refs, name
    print("\n".join(repr(chat.answer_text(t)) for t in
                    ast.literal_eval((tmp_path / "base.txt").read_text())))
