"""Tiny random Hugging Face models built locally (no hub), and helpers for the checkpoint tests.

Every model has grouped-query attention (4 heads, 2 KV groups) so q/k/v interleaving is exercised;
between them they cover untied and tied embeddings (SmolLM2 style), qkv bias (Qwen2), q/k norms and
a head_dim that is not hidden/heads (Qwen3), and a vocabulary that TP=2 has to pad (Qwen2: 255).
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any

import pytest
import torch

from mindlora.checkpoint import megatron_format as fmt
from mindlora.config import LoRAConfig, ModelConfig
from mindlora.models.families.base import TARGET_PATHS, target_shape
from mindlora.parallel.layout import shard, split_rule

SPECS: dict[str, dict[str, Any]] = {
    "llama": dict(family="llama", tie=False, vocab=256),
    "llama_tied": dict(family="llama", tie=True, vocab=256),
    "qwen2": dict(family="qwen2", tie=False, vocab=255),
    "qwen3": dict(family="qwen3", tie=True, vocab=256, head_dim=32),
}


def build_hf_model(path: str, name: str, seed: int = 0) -> str:
    """Save a random tiny model (several safetensors shards) and dummy tokenizer files."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    spec = SPECS[name]
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[spec["family"]]
    extra = {"head_dim": spec["head_dim"]} if "head_dim" in spec else {}
    config = cls(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=spec["vocab"],
                 tie_word_embeddings=spec["tie"], max_position_embeddings=128, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():  # HF zero-inits some tensors; make every tensor informative
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(path, max_shard_size="60KB")
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 128}, f)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write('{"version": "1.0", "note": "placeholder copied byte for byte"}\n')
    return path


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf")
    return {name: build_hf_model(str(root / name), name) for name in SPECS}


def load_hf_tensors(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        out.update(load_file(path))
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def run_convert(**kw: Any) -> str:
    """convert() with progress off and MindSpeed-style keyword names."""
    from mindlora.checkpoint.convert import ConvertOptions, convert

    kw.setdefault("progress", False)
    return convert(ConvertOptions(**kw))


def random_adapter(cfg: ModelConfig, lora: LoRAConfig, seed: int = 0
                   ) -> dict[int, dict[str, torch.Tensor]]:
    """Full (TP=1) LoRA factors with non-zero B for every layer and target."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for i in range(cfg.num_layers):
        layer = {}
        for target in lora.target_modules:
            out_f, in_f = target_shape(cfg, target)
            path = TARGET_PATHS[target]
            layer[f"{path}.lora_A.weight"] = torch.randn(lora.r, in_f, generator=g) * 0.2
            layer[f"{path}.lora_B.weight"] = torch.randn(out_f, lora.r, generator=g) * 0.2
        layers[i] = layer
    return layers


def write_adapter(root: str, cfg: ModelConfig, lora: LoRAConfig,
                  layers: dict[int, dict[str, torch.Tensor]], tp: int, pp: int,
                  iteration: int = 7) -> str:
    """Write an adapter checkpoint the way training does (write_rank_file per rank, extra keys
    such as an optimizer state included), independently of the conversion sinks."""
    per_stage = cfg.num_layers // pp
    for p in range(pp):
        ids = list(range(p * per_stage, (p + 1) * per_stage))
        for t in range(tp):
            state = {f"decoder.layers.{j}.{k}": shard(v, split_rule(k), tp, t)
                     for j, i in enumerate(ids) for k, v in layers[i].items()}
            meta = fmt.build_meta("adapter", cfg, tp, pp, None, {"model": ids},
                                 cfg.vocab_size, torch.float32, lora, tp_rank=t, pp_rank=p)
            payload = {"model": state, "checkpoint_version": 3.0, "iteration": iteration,
                       "mindlora": meta, "optimizer": {"state": {}}, "rng_state": [1, 2]}
            fmt.write_rank_file(fmt.rank_file_path(root, iteration, t, p, pp), payload)
    fmt.write_tracker(root, iteration)
    return root


def hf_logits(directory: str, input_ids: torch.Tensor, adapter: str | None = None
              ) -> torch.Tensor:
    """Logits of an HF model folder (optionally with a PEFT adapter), float32, eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        return model(input_ids).logits
