"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3 attention, every layer a routed MoE.

Top-k softmax router without shared experts; ``norm_topk_prob`` renormalises the top-k weights
(megatron-core: softmax over the top-k logits) or not (softmax before top-k). Dense layers
(``mlp_only_layers``, ``decoder_sparse_step`` > 1) are refused, not silently made sparse.
"""
from __future__ import annotations

from typing import Any

from mindlora.config import ModelConfig
from mindlora.models.families.base import (Family, check_hf_fields, common_hf_fields,
                                           common_model_fields)
from mindlora.models.families.moe import (attention_layer_maps, expert_layer_maps,
                                          router_fields, router_hf_fields)


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    check_hf_fields(hf, "qwen3-moe", {"attention_bias": False, "use_sliding_window": False,
                                      "decoder_sparse_step": 1, "mlp_only_layers": [],
                                      "shared_expert_intermediate_size": 0})
    return ModelConfig(family="qwen3-moe", qk_layernorm=True,
                       moe_ffn_hidden_size=hf["moe_intermediate_size"],
                       **router_fields(hf, bool(hf.get("norm_topk_prob", False))),
                       **common_model_fields(hf))


def hf_config_from_model(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "attention_bias": False, "use_sliding_window": False, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "moe_intermediate_size": cfg.moe_ffn_hidden_size,
            "num_experts": cfg.num_moe_experts, "norm_topk_prob": not cfg.moe_router_pre_softmax,
            **router_hf_fields(cfg), **common_hf_fields(cfg, dtype)}


def layer_maps(cfg: ModelConfig) -> list:
    return attention_layer_maps(cfg) + expert_layer_maps(
        cfg, "mlp", "gate", ("gate_proj", "up_proj", "down_proj"))


FAMILY = Family(name="qwen3-moe", hf_model_types=("qwen3_moe",),
                architecture="Qwen3MoeForCausalLM", model_config_from_hf=model_config_from_hf,
                hf_config_from_model=hf_config_from_model, layer_maps=layer_maps)
