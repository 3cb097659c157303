"""Qwen3 (dense): Llama-like with RMSNorm on each query and key head, explicit head_dim."""
from __future__ import annotations

from typing import Any

from mindlora.config import ModelConfig
from mindlora.models.families.base import (Family, check_hf_fields, common_hf_fields,
                                           common_model_fields)


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a Qwen3 config.json; attention bias and sliding windows are refused."""
    check_hf_fields(hf, "qwen3", {"attention_bias": False, "use_sliding_window": False})
    return ModelConfig(family="qwen3", qk_layernorm=True, **common_model_fields(hf))


def hf_config_from_model(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """A complete Qwen3 config.json for ``cfg``."""
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
            "attention_bias": False, "use_sliding_window": False,
            **common_hf_fields(cfg, dtype)}


FAMILY = Family(name="qwen3", hf_model_types=("qwen3",), architecture="Qwen3ForCausalLM",
                model_config_from_hf=model_config_from_hf,
                hf_config_from_model=hf_config_from_model)
