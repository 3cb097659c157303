"""Mixtral (8x7B, 8x22B): Llama attention, every layer a top-2 routed MoE (``block_sparse_moe``).

HF Mixtral takes the softmax over all experts, then renormalises the top-k weights, which equals
megatron-core's softmax over the top-k logits. Experts are ``w1`` (gate), ``w3`` (up), ``w2``.
"""
from __future__ import annotations

from typing import Any

from mindlora.config import ModelConfig
from mindlora.models.families.base import (Family, check_hf_fields, common_hf_fields,
                                           common_model_fields)
from mindlora.models.families.moe import (attention_layer_maps, expert_layer_maps,
                                          router_fields, router_hf_fields)


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    check_hf_fields(hf, "mixtral", {"sliding_window": None, "router_jitter_noise": 0.0})
    return ModelConfig(family="mixtral", moe_ffn_hidden_size=hf["intermediate_size"],
                       **router_fields(hf, True), **common_model_fields(hf))


def hf_config_from_model(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "sliding_window": None, "router_jitter_noise": 0.0,
            "num_local_experts": cfg.num_moe_experts, **router_hf_fields(cfg),
            **common_hf_fields(cfg, dtype)}


def layer_maps(cfg: ModelConfig) -> list:
    return attention_layer_maps(cfg) + expert_layer_maps(
        cfg, "block_sparse_moe", "gate", ("w1", "w3", "w2"))


FAMILY = Family(name="mixtral", hf_model_types=("mixtral",), architecture="MixtralForCausalLM",
                model_config_from_hf=model_config_from_hf,
                hf_config_from_model=hf_config_from_model, layer_maps=layer_maps)
