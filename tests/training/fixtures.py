"""Small base checkpoints and instruction datasets for training tests (built, never downloaded)."""
from __future__ import annotations

import os

import numpy as np
import torch

from mindlora.checkpoint import megatron_format as fmt
from mindlora.config import ModelConfig
from mindlora.data.indexed import IndexedDatasetWriter


def tiny_model(**kw) -> ModelConfig:
    base = dict(family="qwen2", num_layers=4, hidden_size=64, ffn_hidden_size=128,
                num_attention_heads=4, num_query_groups=2, vocab_size=256,
                max_position_embeddings=128, add_qkv_bias=True, tie_word_embeddings=False)
    base.update(kw)
    return ModelConfig(**base)


def full_state(model: ModelConfig, seed: int = 0, device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A random full (TP=1) megatron-core state dict with global layer ids.

    ``device``/``dtype``: where to draw it (bench/train.py --device cuda draws 8B weights on the
    GPU in bf16); the CPU float32 default gives the same tensors as ever.
    """
    g = torch.Generator(device).manual_seed(seed)
    h, d, f = model.hidden_size, model.kv_channels, model.ffn_hidden_size
    qkv = (model.num_attention_heads + 2 * model.num_query_groups) * d

    def rnd(*shape, scale=0.08):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype) * scale

    sd = {"embedding.word_embeddings.weight": rnd(model.vocab_size, h, scale=0.5),
          "decoder.final_layernorm.weight": 1 + rnd(h)}
    if not model.tie_word_embeddings:
        sd["output_layer.weight"] = rnd(model.vocab_size, h)
    for i in range(model.num_layers):
        p = f"decoder.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + rnd(h)
        sd[p + "self_attention.linear_qkv.weight"] = rnd(qkv, h)
        if model.add_qkv_bias:
            sd[p + "self_attention.linear_qkv.bias"] = rnd(qkv)
        if model.qk_layernorm:
            sd[p + "self_attention.q_layernorm.weight"] = 1 + rnd(d)
            sd[p + "self_attention.k_layernorm.weight"] = 1 + rnd(d)
        sd[p + "self_attention.linear_proj.weight"] = rnd(h, model.num_attention_heads * d)
        sd[p + "pre_mlp_layernorm.weight"] = 1 + rnd(h)
        sd[p + "mlp.linear_fc1.weight"] = rnd(2 * f, h)
        sd[p + "mlp.linear_fc2.weight"] = rnd(h, f)
    return sd


def write_base_checkpoint(root: str, model: ModelConfig, seed: int = 0) -> str:
    """A TP1 x PP1 base checkpoint in mindlora's Megatron layout."""
    meta = fmt.build_meta("base", model, 1, 1, None, {"model": list(range(model.num_layers))},
                          model.vocab_size, torch.float32)
    payload = {"model": full_state(model, seed), "checkpoint_version": fmt.CHECKPOINT_VERSION,
               "iteration": 1, "mindlora": meta}
    fmt.write_rank_file(fmt.rank_file_path(root, "release", 0, 0, 1), payload)
    fmt.write_tracker(root, "release")
    return root


def write_instruction_data(prefix: str, n: int = 64, vocab: int = 256, seed: int = 0,
                           min_len: int = 6, max_len: int = 30) -> str:
    """Samples whose first part is a random, masked prompt (-100 labels) and the rest a learnable
    response: each token is the previous one plus 1 (mod vocab)."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    names = ("input_ids", "attention_mask", "labels")
    writers = {k: IndexedDatasetWriter(f"{prefix}_packed_{k}_document") for k in names}
    for _ in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        prompt = int(rng.integers(1, length - 1))
        ids = rng.integers(0, vocab, length)
        ids[prompt:] = (ids[prompt - 1] + 1 + np.arange(length - prompt)) % vocab
        labels = ids.copy()
        labels[:prompt] = -100
        writers["input_ids"].add_document(ids)
        writers["attention_mask"].add_document(np.ones(length, np.int64))
        writers["labels"].add_document(labels)
    for w in writers.values():
        w.finalize()
        w.commit()
    return prefix


def preprocess_alpaca(root: str, n: int = 96, seed: int = 0, **options) -> tuple[str, int]:
    """Alpaca records -> ``tools/preprocess_data.py``'s pipeline (qwen template, toy BPE).

    Returns (data prefix, tokenizer vocabulary size). Real preprocessed data: chat template,
    prompt tokens masked, one sample per document (unless ``options`` — further
    ``PreprocessConfig`` fields such as ``pack=True, seq_length=64`` — say otherwise).
    """
    import json

    from mindlora.data.preprocess import PreprocessConfig, run_preprocess
    from mindlora.data.tokenizer import load_tokenizer
    from mindlora.data.toy import addition_records, build_toy_tokenizer

    records = addition_records(n, seed)
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "alpaca.json")
    with open(path, "w") as f:
        json.dump(records, f)
    tok_dir = build_toy_tokenizer(os.path.join(root, "tokenizer"), chat_template="qwen3",
                                  vocab_size=300,
                                  corpus=[f"{r['instruction']} {r['input']} {r['output']}"
                                          for r in records])
    prefix = os.path.join(root, "data", "alpaca")
    run_preprocess(PreprocessConfig(input=path, tokenizer_name_or_path=tok_dir,
                                    output_prefix=prefix, prompt_type="qwen",
                                    log_interval=10 ** 9, **options))
    return prefix, load_tokenizer(tok_dir).vocab_size
