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

Mixture-of-experts models (docs/moe.md): every expert is its own unit (``mlp.experts.{e}.gate_proj``
/ ``up_proj`` / ``down_proj``, Mixtral ``block_sparse_moe.experts.{e}.w1`` / ``w3`` / ``w2``).
Export writes that per-expert layout: vLLM reads it for Qwen3-MoE and Mixtral, and PEFT 0.21 with
transformers 5 converts it on load to its fused-parameter form (``target_parameters``), exactly.
Import also reads PEFT's own fused form (an adapter PEFT trained on transformers 5):
``mlp.experts[.base_layer].lora_A.weight`` ``[r*E, in]`` (expert-major rows) and ``lora_B.weight``
``[out, r*E]`` (rank-major columns: expert e's rank k is column ``k*E + e``), the inner
``base_layer`` wrapper being ``gate_up_proj`` when both parameters are targeted.
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
_FUSED = re.compile(r"^(?:.*\.)?mlp\.experts\.(gate_up_proj|down_proj)$")


def _module(hf_key: str) -> str:
    """``self_attn.q_proj.weight`` -> ``self_attn.q_proj``."""
    return hf_key[: -len(".weight")]


def hf_modules(family: Family, cfg: ModelConfig, target: str) -> list[str]:
    """HF module paths (inside a layer) that one unit of mindlora target ``target`` covers (the
    first expert's, in a mixture-of-experts model)."""
    return [_module(k) for k in family.lora_map(cfg, target).hf]


def lora_units(family: Family, cfg: ModelConfig, target: str
               ) -> list[tuple[str, Any, list[str]]]:
    """(mindlora module path, tensor map, HF module paths) of every linear carrying ``target``:
    one for attention and dense MLPs, one per routed expert in a mixture-of-experts model."""
    return [(path, tmap, [_module(k) for k in tmap.hf])
            for path, tmap in family.lora_units(cfg, target)]


def _has_expert_targets(cfg: ModelConfig, targets) -> bool:
    return cfg.is_moe and any(t in ("linear_fc1", "linear_fc2") for t in targets)


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
            for path, tmap, modules in lora_units(self.family, self.cfg, target):
                a, b = full[f"{path}.lora_A.weight"], full[f"{path}.lora_B.weight"]
                if self.dtype is not None:
                    a, b = a.to(self.dtype), b.to(self.dtype)
                if target in self.lora.ranks:
                    ranks = self.lora.ranks[target]
                    parts = zip(a.split(ranks, dim=0), split_lora_b(self.cfg, target, b, ranks))
                else:
                    parts = ((a, b_part) for b_part in to_hf(tmap, b, self.cfg))
                for module, (a_part, b_part) in zip(modules, parts):
                    if a_part.shape[0] == 0:
                        continue  # the imported adapter did not have this module
                    self.tensors[f"{prefix}{module}.lora_A.weight"] = a_part.clone()
                    self.tensors[f"{prefix}{module}.lora_B.weight"] = b_part.contiguous()

    def adapter_config(self) -> dict[str, Any]:
        """PEFT's adapter_config.json. With expert targets, rsLoRA is written as its plain-LoRA
        equivalent (``lora_alpha * sqrt(r)``, same scaling): PEFT 0.21's conversion of per-expert
        adapters doubles r and alpha of the fused ``gate_up_proj``, which keeps ``alpha / r`` but
        not ``alpha / sqrt(r)``. Dropout is written 0 (PEFT's expert wrapper refuses dropout; it
        only matters in training)."""
        lora, modules, rank_pattern, alpha_pattern = self.lora, set(), {}, {}
        moe = _has_expert_targets(self.cfg, lora.target_modules)
        rslora = lora.use_rslora and not moe
        alpha = lora.alpha * math.sqrt(lora.r) if lora.use_rslora and moe else lora.alpha
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
                if not math.isclose(scaling, _scaling(alpha, r, rslora), rel_tol=1e-12):
                    alpha_pattern[name] = scaling * (math.sqrt(r) if rslora else r)
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": self.base,
            "r": lora.r, "lora_alpha": alpha, "lora_dropout": 0.0 if moe else lora.dropout,
            "use_rslora": rslora, "target_modules": sorted(modules), "bias": "none",
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


_KNOWN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                  "w1", "w3", "w2")


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
    other = sorted(t for t in config.get("target_parameters") or [] if not _FUSED.match(t)
                   and t not in ("gate_up_proj", "down_proj"))
    if other:
        errors.append(f"target_parameters {other} (mindlora reads PEFT's fused expert "
                      f"parameters mlp.experts.gate_up_proj / down_proj only)")
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
        r, rslora = int(config["r"]), bool(config.get("use_rslora", False))
        alpha = float(config.get("lora_alpha") or r)
        self._cache: dict[str, torch.Tensor] = {}
        self._index_keys(family, model_config, config)
        self._module_params(config, r, alpha, rslora)
        ranks, scalings, self.fold = {}, {}, {}
        global_scaling = _scaling(alpha, r, rslora)
        for target in self.targets:
            units = [modules for _, _, modules in lora_units(family, model_config, target)]
            present = [m for modules in units for m in modules if m in self.rank]
            s = self.scale[present[0]]
            shared = (len({self.rank[m] for m in present}) == 1 and self.rank[present[0]] == r
                      and all(self.scale[m] == s for m in present)
                      and all(self._equal_a([m for m in modules if m in self.rank])
                              for modules in units))
            if not shared:
                unit_ranks = {tuple(self.rank.get(m, 0) for m in modules) for modules in units}
                if len(unit_ranks) > 1:
                    raise ValueError(f"--load-lora-from-hf: {self.path}: the experts of {target} "
                                     f"have different ranks {sorted(unit_ranks)}; mindlora has "
                                     f"one rank per target across experts")
                ranks[target] = list(unit_ranks.pop())
                self.fold.update({m: self.scale[m] / s for m in present if self.scale[m] != s})
            if s != global_scaling:
                scalings[target] = s
        self.lora_config = LoRAConfig(r=r, alpha=alpha, use_rslora=rslora,
                                      dropout=float(config.get("lora_dropout", 0.0)),
                                      target_modules=tuple(self.targets), ranks=ranks,
                                      scalings=scalings)

    def _index_keys(self, family: Family, cfg: ModelConfig, config: dict[str, Any]) -> None:
        """``self.factors``: (layer, HF module, A|B) -> (key, view). ``view`` is None for a
        per-module tensor, else (expert, number of experts, B rows) of PEFT's fused layout."""
        self.factors: dict[tuple[int, str, str], tuple[str, Optional[tuple]]] = {}
        self.pattern_name: dict[str, str] = {}
        units = {t: lora_units(family, cfg, t) for t in TARGET_PATHS}
        module_to_target = {m: t for t, us in units.items() for _, _, ms in us for m in ms}
        targets, unknown, fused = set(), set(), {}
        for key in self.file.entries:
            match = _KEY.match(key)
            layer = int(match.group(1)) if match else -1
            if match and cfg.is_moe and match.group(2) in ("mlp.experts",
                                                           "mlp.experts.base_layer"):
                fused[layer, match.group(2), match.group(3)] = key
                continue
            if not match or match.group(2) not in module_to_target or layer >= cfg.num_layers:
                unknown.add(key)
                continue
            self.factors[layer, match.group(2), match.group(3)] = (key, None)
            targets.add(module_to_target[match.group(2)])
        if fused:
            targets |= self._index_fused(fused, units, cfg, config, unknown)
        if unknown or not targets:
            raise ValueError(f"--load-lora-from-hf: {self.path} holds tensors mindlora cannot map "
                             f"onto a {cfg.num_layers}-layer {family.name} model: "
                             f"{sorted(unknown)[:3] or 'no LoRA factors'}")
        self.targets = [t for t in TARGET_PATHS if t in targets]

    def _index_fused(self, fused: dict, units: dict, cfg: ModelConfig, config: dict[str, Any],
                     unknown: set) -> set[str]:
        """Per-expert views of PEFT's fused expert factors (module docstring). Which wrapper is
        which follows PEFT's nesting: with both parameters targeted, ``gate_up_proj`` (registered
        first) is the inner ``base_layer``; with one, it is ``mlp.experts`` itself."""
        names = sorted({t.rsplit(".", 1)[-1] for t in config.get("target_parameters") or []})
        if names == ["down_proj", "gate_up_proj"]:
            which = {"mlp.experts.base_layer": "linear_fc1", "mlp.experts": "linear_fc2"}
        elif len(names) == 1:
            which = {"mlp.experts": {"gate_up_proj": "linear_fc1",
                                     "down_proj": "linear_fc2"}[names[0]]}
        else:
            unknown.update(fused.values())
            return set()
        experts, found = cfg.num_moe_experts, set()
        for (layer, wrapper, factor), key in fused.items():
            target = which.get(wrapper)
            if target is None or layer >= cfg.num_layers:
                unknown.add(key)
                continue
            found.add(target)
            param = {"linear_fc1": "gate_up_proj", "linear_fc2": "down_proj"}[target]
            shape = tuple(self.file.meta(key).shape)
            out_f, in_f = target_shape(cfg, target)
            n = shape[0] if factor == "A" else shape[1]
            if n % experts or shape[1 if factor == "A" else 0] != (in_f if factor == "A"
                                                                 else out_f):
                raise ValueError(f"--load-lora-from-hf: {self.path}: {key} {shape} is not "
                                 f"{param}'s fused LoRA {factor} of {experts} experts "
                                 f"({'[r*E, %d]' % in_f if factor == 'A' else '[%d, r*E]' % out_f})")
            for e, (_, _, modules) in enumerate(units[target]):
                widths = module_widths(cfg, target)
                for i, module in enumerate(modules):
                    rows = (sum(widths[:i]), sum(widths[:i + 1]))
                    self.factors[layer, module, factor] = (key, (e, experts, rows))
                    self.pattern_name[module] = f"mlp.experts.{param}"
        return found

    def _module_params(self, config: dict, r: int, alpha: float, rslora: bool) -> None:
        """Rank and scaling of every module (same in every layer), checked against the tensors."""
        self.rank: dict[str, int] = {}
        self.scale: dict[str, float] = {}
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        for (layer, module, factor), (key, view) in sorted(self.factors.items()):
            name = f"model.layers.{layer}.{self.pattern_name.get(module, module)}"
            mr = int(_pattern(rank_pattern, name, r))
            ms = _scaling(float(_pattern(alpha_pattern, name, alpha)), mr, rslora)
            shape = tuple(self._factor(layer, module, factor, True).shape)
            got = shape[0] if factor == "A" else shape[1]
            if got != mr and view is not None:
                raise ValueError(f"--load-lora-from-hf: {self.path}: {key} "
                                 f"{tuple(self.file.meta(key).shape)} is rank {got} per expert "
                                 f"if it holds {view[1]} experts, but {ADAPTER_CONFIG} gives "
                                 f"rank {mr}: an adapter made for another number of experts?")
            if got != mr:
                raise ValueError(f"--load-lora-from-hf: {self.path}: {key} has rank {got}, but "
                                 f"{ADAPTER_CONFIG} (r / rank_pattern) gives {name} rank {mr}")
            if self.rank.setdefault(module, mr) != mr or self.scale.setdefault(module, ms) != ms:
                raise ValueError(f"--load-lora-from-hf: {cfg_name(self.path)}: rank_pattern / "
                                 f"alpha_pattern give {module} different ranks or alphas in "
                                 f"different layers; mindlora has one rank and scaling per "
                                 f"module across layers")

    def _equal_a(self, modules: list[str]) -> bool:
        if not hasattr(self, "_layers"):
            self._layers = sorted({layer for layer, _, _ in self.factors})
        for layer in self._layers:
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

    def _tensor(self, key: str, meta: bool) -> torch.Tensor:
        if meta:
            return self.file.meta(key)
        if key not in self._cache:  # a fused tensor serves every expert: read it once
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = self.file.get(key)
        return self._cache[key]

    def _factor(self, layer: int, module: str, factor: str, meta: bool) -> Optional[torch.Tensor]:
        entry = self.factors.get((layer, module, factor))
        if entry is None:
            return None
        key, view = entry
        t = self._tensor(key, meta)
        if view is None:
            return t
        e, experts, (start, stop) = view
        if factor == "A":  # [r*E, in], expert-major rows
            return t.reshape(experts, -1, t.shape[-1])[e].clone()
        return t.reshape(t.shape[0], -1, experts)[start:stop, :, e].clone()  # rank-major columns

    def full_layer(self, layer_id: int, meta: bool = False) -> dict[str, torch.Tensor]:
        """Fused factors of one layer: shared A, or rank-stacked A and block-structured B."""
        cfg, lora = self.model_config, self.lora_config
        device = "meta" if meta else "cpu"
        out = {}
        for target in self.targets:
            in_features = target_shape(cfg, target)[1]
            for path, tmap, modules in lora_units(self.family, cfg, target):
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
                if target in lora.ranks:
                    out[f"{path}.lora_A.weight"] = torch.cat(a_parts, dim=0)
                    out[f"{path}.lora_B.weight"] = stack_lora_b(cfg, target, b_parts)
                else:
                    present = [a for a, m in zip(a_parts, modules)
                               if self.factors.get((layer_id, m, "A"))]
                    out[f"{path}.lora_A.weight"] = present[0] if present else a_parts[0]
                    out[f"{path}.lora_B.weight"] = to_mcore(tmap, b_parts, cfg)
        return out


def cfg_name(weights_path: str) -> str:
    return os.path.join(os.path.dirname(weights_path), ADAPTER_CONFIG)
