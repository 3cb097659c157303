"""Llama (Llama 2/3, SmolLM2 with tied embeddings): the reference Llama-like family."""
from __future__ import annotations

from typing import Any

from mindlora.config import ModelConfig
from mindlora.models.families.base import (Family, check_hf_fields, common_hf_fields,
                                           common_model_fields)


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a Llama config.json (attention/MLP biases are refused, not dropped)."""
    check_hf_fields(hf, "llama", {"attention_bias": False, "mlp_bias": False})
    return ModelConfig(family="llama", **common_model_fields(hf))


def hf_config_from_model(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """A complete Llama config.json for ``cfg``."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "attention_bias": False, "mlp_bias": False, **common_hf_fields(cfg, dtype)}


FAMILY = Family(name="llama", hf_model_types=("llama",), architecture="LlamaForCausalLM",
                model_config_from_hf=model_config_from_hf,
                hf_config_from_model=hf_config_from_model)
