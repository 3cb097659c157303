"""Family key maps and transforms: pure functions, checked on tiny tensors and real config.json."""
from __future__ import annotations

import json
import os

import pytest
import torch

from mindlora.config import ModelConfig
from mindlora.models.families import family_for_hf_config, get_family
from mindlora.models.families.base import interleave_qkv, split_qkv, target_shape, to_hf


def _cfg(**kw) -> ModelConfig:
    base = dict(family="llama", num_layers=1, hidden_size=16, ffn_hidden_size=24,
                num_attention_heads=4, num_query_groups=2, vocab_size=32, kv_channels=3)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("tail", [(), (5,), (2,)])
def test_qkv_interleave_layout_and_inverse(tail):
    cfg = _cfg()
    hd, g = cfg.kv_channels, cfg.num_query_groups
    q = torch.arange(4 * hd * max(1, tail[0] if tail else 1)).float().reshape(4 * hd, *tail)
    k, v = -1 - torch.rand(g * hd, *tail), 100 + torch.rand(g * hd, *tail)
    fused = interleave_qkv(q, k, v, g)
    # Group 0 = q heads 0,1 then k head 0 then v head 0 (megatron-core's per-group layout).
    assert torch.equal(fused[: 2 * hd], q[: 2 * hd])
    assert torch.equal(fused[2 * hd: 3 * hd], k[:hd])
    assert torch.equal(fused[3 * hd: 4 * hd], v[:hd])
    assert torch.equal(fused[4 * hd: 6 * hd], q[2 * hd:])
    back = split_qkv(fused, g, cfg.num_attention_heads, hd)
    for a, b in zip(back, (q, k, v)):
        assert torch.equal(a, b)


def test_transforms_run_on_meta_tensors():
    cfg = _cfg()
    fam = get_family("llama")
    tmap = fam.lora_map(cfg, "linear_qkv")
    out_f, _ = target_shape(cfg, "linear_qkv")
    parts = [t.shape[0] for t in to_hf(tmap, torch.empty(out_f, 7, device="meta"), cfg)]
    assert parts == [4 * 3, 2 * 3, 2 * 3]


@pytest.mark.parametrize("name,expect", [
    ("llama", dict(add_qkv_bias=False, qk_layernorm=False, tie_word_embeddings=False)),
    ("llama_tied", dict(tie_word_embeddings=True)),
    ("qwen2", dict(add_qkv_bias=True, vocab_size=255)),
    ("qwen3", dict(qk_layernorm=True, kv_channels=32, tie_word_embeddings=True)),
])
def test_model_config_from_hf_and_back(hf_models, name, expect):
    hf = json.load(open(os.path.join(hf_models[name], "config.json")))
    fam = family_for_hf_config(hf["model_type"], hf, "config.json")
    cfg = fam.model_config_from_hf(hf)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_query_groups) == (4, 64, 2)
    for k, v in expect.items():
        assert getattr(cfg, k) == v, k
    regenerated = fam.hf_config_from_model(cfg, "float32")
    assert fam.model_config_from_hf(regenerated) == cfg


def test_wrong_family_names_the_flag(hf_models):
    hf = json.load(open(os.path.join(hf_models["qwen2"], "config.json")))
    with pytest.raises(ValueError, match=r"--model-type-hf llama .*model_type is 'qwen2'"):
        family_for_hf_config("llama", hf, "config.json")
    with pytest.raises(ValueError, match="--model-type-hf 'gpt2' is not supported"):
        get_family("gpt2")


def test_unsupported_config_fields_are_refused():
    hf = dict(model_type="llama", hidden_size=16, intermediate_size=24, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=32, mlp_bias=True)
    with pytest.raises(ValueError, match="mlp_bias"):
        get_family("llama").model_config_from_hf(hf)


def test_llama3_rope_parameters_both_spellings():
    base = dict(model_type="llama", hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=32)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    v5 = get_family("llama").model_config_from_hf(
        {**base, "rope_parameters": {**scaling, "rope_theta": 500000.0}})
    v4 = get_family("llama").model_config_from_hf(
        {**base, "rope_theta": 500000.0, "rope_scaling": scaling})
    assert v5 == v4 and v5.rotary_base == 500000.0 and v5.rope_scaling == scaling
