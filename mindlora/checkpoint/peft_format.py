"""Hugging Face PEFT LoRA adapters <-> mindlora adapters (full, unsharded LoRA factors).

mindlora puts LoRA on megatron-core's fused linears. A fused ``linear_qkv`` adapter has one A
``[r, hidden]`` and one B whose rows follow the fused weight's rows (interleaved per query group);
``linear_fc1`` likewise has one A and a ``[gate; up]`` B. As separate HF modules this is exact:
q/k/v (gate/up) each get the shared A and their slice of B, de-interleaved with the same
transform as the base weight; r, alpha and rsLoRA are unchanged, so the scaling is too.

The reverse needs one A per fused module. A PEFT adapter trained on separate modules has
independent A factors; those cannot be written as one rank-r fused LoRA, so import refuses them
(the message says what to do instead). Modules a PEFT adapter leaves out (e.g. only q_proj and
v_proj, or only some layers) import as zero B rows, which is exact.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from mindlora.checkpoint.safetensors_io import SafetensorsFile
from mindlora.config import LoRAConfig, ModelConfig
from mindlora.models.families import Family
from mindlora.models.families.base import (HF_LAYER_PREFIX, TARGET_PATHS, target_shape, to_hf,
                                           to_mcore)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_([AB])"
                  r"(?:\.[^.]+)?\.weight$")  # optional adapter name, e.g. lora_A.default.weight


def _module(hf_key: str) -> str:
    """``self_attn.q_proj.weight`` -> ``self_attn.q_proj``."""
    return hf_key[: -len(".weight")]


def hf_modules(family: Family, cfg: ModelConfig, target: str) -> list[str]:
    """HF module paths (inside a layer) that mindlora target ``target`` covers."""
    return [_module(k) for k in family.lora_map(cfg, target).hf]


class PEFTWriter:
    """Sink writing full mindlora LoRA factors as an HF PEFT adapter folder."""

    def __init__(self, directory: str, family: Family, model_config: ModelConfig,
                 lora_config: LoRAConfig, dtype: Optional[torch.dtype] = None,
                 base_model_name_or_path: Optional[str] = None) -> None:
        self.directory, self.family = directory, family
        self.cfg, self.lora = model_config, lora_config
        self.dtype, self.base = dtype, base_model_name_or_path
        self.tensors: dict[str, torch.Tensor] = {}

    def plan(self, layers: dict, globals_: dict) -> None:
        """Adapters are small: buffered in memory and written at :meth:`finish`."""

    def write_global(self, key: str, full: torch.Tensor) -> None:
        raise ValueError(f"an adapter has no {key}")

    def write_layer(self, layer_id: int, full: dict[str, torch.Tensor]) -> None:
        prefix = PEFT_PREFIX + HF_LAYER_PREFIX.format(layer_id)
        for target in self.lora.target_modules:
            path = TARGET_PATHS[target]
            a, b = full[f"{path}.lora_A.weight"], full[f"{path}.lora_B.weight"]
            if self.dtype is not None:
                a, b = a.to(self.dtype), b.to(self.dtype)
            tmap = self.family.lora_map(self.cfg, target)
            for module, b_part in zip(hf_modules(self.family, self.cfg, target),
                                      to_hf(tmap, b, self.cfg)):
                self.tensors[f"{prefix}{module}.lora_A.weight"] = a.clone()
                self.tensors[f"{prefix}{module}.lora_B.weight"] = b_part.contiguous()

    def adapter_config(self) -> dict[str, Any]:
        modules = sorted({m.rsplit(".", 1)[-1] for t in self.lora.target_modules
                          for m in hf_modules(self.family, self.cfg, t)})
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": self.base,
            "r": self.lora.r, "lora_alpha": self.lora.alpha, "lora_dropout": self.lora.dropout,
            "use_rslora": self.lora.use_rslora, "target_modules": modules, "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "revision": None,
        }

    def finish(self) -> None:
        save_file(self.tensors, os.path.join(self.directory, ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        with open(os.path.join(self.directory, ADAPTER_CONFIG), "w") as f:
            json.dump(self.adapter_config(), f, indent=2)
            f.write("\n")


def _refuse_unsupported(config: dict[str, Any], path: str) -> None:
    errors = []
    if config.get("peft_type", "LORA") != "LORA":
        errors.append(f"peft_type {config.get('peft_type')} (only LORA)")
    for field, ok in (("use_dora", False), ("bias", "none"), ("fan_in_fan_out", False),
                      ("modules_to_save", None), ("lora_bias", False), ("rank_pattern", {}),
                      ("alpha_pattern", {}), ("layer_replication", None)):
        if config.get(field, ok) not in (ok, None, {}, False, "none"):
            errors.append(f"{field}={config[field]!r}")
    if errors:
        raise ValueError(f"--load-lora-from-hf: {path} uses PEFT features mindlora's LoRA cannot "
                         f"represent: {', '.join(errors)}")


class PEFTSource:
    """Full mindlora LoRA factors read from an HF PEFT adapter folder."""

    kind = "adapter"

    def __init__(self, directory: str, family: Family, model_config: ModelConfig) -> None:
        self.directory, self.family, self.model_config = directory, family, model_config
        cfg_path = os.path.join(directory, ADAPTER_CONFIG)
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"--load-lora-from-hf: {cfg_path} not found")
        with open(cfg_path) as f:
            config = json.load(f)
        _refuse_unsupported(config, cfg_path)
        self.path = os.path.join(directory, ADAPTER_WEIGHTS)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"--load-lora-from-hf: {self.path} not found (only "
                                    f"safetensors adapters are read)")
        self.file = SafetensorsFile(self.path)
        self.factors: dict[tuple[int, str, str], str] = {}
        module_to_target = {m: t for t in TARGET_PATHS for m in hf_modules(family, model_config, t)}
        targets, unknown = set(), set()
        for key in self.file.entries:
            match = _KEY.match(key)
            if not match or match.group(2) not in module_to_target:
                unknown.add(key)
                continue
            layer, module, factor = int(match.group(1)), match.group(2), match.group(3)
            if layer >= model_config.num_layers:
                unknown.add(key)
                continue
            self.factors[layer, module, factor] = key
            targets.add(module_to_target[module])
        if unknown or not targets:
            raise ValueError(f"--load-lora-from-hf: {self.path} holds tensors mindlora cannot map "
                             f"onto a {model_config.num_layers}-layer {family.name} model: "
                             f"{sorted(unknown)[:3] or 'no LoRA factors'}")
        r = config.get("r")
        self.lora_config = LoRAConfig(r=int(r), alpha=float(config.get("lora_alpha", r)),
                                      dropout=float(config.get("lora_dropout", 0.0)),
                                      use_rslora=bool(config.get("use_rslora", False)),
                                      target_modules=tuple(t for t in TARGET_PATHS if t in targets))
        self.params_dtype = next(iter(self.file.meta(k) for k in self.file.entries)).dtype

    def global_keys(self) -> list[str]:
        return []

    def _factor(self, layer: int, module: str, factor: str, meta: bool) -> Optional[torch.Tensor]:
        key = self.factors.get((layer, module, factor))
        if key is None:
            return None
        return self.file.meta(key) if meta else self.file.get(key)

    def full_layer(self, layer_id: int, meta: bool = False) -> dict[str, torch.Tensor]:
        """Fused factors of one layer: shared A, B rows joined with the base weight's transform."""
        cfg, r = self.model_config, self.lora_config.r
        out = {}
        for target in self.lora_config.target_modules:
            modules = hf_modules(self.family, cfg, target)
            tmap = self.family.lora_map(cfg, target)
            out_features, in_features = target_shape(cfg, target)
            widths = [t.shape[0] for t in to_hf(tmap, torch.empty(out_features, 1, device="meta"),
                                                cfg)]
            a_list = [(m, self._factor(layer_id, m, "A", meta)) for m in modules]
            present = [(m, a) for m, a in a_list if a is not None]
            a = present[0][1] if present else torch.zeros(
                r, in_features, dtype=self.params_dtype, device="meta" if meta else "cpu")
            for m, other in present[1:]:
                if not meta and not torch.equal(other, a):
                    raise ValueError(
                        f"--load-lora-from-hf: {self.path} layer {layer_id}: lora_A of "
                        f"{present[0][0]} and {m} differ. mindlora's fused {target} shares one A, "
                        f"so this adapter (trained with separate A factors) cannot be imported "
                        f"exactly; merge it into the base model instead (PEFT merge_and_unload, "
                        f"then convert the merged model)")
            if tuple(a.shape) != (r, in_features):
                raise ValueError(f"--load-lora-from-hf: {self.path} layer {layer_id} {target}: "
                                 f"lora_A is {tuple(a.shape)}, expected ({r}, {in_features}) "
                                 f"from r={r} in {ADAPTER_CONFIG}")
            bs = []
            for m, width in zip(modules, widths):
                b = self._factor(layer_id, m, "B", meta)
                if b is None:
                    b = torch.zeros(width, r, dtype=a.dtype, device=a.device)
                if tuple(b.shape) != (width, r):
                    raise ValueError(f"--load-lora-from-hf: {self.path} layer {layer_id} {m}: "
                                     f"lora_B is {tuple(b.shape)}, expected ({width}, {r})")
                bs.append(b)
            path = TARGET_PATHS[target]
            out[f"{path}.lora_A.weight"] = a
            out[f"{path}.lora_B.weight"] = to_mcore(tmap, bs, cfg)
        return out
