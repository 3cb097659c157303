"""Qwen2 / Qwen2.5: Llama-like with a bias on q, k and v (none on o_proj)."""
from __future__ import annotations

from typing import Any

from mindlora.config import ModelConfig
from mindlora.models.families.base import (Family, check_hf_fields, common_hf_fields,
                                           common_model_fields)


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a Qwen2 config.json; sliding-window attention is refused."""
    check_hf_fields(hf, "qwen2", {"use_sliding_window": False})
    return ModelConfig(family="qwen2", add_qkv_bias=True, **common_model_fields(hf))


def hf_config_from_model(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """A complete Qwen2 config.json for ``cfg``."""
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "use_sliding_window": False, **common_hf_fields(cfg, dtype)}


FAMILY = Family(name="qwen2", hf_model_types=("qwen2",), architecture="Qwen2ForCausalLM",
                model_config_from_hf=model_config_from_hf,
                hf_config_from_model=hf_config_from_model)
