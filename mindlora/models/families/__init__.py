"""Model families: ``get_family(name)`` for ``--model-type-hf``; one small file per family.

Adding a family = a module exposing ``FAMILY`` (a :class:`~mindlora.models.families.base.Family`)
plus one line in ``_MODULES``.
"""
from __future__ import annotations

import importlib
from typing import Any

from mindlora.models.families.base import Family, TensorMap

_MODULES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3-moe": "qwen3_moe",
            "mixtral": "mixtral"}

__all__ = ["Family", "TensorMap", "family_names", "get_family", "family_for_hf_config"]


def family_names() -> list[str]:
    return sorted(_MODULES)


def get_family(name: str) -> Family:
    """The family called ``name`` (the ``--model-type-hf`` value)."""
    if name not in _MODULES:
        raise ValueError(f"--model-type-hf {name!r} is not supported; choose from "
                         f"{family_names()}")
    module = importlib.import_module(f"mindlora.models.families.{_MODULES[name]}")
    return module.FAMILY


def family_for_hf_config(name: str, hf_config: dict[str, Any], config_path: str) -> Family:
    """``get_family(name)``, checked against config.json's ``model_type``."""
    family = get_family(name)
    model_type = hf_config.get("model_type")
    if model_type not in family.hf_model_types:
        raise ValueError(f"--model-type-hf {name} does not match {config_path}, whose model_type "
                         f"is {model_type!r}; pass --model-type-hf {model_type}"
                         if model_type in _MODULES else
                         f"--model-type-hf {name} does not match {config_path}, whose model_type "
                         f"is {model_type!r} (supported: {family_names()})")
    return family
