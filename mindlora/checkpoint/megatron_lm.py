"""Checkpoints that Megatron-LM / MindSpeed-LLM wrote (no ``mindlora`` metadata), and the ``args``
mindlora writes so that their tools read mindlora's checkpoints.

Their legacy layout is mindlora's (``iter_XXXXXXX/mp_rank_TT[_PPP]/model_optim_rng.pt``; ``model``
or ``model0``.. per virtual chunk, layer indices local to the chunk), but a file describes itself
only through ``args`` (an ``argparse.Namespace``, which ``torch.load(weights_only=True)`` reads).
:class:`LegacyLayout` turns ``args`` + the tensors (+ optionally an HF config.json) into the same
metadata dict a mindlora file carries, so every reader downstream is unchanged:

- model shape from ``args`` (HF config.json fills in rope scaling, eps, tying and the true vocab
  size, and is cross-checked), then cross-checked against the tensor shapes;
- layers per chunk counted from the keys, checked against ``num_layer_list`` (MindSpeed),
  ``decoder_first/last_pipeline_num_layers`` (Megatron-LM) and the VPP settings;
- key dialects (:func:`normalize_keys`): transformer-engine's ``layer_norm_weight`` fused into
  ``linear_qkv`` / ``linear_fc1``, ``_extra_state``, PEFT's ``lora_A.default.weight``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any, Optional

import torch

from mindlora.checkpoint import megatron_format as fmt
from mindlora.config import LORA_TARGETS, LoRAConfig, ModelConfig, fail_if
from mindlora.lora.factors import is_lora_key
from mindlora.parallel.layout import (layer_counts, layer_ids, layers_per_virtual_stage,
                                      shard_shape, split_rule)

_TE_NORMS = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
             "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}
_PEFT_FACTOR = re.compile(r"\.lora_([AB])\.[A-Za-z0-9_]+\.weight$")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "num_query_groups", "kv_channels")
KEY_STYLES = ("mindlora", "mindspeed")


def is_foreign(payload: dict[str, Any]) -> bool:
    """A rank file Megatron-LM / MindSpeed-LLM wrote: ``args`` but no ``mindlora`` metadata."""
    return "mindlora" not in payload and "args" in payload


def args_dict(payload: dict[str, Any], path: str) -> dict[str, Any]:
    args = payload.get("args")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    if isinstance(args, dict):
        return args
    raise ValueError(f"{path}: 'args' is a {type(args).__name__}, expected an argparse.Namespace")


def moe_refusal(a: dict[str, Any]) -> Optional[str]:
    """Why Megatron ``args`` of a mixture-of-experts model cannot be read (None when dense): the
    legacy reader knows no expert-parallel file layout or expert keys yet."""
    if not a.get("num_experts"):
        return None
    return (f"args.num_experts={a['num_experts']}: Megatron-LM / MindSpeed-LLM "
            f"mixture-of-experts checkpoints are not read yet; convert the HF model with "
            f"--target-expert-parallel-size instead (docs/moe.md)")


def normalize_keys(state: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """One chunk's state dict in mindlora's key dialect (see the module docstring).

    ``base_layer.weight`` (PEFT wrapping inside megatron) becomes the plain ``weight``.
    """
    out = {}
    for key, value in state.items():
        if key.endswith("_extra_state"):
            continue
        if key.endswith(".layer_norm_bias"):
            raise ValueError(f"{path}: {key}: LayerNorm with bias is not supported (mindlora's "
                             f"families use RMSNorm)")
        for te, plain in _TE_NORMS.items():
            if key.endswith("." + te):
                key = key[: -len(te)] + plain
        key = _PEFT_FACTOR.sub(r".lora_\1.weight", key).replace(".base_layer.weight", ".weight")
        if key in out:
            raise ValueError(f"{path}: {key} appears twice once the key dialects are unified")
        out[key] = value
    return out


def to_key_style(state: dict[str, torch.Tensor], style: str) -> dict[str, torch.Tensor]:
    """mindlora keys -> ``style`` (``mindspeed``: ``lora_A.default.weight``, as MindSpeed-LLM)."""
    if style == "mindlora":
        return state
    return {re.sub(r"\.lora_([AB])\.weight$", r".lora_\1.default.weight", k): v
            for k, v in state.items()}


def _hf_config(hf_config_dir: Optional[str]) -> Optional[dict[str, Any]]:
    if not hf_config_dir:
        return None
    path = os.path.join(hf_config_dir, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _family_name(a: dict[str, Any], hf: Optional[dict[str, Any]]) -> str:
    from mindlora.models.families import family_names

    for name in ((hf or {}).get("model_type"), a.get("model_type_hf")):
        if name in family_names():
            return name
    return "qwen3" if a.get("qk_layernorm") else "qwen2" if a.get("add_qkv_bias") else "llama"


def model_config_from_args(a: dict[str, Any], hf: Optional[dict[str, Any]], path: str,
                           need_vocab: bool = True) -> ModelConfig:
    """ModelConfig from Megatron ``args``; ``hf`` (config.json) fills what args lack.

    Args:
        need_vocab: the true vocabulary size is required (base weights, whose padding rows must
            be cut); an adapter falls back to ``padded_vocab_size``.
    """
    errors = []
    for field, ok in (("normalization", "RMSNorm"), ("swiglu", True),
                      ("position_embedding_type", "rope"), ("add_bias_linear", False)):
        if a.get(field, ok) not in (ok, None):
            errors.append(f"args.{field}={a[field]!r} (mindlora's families need {ok!r})")
    if moe_refusal(a):
        errors.append(moe_refusal(a))
    missing = [f for f in ("num_layers", "hidden_size", "num_attention_heads") if not a.get(f)]
    errors += [f"args.{f} is missing" for f in missing]
    if hf is None and not a.get("vocab_size") and need_vocab:
        errors.append("the true vocabulary size is unknown (args has padded_vocab_size only): "
                      "pass the HF model's folder, whose config.json has vocab_size "
                      "(--hf-cfg-dir in convert_ckpt.py, --tokenizer-name-or-path in training)")
    if a.get("use_rope_scaling") and hf is None:
        errors.append("args.use_rope_scaling is set: pass the HF model's config.json folder "
                      "(--hf-cfg-dir) for its rope_scaling")
    fail_if(errors, f"Megatron args in {path}")
    family = _family_name(a, hf)
    from_hf = None
    if hf is not None:
        from mindlora.models.families import get_family
        from_hf = get_family(family).model_config_from_hf(hf)
    heads = a["num_attention_heads"]
    tie = (not a["untie_embeddings_and_output_weights"]
           if a.get("untie_embeddings_and_output_weights") is not None
           else from_hf.tie_word_embeddings if from_hf else True)
    cfg = ModelConfig(
        family=family, num_layers=a["num_layers"], hidden_size=a["hidden_size"],
        ffn_hidden_size=a.get("ffn_hidden_size") or 4 * a["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=(a.get("num_query_groups") or heads) if a.get("group_query_attention")
        else heads,
        vocab_size=(from_hf.vocab_size if from_hf else a.get("vocab_size")
                    or a.get("padded_vocab_size") or 1),
        kv_channels=a.get("kv_channels") or a["hidden_size"] // heads,
        max_position_embeddings=a.get("max_position_embeddings") or 4096,
        rotary_base=float(a.get("rotary_base") or (from_hf.rotary_base if from_hf else 10000.0)),
        rope_scaling=from_hf.rope_scaling if from_hf else None,
        norm_epsilon=float(a.get("norm_epsilon") or (from_hf.norm_epsilon if from_hf else 1e-6)),
        add_qkv_bias=bool(a.get("add_qkv_bias")), qk_layernorm=bool(a.get("qk_layernorm")),
        tie_word_embeddings=tie)
    if from_hf is not None:
        wrong = [f"{f}: args {getattr(cfg, f)}, config.json {getattr(from_hf, f)}"
                 for f in _SHAPE_FIELDS + ("tie_word_embeddings", "add_qkv_bias", "qk_layernorm")
                 if getattr(cfg, f) != getattr(from_hf, f)]
        fail_if(wrong, f"model shape: {path} disagrees with the HF config.json")
    return cfg


def _layer_counts(state: dict[str, torch.Tensor], path: str) -> int:
    ids = sorted({int(m.group(1)) for k in state for m in [_LAYER.match(k)] if m})
    if ids != list(range(len(ids))):
        raise ValueError(f"{path}: decoder layer indices {ids} are not 0..n-1 (local numbering)")
    return len(ids)


def _expected_counts(a: dict[str, Any], pp: int, vpp: int) -> list[list[int]]:
    """Layers per (stage, chunk) as args describe them (mindlora.parallel.layout counts)."""
    layer_list = a.get("num_layer_list")
    if isinstance(layer_list, str):
        layer_list = [int(x) for x in layer_list.replace(" ", "").split(",") if x]
    return layer_counts(a["num_layers"], pp, vpp, layer_list,
                        first=a.get("decoder_first_pipeline_num_layers"),
                        last=a.get("decoder_last_pipeline_num_layers"))


class LegacyLayout:
    """Per-rank-file metadata (as :func:`megatron_format.build_meta` makes) of a foreign checkpoint.

    Opens every rank file (memory-mapped: pickles only), so a missing or inconsistent file is
    reported before anything is written.
    """

    def __init__(self, root: str, iteration: fmt.Iteration, hf_config_dir: Optional[str] = None
                 ) -> None:
        path0 = fmt.first_rank_path(root, iteration)
        first = fmt.load_rank_file(path0)
        a = args_dict(first, path0)
        tp, pp = int(a.get("tensor_model_parallel_size") or 1), int(
            a.get("pipeline_model_parallel_size") or 1)
        if path0 != fmt.rank_file_path(root, iteration, 0, 0, pp):
            raise ValueError(f"{path0}: args.pipeline_model_parallel_size={pp} does not match "
                             f"the directory name {os.path.basename(os.path.dirname(path0))}")
        chunks = [k for k in first if re.fullmatch(r"model\d*", k)]
        vpp = len(chunks) if chunks != ["model"] else None
        if not chunks:
            raise ValueError(f"{path0} holds no 'model' state dict")
        if vpp and int(a.get("virtual_pipeline_model_parallel_size") or vpp) != vpp:
            raise ValueError(f"{path0}: {vpp} model chunks but args."
                             f"virtual_pipeline_model_parallel_size="
                             f"{a['virtual_pipeline_model_parallel_size']}")
        self.hf = _hf_config(hf_config_dir)
        model_config_from_args(a, self.hf, path0, need_vocab=False)  # fail before the scan
        keys = fmt.chunk_keys(vpp)
        counts, states0 = [], None
        for p in range(pp):
            row = None
            for t in range(tp):
                path = fmt.rank_file_path(root, iteration, t, p, pp)
                payload = fmt.load_rank_file(path)
                if not is_foreign(payload):
                    raise ValueError(f"{path} is not a Megatron-LM file like {path0}")
                states = [normalize_keys(payload[k], path) for k in keys]
                mine = [_layer_counts(s, path) for s in states]
                if row is not None and mine != row:
                    raise ValueError(f"{path}: layers per chunk {mine} differ from TP rank 0's "
                                     f"{row}")
                row = mine
                if (t, p) == (0, 0):
                    states0 = states
            counts.append(row)
        self._check_counts(a, counts, pp, vpp or 1, path0)
        has_lora = any(is_lora_key(k) for k in states0[0])
        cfg = model_config_from_args(a, self.hf, path0, need_vocab=not has_lora)
        self.kind = "adapter" if has_lora else "base"
        lora = lora_config_from_args(a, states0[0], path0) if has_lora else None
        padded = self._check_shapes(cfg, states0[0], tp, a, path0)
        dtype = next((v.dtype for v in states0[0].values() if v.is_floating_point()),
                     torch.float32)
        ids = layer_ids(counts)
        self.metas = {}
        for p in range(pp):
            chunk_ids = {k: ids[p, v] for v, k in enumerate(keys)}
            for t in range(tp):
                meta = fmt.build_meta(self.kind, cfg, tp, pp, vpp, chunk_ids, padded, dtype, lora,
                                     tp_rank=t, pp_rank=p)
                meta["source"] = "megatron"
                self.metas[t, p] = meta

    @staticmethod
    def _check_counts(a: dict, counts: list[list[int]], pp: int, vpp: int, path: str) -> None:
        total = sum(map(sum, counts))
        if total != a["num_layers"]:
            raise ValueError(f"{path}: the rank files hold {total} layers, args.num_layers="
                             f"{a['num_layers']}")
        expected = _expected_counts(a, pp, vpp)
        if sum(map(sum, expected)) == total and expected != counts:
            raise ValueError(f"{path}: layers per (stage, chunk) {counts} differ from what args "
                             f"say ({expected}: num_layer_list / decoder_first/last_pipeline_"
                             f"num_layers / virtual pipeline)")

    @staticmethod
    def _check_shapes(cfg: ModelConfig, state: dict[str, torch.Tensor], tp: int, a: dict,
                      path: str) -> int:
        """Cross-check args' shape against TP rank 0's tensors; return the padded vocab size."""
        from mindlora.models.families.base import TARGET_PATHS, target_shape

        errors = []
        for target in LORA_TARGETS:
            key = f"decoder.layers.0.{TARGET_PATHS[target]}.weight"
            if key in state:
                want = shard_shape(target_shape(cfg, target), split_rule(key), tp)
                if tuple(state[key].shape) != want:
                    errors.append(f"{key} is {tuple(state[key].shape)}, args imply {want}")
        padded = int(a.get("padded_vocab_size") or cfg.vocab_size)
        emb = state.get("embedding.word_embeddings.weight")
        if emb is not None:
            if emb.shape[1] != cfg.hidden_size:
                errors.append(f"embedding width {emb.shape[1]} != hidden_size {cfg.hidden_size}")
            padded = emb.shape[0] * tp
        if padded < cfg.vocab_size:
            errors.append(f"vocabulary rows {padded} < the true vocab size {cfg.vocab_size}")
        fail_if(errors, f"tensor shapes in {path}")
        return padded


def lora_config_from_args(a: dict[str, Any], state: dict[str, torch.Tensor], path: str
                          ) -> LoRAConfig:
    """MindSpeed-LLM's ``lora_r`` / ``lora_alpha`` / ``lora_target_modules`` (else the tensors)."""
    found = [t for t in LORA_TARGETS if any(f".{t}.lora_A." in k for k in state)]
    a_keys = [k for k in state if ".lora_A." in k]
    r = int(a.get("lora_r") or state[a_keys[0]].shape[0])
    targets = tuple(a.get("lora_target_modules") or found)
    if set(targets) != set(found):
        raise ValueError(f"{path}: args.lora_target_modules={list(targets)} but the file has "
                         f"factors for {found}")
    return LoRAConfig(r=r, alpha=float(a.get("lora_alpha") or r), target_modules=targets,
                      use_rslora=bool(a.get("lora_use_rslora") or a.get("use_rslora")))


