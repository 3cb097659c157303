"""Rewrite a mindlora checkpoint the way Megatron-LM / MindSpeed-LLM write theirs (for the tests).

What makes the result foreign: no ``mindlora`` metadata; ``args`` an ``argparse.Namespace`` in
Megatron's spelling (written here by hand, not by mindlora's ``megatron_args``); transformer-engine
key names (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``, ``_extra_state`` as
empty tensors and ``BytesIO``); the vocabulary padded Megatron's way (to a multiple of
``make_vocab_size_divisible_by * TP``) with non-zero garbage rows; LoRA keys in PEFT's
``lora_A.default.weight`` spelling; plain ``torch.save``.
"""
from __future__ import annotations

import argparse
import io
import os
import random
from typing import Any, Optional

import numpy as np
import torch

from mindlora.checkpoint import megatron_format as fmt
from mindlora.checkpoint.reshard import MegatronReader
from mindlora.parallel.layout import shard, split_rule

TE = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
      "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
VOCAB = ("embedding.word_embeddings.weight", "output_layer.weight")


def megatron_args(reader: MegatronReader, padded: int, divisible_by: int,
                  **extra: Any) -> argparse.Namespace:
    cfg = reader.model_config
    fields = dict(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size, num_attention_heads=cfg.num_attention_heads,
        group_query_attention=True, num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels, max_position_embeddings=cfg.max_position_embeddings,
        padded_vocab_size=padded, make_vocab_size_divisible_by=divisible_by,
        normalization="RMSNorm", norm_epsilon=cfg.norm_epsilon, swiglu=True,
        position_embedding_type="rope", rotary_base=int(cfg.rotary_base),
        add_qkv_bias=cfg.add_qkv_bias, add_bias_linear=False, qk_layernorm=cfg.qk_layernorm,
        untie_embeddings_and_output_weights=not cfg.tie_word_embeddings,
        tensor_model_parallel_size=reader.tp, pipeline_model_parallel_size=reader.pp,
        virtual_pipeline_model_parallel_size=None, transformer_impl="transformer_engine",
        params_dtype=torch.float32, use_mcore_models=True)
    fields.update(extra)
    return argparse.Namespace(**fields)


def to_megatron_lm(src: str, dst: str, divisible_by: int = 160, iteration: int = 1000,
                   lora_args: Optional[dict] = None, true_vocab_in_args: bool = False) -> str:
    """Write ``dst`` in Megatron-LM's layout from the mindlora checkpoint ``src`` (same TP x PP)."""
    reader = MegatronReader(src)
    cfg, tp = reader.model_config, reader.tp
    multiple = divisible_by * tp
    padded = (cfg.vocab_size + multiple - 1) // multiple * multiple
    g = torch.Generator().manual_seed(7)
    vocab = {}
    for key in reader.global_keys():
        if key in VOCAB:
            full = reader.full_global(key)
            garbage = torch.randn(padded - full.shape[0], full.shape[1], generator=g)
            vocab[key] = torch.cat([full, garbage.to(full.dtype)])
    extra = dict(lora_args or {})
    if true_vocab_in_args:
        extra["vocab_size"] = cfg.vocab_size  # as MindSpeed-LLM's converter sets it
    args = megatron_args(reader, padded, divisible_by, **extra)
    for p in range(reader.pp):
        for t in range(tp):
            payload = fmt.load_rank_file(reader.path(t, p), mmap=False)
            model = {}
            for key, value in payload["model"].items():
                if key in VOCAB:
                    source = vocab.get(key, vocab.get(VOCAB[0]))  # tied head: the embedding
                    value = shard(source, split_rule(key), tp, t)
                for plain, te in TE.items():
                    if key.endswith(plain):
                        key = key[: -len(plain)] + te
                key = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
                    ".lora_B.weight", ".lora_B.default.weight")
                model[key] = value
                if key.endswith(("linear_qkv.weight", "linear_fc2.weight")):
                    model[key[: -len("weight")] + "_extra_state"] = io.BytesIO(b"te-state")
                elif key.endswith(("linear_proj.weight", "linear_fc1.weight")):
                    model[key[: -len("weight")] + "_extra_state"] = torch.empty(0, dtype=torch.uint8)
            out = {"args": args, "checkpoint_version": 3.0, "iteration": iteration,
                   "model": model, "rng_state": [{"random_rng_state": random.getstate(),
                                                  "np_rng_state": np.random.get_state(),
                                                  "torch_rng_state": torch.get_rng_state()}],
                   "num_floating_point_operations_so_far": 0}
            path = fmt.rank_file_path(dst, iteration, t, p, reader.pp)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(out, path)
    with open(os.path.join(dst, fmt.TRACKER), "w") as f:
        f.write(str(iteration))
    return dst
