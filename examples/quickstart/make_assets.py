"""Make the quickstart's inputs locally: a tokenizer, a small Qwen3-style HF model, Alpaca data.

Nothing is downloaded. The tokenizer is a byte-level BPE trained on the spot (mindlora.data.toy,
with a Qwen3 chat template); the model is a randomly initialised Qwen3 architecture saved as a
normal Hugging Face folder; the data are Alpaca records of small additions, which a LoRA adapter
visibly learns within a minute on a laptop CPU.

    python examples/quickstart/make_assets.py OUT_DIR
"""
from __future__ import annotations

import json
import os
import sys


def main(out: str) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from mindlora.data.toy import addition_records, build_toy_tokenizer

    os.makedirs(out, exist_ok=True)
    records = addition_records(512, high=49)
    with open(os.path.join(out, "alpaca_add.json"), "w") as f:
        json.dump(records, f, indent=1)
    hf_dir = os.path.join(out, "qwen3_tiny_hf")
    corpus = [f"{r['instruction']} {r['input']} {r['output']}" for r in records]
    build_toy_tokenizer(hf_dir, chat_template="qwen3", vocab_size=512, corpus=corpus)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    vocab = ((len(tok) + 63) // 64) * 64  # round up like real checkpoints do
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=vocab, hidden_size=128, intermediate_size=352,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=32, max_position_embeddings=512, rope_theta=10000.0,
                         tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    Qwen3ForCausalLM(config).save_pretrained(hf_dir, safe_serialization=True)
    print(f"wrote {hf_dir} (vocab {vocab}) and {out}/alpaca_add.json ({len(records)} records)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "quickstart_out")