def megatron_args(kind: str, cfg: ModelConfig, tp: int, pp: int, vpp: Optional[int],
                  stage_counts: list[int], padded_vocab_size: int, params_dtype: torch.dtype,
                  lora: Optional[LoRAConfig] = None, iteration: int = 0, ep: int = 1
                  ) -> argparse.Namespace:
    """The ``args`` Megatron-LM / MindSpeed-LLM tools read from a rank file (plain values and a
    torch dtype, all readable with ``weights_only=True``); MoE models add Megatron's expert
    flags (``num_experts`` ..., ``expert_model_parallel_size``)."""
    even = len(set(stage_counts)) == 1
    ns = dict(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        group_query_attention=cfg.num_query_groups != cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups, kv_channels=cfg.kv_channels,
        max_position_embeddings=cfg.max_position_embeddings, seq_length=None,
        vocab_size=cfg.vocab_size, padded_vocab_size=padded_vocab_size,
        make_vocab_size_divisible_by=1, norm_epsilon=cfg.norm_epsilon, normalization="RMSNorm",
        swiglu=True, position_embedding_type="rope", rotary_base=cfg.rotary_base,
        use_rope_scaling=bool(cfg.rope_scaling), add_bias_linear=False,
        add_qkv_bias=cfg.add_qkv_bias, qk_layernorm=cfg.qk_layernorm,
        untie_embeddings_and_output_weights=not cfg.tie_word_embeddings,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        num_layers_per_virtual_pipeline_stage=(layers_per_virtual_stage(cfg.num_layers, pp, vpp)
                                               if vpp else None),
        num_layer_list=None if even else ",".join(map(str, stage_counts)),
        params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16, model_type_hf=cfg.family, use_mcore_models=True,
        transformer_impl="local", ckpt_format="torch", iteration=iteration,
        lora_r=lora.r if lora else None, lora_alpha=lora.alpha if lora else None,
        lora_target_modules=list(lora.target_modules) if lora else [],
        lora_use_rslora=lora.use_rslora if lora else False, mindlora_kind=kind)
    if cfg.is_moe:
        ns.update(num_experts=cfg.num_moe_experts, moe_router_topk=cfg.moe_router_topk,
                  moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
                  moe_aux_loss_coeff=cfg.moe_aux_loss_coeff, expert_model_parallel_size=ep)
    return argparse.Namespace(**ns)
