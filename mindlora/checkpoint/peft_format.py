"""Hugging Face PEFT LoRA adapters <-> mindlora adapters (full, unsharded LoRA factors).

mindlora puts LoRA on megatron-core's fused linears. A fused ``linear_qkv`` adapter has one A
``[r, hidden]`` and one B whose rows follow the fused weight's rows (interleaved per query group);
``linear_fc1`` likewise has one A and a ``[gate; up]`` B. As separate HF modules this is exact:
q/k/v (gate/up) each get the shared A and their slice of B, de-interleaved with the same
transform as the base weight; r, alpha and rsLoRA are unchanged, so the scaling is too.

The reverse is exact too. An adapter whose q/k/v (gate/up) A factors are equal (as mindlora
exports them) imports with that shared A. Independent factors (any adapter PEFT trained itself),
per-module ranks (``rank_pattern``) or scalings (``alpha_pattern``) import *rank-stacked*:
``A = [A_q; A_k; A_v]`` and a block-structured B (``families.base.stack_lora_b``), so each output
block uses only its own rank slice; training keeps the blocks (mindlora.lora.blocks) and export
splits them back into per-module factors bit for bit. A module's scaling that differs from its
target's is folded into its B block (exact in math; export divides it out again). Modules a PEFT
adapter leaves out (e.g. only q_proj and v_proj, or only some layers) import as zero factors.
Refused by name: DoRA, ``lora_bias``/``bias``, ``modules_to_save``, ``fan_in_fan_out``, layer
replication, and targets mindlora has no LoRA for.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from mindlora.checkpoint.safetensors_io import SafetensorsFile
from mindlora.config import LoRAConfig, ModelConfig
from mindlora.models.families import Family
from mindlora.models.families.base import (HF_LAYER_PREFIX, TARGET_PATHS, module_widths,
                                           split_lora_b, stack_lora_b, target_shape, to_hf,
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


def _scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / (math.sqrt(r) if rslora else r)


class PEFTWriter:
    """Sink writing full mindlora LoRA factors as an HF PEFT adapter folder.

    Rank-stacked targets are split into their modules' own factors; shared-A targets give each
    module a copy of A. Per-module ranks and scalings become ``rank_pattern`` / ``alpha_pattern``.
    """

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

    def module_ranks(self, target: str) -> list[int]:
        n = len(hf_modules(self.family, self.cfg, target))
        return list(self.lora.ranks.get(target, [self.lora.r] * n))

    def write_layer(self, layer_id: int, full: dict[str, torch.Tensor]) -> None:
        prefix = PEFT_PREFIX + HF_LAYER_PREFIX.format(layer_id)
        for target in self.lora.target_modules:
            path = TARGET_PATHS[target]
            a, b = full[f"{path}.lora_A.weight"], full[f"{path}.lora_B.weight"]
            if self.dtype is not None:
                a, b = a.to(self.dtype), b.to(self.dtype)
            modules = hf_modules(self.family, self.cfg, target)
            if target in self.lora.ranks:
                ranks = self.lora.ranks[target]
                parts = zip(a.split(ranks, dim=0), split_lora_b(self.cfg, target, b, ranks))
            else:
                parts = ((a, b_part) for b_part in to_hf(self.family.lora_map(self.cfg, target),
                                                         b, self.cfg))
            for module, (a_part, b_part) in zip(modules, parts):
                if a_part.shape[0] == 0:
                    continue  # the imported adapter did not have this module
                self.tensors[f"{prefix}{module}.lora_A.weight"] = a_part.clone()
                self.tensors[f"{prefix}{module}.lora_B.weight"] = b_part.contiguous()

    def adapter_config(self) -> dict[str, Any]:
        lora, modules, rank_pattern, alpha_pattern = self.lora, set(), {}, {}
        for target in lora.target_modules:
            scaling = lora.scaling_of(target)
            for module, r in zip(hf_modules(self.family, self.cfg, target),
                                 self.module_ranks(target)):
                name = module.rsplit(".", 1)[-1]
                if r == 0:
                    continue
                modules.add(name)
                if r != lora.r:
                    rank_pattern[name] = r
                if scaling != _scaling(lora.alpha, r, lora.use_rslora):
                    alpha_pattern[name] = scaling * (math.sqrt(r) if lora.use_rslora else r)
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": self.base,
            "r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
            "use_rslora": lora.use_rslora, "target_modules": sorted(modules), "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "use_dora": False,
            "revision": None,
        }

    def finish(self) -> None:
        save_file(self.tensors, os.path.join(self.directory, ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        with open(os.path.join(self.directory, ADAPTER_CONFIG), "w") as f:
            json.dump(self.adapter_config(), f, indent=2)
            f.write("\n")


_KNOWN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _refuse_unsupported(config: dict[str, Any], path: str) -> None:
    errors = []
    if config.get("peft_type", "LORA") != "LORA":
        errors.append(f"peft_type {config.get('peft_type')} (only LORA)")
    for field, ok in (("use_dora", False), ("bias", "none"), ("fan_in_fan_out", False),
                      ("modules_to_save", None), ("lora_bias", False),
                      ("layer_replication", None), ("trainable_token_indices", None)):
        if config.get(field, ok) not in (ok, None, {}, [], False, "none"):
            errors.append(f"{field}={config[field]!r}")
    targets = config.get("target_modules")
    if isinstance(targets, (list, tuple)):
        other = sorted(t for t in targets if t.rsplit(".", 1)[-1] not in _KNOWN_MODULES)
        if other:
            errors.append(f"target_modules {other} (mindlora has LoRA on "
                          f"{', '.join(_KNOWN_MODULES)} only)")
    if errors:
        raise ValueError(f"--load-lora-from-hf: {path} uses PEFT features mindlora's LoRA cannot "
                         f"represent: {'; '.join(errors)}")


def _pattern(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: a key matches a module name's tail."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", name):
            return value
    return default


class PEFTSource:
    """Full mindlora LoRA factors read from an HF PEFT adapter folder (see the module docstring).

    On opening, every factor's shape is checked against ``r`` / ``rank_pattern`` and each fused
    target is classified: shared A (all of its modules' A equal in every layer, same rank and
    scaling) or rank-stacked (``lora_config.ranks``).
    """

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
        self.params_dtype = next(iter(self.file.meta(k) for k in self.file.entries)).dtype
        self._index_keys(family, model_config)
        r, rslora = int(config["r"]), bool(config.get("use_rslora", False))
        alpha = float(config.get("lora_alpha") or r)
        self._module_params(config, r, alpha, rslora)
        ranks, scalings, self.fold = {}, {}, {}
        global_scaling = _scaling(alpha, r, rslora)
        for target in self.targets:
            modules = hf_modules(family, model_config, target)
            present = [m for m in modules if m in self.rank]
            mranks = [self.rank.get(m, 0) for m in modules]
            s = self.scale[present[0]]
            shared = (len({self.rank[m] for m in present}) == 1 and self.rank[present[0]] == r
                      and all(self.scale[m] == s for m in present) and self._equal_a(present))
            if not shared:
                ranks[target] = mranks
                self.fold.update({m: self.scale[m] / s for m in present if self.scale[m] != s})
            if s != global_scaling:
                scalings[target] = s
        self.lora_config = LoRAConfig(r=r, alpha=alpha, use_rslora=rslora,
                                      dropout=float(config.get("lora_dropout", 0.0)),
                                      target_modules=tuple(self.targets), ranks=ranks,
                                      scalings=scalings)

    def _index_keys(self, family: Family, cfg: ModelConfig) -> None:
        self.factors: dict[tuple[int, str, str], str] = {}
        module_to_target = {m: t for t in TARGET_PATHS for m in hf_modules(family, cfg, t)}
        targets, unknown = set(), set()
        for key in self.file.entries:
            match = _KEY.match(key)
            if not match or match.group(2) not in module_to_target or int(
                    match.group(1)) >= cfg.num_layers:
                unknown.add(key)
                continue
            self.factors[int(match.group(1)), match.group(2), match.group(3)] = key
            targets.add(module_to_target[match.group(2)])
        if unknown or not targets:
            raise ValueError(f"--load-lora-from-hf: {self.path} holds tensors mindlora cannot map "
                             f"onto a {cfg.num_layers}-layer {family.name} model: "
                             f"{sorted(unknown)[:3] or 'no LoRA factors'}")
        self.targets = [t for t in TARGET_PATHS if t in targets]

    def _module_params(self, config: dict, r: int, alpha: float, rslora: bool) -> None:
        """Rank and scaling of every module (same in every layer), checked against the tensors."""
        self.rank: dict[str, int] = {}
        self.scale: dict[str, float] = {}
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        for (layer, module, factor), key in sorted(self.factors.items()):
            name = f"model.layers.{layer}.{module}"
            mr = int(_pattern(rank_pattern, name, r))
            ms = _scaling(float(_pattern(alpha_pattern, name, alpha)), mr, rslora)
            shape = tuple(self.file.meta(key).shape)
            got = shape[0] if factor == "A" else shape[1]
            if got != mr:
                raise ValueError(f"--load-lora-from-hf: {self.path}: {key} has rank {got}, but "
                                 f"{ADAPTER_CONFIG} (r / rank_pattern) gives {name} rank {mr}")
            if self.rank.setdefault(module, mr) != mr or self.scale.setdefault(module, ms) != ms:
                raise ValueError(f"--load-lora-from-hf: {cfg_name(self.path)}: rank_pattern / "
                                 f"alpha_pattern give {module} different ranks or alphas in "
                                 f"different layers; mindlora has one rank and scaling per "
                                 f"module across layers")

    def _equal_a(self, modules: list[str]) -> bool:
        layers = {layer for layer, _, _ in self.factors}
        for layer in layers:
            a = [self._factor(layer, m, "A", False) for m in modules]
            if any(x is None for x in a):
                if any(x is not None for x in a):
                    return False
                continue
            if not all(torch.equal(a[0], x) for x in a[1:]):
                return False
        return True

    def global_keys(self) -> list[str]:
        return []

    def _factor(self, layer: int, module: str, factor: str, meta: bool) -> Optional[torch.Tensor]:
        key = self.factors.get((layer, module, factor))
        if key is None:
            return None
        return self.file.meta(key) if meta else self.file.get(key)

    def full_layer(self, layer_id: int, meta: bool = False) -> dict[str, torch.Tensor]:
        """Fused factors of one layer: shared A, or rank-stacked A and block-structured B."""
        cfg, lora = self.model_config, self.lora_config
        device = "meta" if meta else "cpu"
        out = {}
        for target in self.targets:
            modules = hf_modules(self.family, cfg, target)
            in_features = target_shape(cfg, target)[1]
            ranks = lora.ranks.get(target, [lora.r] * len(modules))
            a_parts, b_parts = [], []
            for m, width, r in zip(modules, module_widths(cfg, target), ranks):
                a = self._factor(layer_id, m, "A", meta)
                b = self._factor(layer_id, m, "B", meta)
                if a is None or b is None:
                    a = torch.zeros(r, in_features, dtype=self.params_dtype, device=device)
                    b = torch.zeros(width, r, dtype=self.params_dtype, device=device)
                if tuple(a.shape) != (r, in_features) or tuple(b.shape) != (width, r):
                    raise ValueError(f"--load-lora-from-hf: {self.path} layer {layer_id} {m}: "
                                     f"A {tuple(a.shape)}, B {tuple(b.shape)}; expected "
                                     f"({r}, {in_features}) and ({width}, {r})")
                if m in self.fold:
                    b = (b.to(torch.float32) * self.fold[m]).to(b.dtype)
                a_parts.append(a)
                b_parts.append(b)
            path = TARGET_PATHS[target]
            if target in lora.ranks:
                out[f"{path}.lora_A.weight"] = torch.cat(a_parts, dim=0)
                out[f"{path}.lora_B.weight"] = stack_lora_b(cfg, target, b_parts)
            else:
                present = [a for a, m in zip(a_parts, modules)
                           if self.factors.get((layer_id, m, "A"))]
                out[f"{path}.lora_A.weight"] = present[0] if present else a_parts[0]
                out[f"{path}.lora_B.weight"] = to_mcore(self.family.lora_map(cfg, target),
                                                        b_parts, cfg)
        return out


def cfg_name(weights_path: str) -> str:
    return os.path.join(os.path.dirname(weights_path), ADAPTER_CONFIG)
