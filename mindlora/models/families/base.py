"""What every Llama-like family shares: the HF <-> megatron-core key map and its pure transforms.

A family is data: which HF tensors make which megatron-core tensor (:class:`TensorMap`) and how
(``copy``, ``qkv`` per-query-group interleave, ``gate_up`` fusion). The transforms are pure
functions of full (TP=1) tensors, so they run unchanged on real tensors, on ``meta`` tensors (to
plan output files before any byte is read) and on LoRA B factors (whose rows follow the base
weight's rows).
Resharding lives elsewhere (mindlora.parallel.layout); nothing here knows about TP or PP.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from mindlora.config import TARGET_PATHS  # noqa: F401 (re-exported)
from mindlora.config import LoRAConfig, ModelConfig, fail_if

HF_LAYER_PREFIX = "model.layers.{}."
MCORE_LAYER_PREFIX = "decoder.layers.{}."


TRANSFORMS = ("copy", "qkv", "gate_up")


@dataclass(frozen=True)
class TensorMap:
    """One megatron-core tensor and the HF tensor(s) it is made of.

    Layer maps hold keys relative to ``decoder.layers.{i}.`` / ``model.layers.{i}.``; global maps
    hold full keys.
    """

    mcore: str
    hf: tuple[str, ...]
    transform: str = "copy"

    def __post_init__(self) -> None:
        assert self.transform in TRANSFORMS, self.transform
        assert len(self.hf) == {"copy": 1, "qkv": 3, "gate_up": 2}[self.transform], self


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   num_query_groups: int) -> torch.Tensor:
    """HF q/k/v (rows = heads x head_dim) -> fused rows ``[q_g, k_g, v_g]`` per group.

    Works on any trailing shape (weights ``[rows, in]``, biases ``[rows]``, LoRA B ``[rows, r]``).
    """
    g = num_query_groups
    tail = q.shape[1:]
    parts = [t.reshape(g, t.shape[0] // g, *tail) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, num_query_groups: int, num_attention_heads: int,
              head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`interleave_qkv`: fused rows -> contiguous HF q, k, v."""
    g = num_query_groups
    q_rows = num_attention_heads // g * head_dim
    tail = qkv.shape[1:]
    grouped = qkv.reshape(g, q_rows + 2 * head_dim, *tail)
    q, k, v = grouped.split([q_rows, head_dim, head_dim], dim=1)
    return (q.reshape(-1, *tail).contiguous(), k.reshape(-1, *tail).contiguous(),
            v.reshape(-1, *tail).contiguous())


def to_mcore(tmap: TensorMap, tensors: Sequence[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """Apply ``tmap``'s transform HF -> megatron-core (full tensors)."""
    if tmap.transform == "qkv":
        return interleave_qkv(*tensors, cfg.num_query_groups)
    if tmap.transform == "gate_up":
        return torch.cat(list(tensors), dim=0)
    return tensors[0]


def to_hf(tmap: TensorMap, tensor: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """Apply ``tmap``'s transform megatron-core -> HF (full tensors), HF order of ``tmap.hf``."""
    if tmap.transform == "qkv":
        return list(split_qkv(tensor, cfg.num_query_groups, cfg.num_attention_heads,
                              cfg.kv_channels))
    if tmap.transform == "gate_up":
        return [t.contiguous() for t in tensor.chunk(2, dim=0)]
    return [tensor]


def llama_layer_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Per-layer map of a Llama-like decoder; qkv bias and q/k norms follow the config flags."""
    maps = [
        TensorMap("input_layernorm.weight", ("input_layernorm.weight",)),
        TensorMap("self_attention.linear_qkv.weight",
                  ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                   "self_attn.v_proj.weight"), "qkv"),
        TensorMap("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",)),
        TensorMap("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",)),
        TensorMap("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
                  "gate_up"),
        TensorMap("mlp.linear_fc2.weight", ("mlp.down_proj.weight",)),
    ]
    if cfg.add_qkv_bias:
        maps.append(TensorMap("self_attention.linear_qkv.bias",
                              ("self_attn.q_proj.bias", "self_attn.k_proj.bias",
                               "self_attn.v_proj.bias"), "qkv"))
    if cfg.qk_layernorm:
        maps.append(TensorMap("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",)))
        maps.append(TensorMap("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",)))
    return maps


def llama_global_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Embedding, final norm and (untied) output head; vocab rows are unpadded here."""
    maps = [
        TensorMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
        TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",)),
    ]
    if not cfg.tie_word_embeddings:
        maps.append(TensorMap("output_layer.weight", ("lm_head.weight",)))
    return maps


@dataclass(frozen=True)
class Family:
    """A model family: config translation both ways plus the key map (see module docstring)."""

    name: str
    """The ``--model-type-hf`` value."""
    hf_model_types: tuple[str, ...]
    """``model_type`` values of config.json this family accepts."""
    architecture: str
    """``architectures[0]`` written to config.json on mg -> hf."""
    model_config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    hf_config_from_model: Callable[[ModelConfig, str], dict[str, Any]]
    """(model config, dtype name) -> a complete config.json dict."""
    layer_maps: Callable[[ModelConfig], list[TensorMap]] = llama_layer_maps
    global_maps: Callable[[ModelConfig], list[TensorMap]] = llama_global_maps

    def lora_map(self, cfg: ModelConfig, target: str) -> TensorMap:
        """The map of LoRA target ``target``'s base weight (B's rows follow its transform); for
        the expert targets of a mixture-of-experts model, expert 0's (see :meth:`lora_units`)."""
        return self.lora_units(cfg, target)[0][1]

    def lora_units(self, cfg: ModelConfig, target: str) -> list[tuple[str, TensorMap]]:
        """(module path inside a layer, map of its base weight) of every linear carrying
        ``target``: one for attention and dense MLPs, one per routed expert in a MoE model."""
        maps = {tmap.mcore: tmap for tmap in self.layer_maps(cfg)}
        units = []
        for path in target_module_paths(cfg, target):
            if path + ".weight" not in maps:
                raise KeyError(f"family {self.name} has no tensor {path}.weight")
            units.append((path, maps[path + ".weight"]))
        return units


def rope_fields(hf: dict[str, Any]) -> tuple[float, Optional[dict]]:
    """(rope theta, scaling dict or None) from either transformers 4 or 5 config.json fields."""
    params = hf.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling")
    if params and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return theta, scaling


def check_hf_fields(hf: dict[str, Any], family: str, unsupported: dict[str, Any]) -> None:
    """Refuse config.json features the megatron-core model would silently get wrong."""
    errors = []
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        errors.append(f"hidden_act ({act}) is not supported; only silu")
    for field, ok_value in unsupported.items():
        if hf.get(field, ok_value) != ok_value:
            errors.append(f"{field} ({hf[field]}) is not supported for --model-type-hf {family}")
    fail_if(errors, "config.json for mindlora")


def common_model_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields every Llama-like config.json spells the same way."""
    theta, scaling = rope_fields(hf)
    heads = hf["num_attention_heads"]
    return dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        vocab_size=hf["vocab_size"],
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rotary_base=theta,
        rope_scaling=scaling,
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def common_hf_fields(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """config.json fields every Llama-like family writes the same way (transformers 5 spelling)."""
    rope = {"rope_theta": cfg.rotary_base, "rope_type": "default"}
    if cfg.rope_scaling:
        rope = {**cfg.rope_scaling, "rope_theta": cfg.rotary_base}
    return {
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.kv_channels,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "rope_parameters": rope,
        "rope_theta": cfg.rotary_base,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "dtype": dtype,
        "torch_dtype": dtype,
        "use_cache": True,
    }


def target_shape(cfg: ModelConfig, target: str) -> tuple[int, int]:
    """(out_features, in_features) of a LoRA target's full (TP=1) base weight (one expert's, for
    the MLP targets of a mixture-of-experts model)."""
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * cfg.kv_channels
    ffn = cfg.moe_ffn_hidden_size if cfg.is_moe else cfg.ffn_hidden_size
    return {"linear_qkv": (qkv_rows, cfg.hidden_size),
            "linear_proj": (cfg.hidden_size, cfg.num_attention_heads * cfg.kv_channels),
            "linear_fc1": (2 * ffn, cfg.hidden_size),
            "linear_fc2": (cfg.hidden_size, ffn)}[target]


def target_module_paths(cfg: ModelConfig, target: str) -> list[str]:
    """Module paths (inside a layer) carrying LoRA target ``target``: one for attention and dense
    MLPs, one per routed expert for the MLP targets of a mixture-of-experts model."""
    if cfg.is_moe and target in ("linear_fc1", "linear_fc2"):
        return [f"mlp.experts.local_experts.{e}.{target}" for e in range(cfg.num_moe_experts)]
    return [TARGET_PATHS[target]]


def module_widths(cfg: ModelConfig, target: str) -> list[int]:
    """Output rows of each HF module a LoRA target covers (q, k, v / gate, up / o / down)."""
    d, g = cfg.kv_channels, cfg.num_query_groups
    ffn = cfg.moe_ffn_hidden_size if cfg.is_moe else cfg.ffn_hidden_size  # one expert's
    return {"linear_qkv": [cfg.num_attention_heads * d, g * d, g * d],
            "linear_proj": [cfg.hidden_size],
            "linear_fc1": [ffn, ffn],
            "linear_fc2": [cfg.hidden_size]}[target]


def _fuse_rows(cfg: ModelConfig, target: str, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    if target == "linear_qkv":
        return interleave_qkv(*parts, cfg.num_query_groups)
    return torch.cat(list(parts), dim=0)


def stack_lora_b(cfg: ModelConfig, target: str, bs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rank-stacked B of a fused target from its modules' B factors: module m's rows hold B_m in
    m's own column block and zeros elsewhere, so ``B @ [A_1; A_2; ...]`` gives each module
    exactly ``B_m @ A_m``."""
    total = sum(b.shape[1] for b in bs)
    parts, start = [], 0
    for b in bs:
        part = b.new_zeros(b.shape[0], total)
        part[:, start:start + b.shape[1]] = b
        parts.append(part)
        start += b.shape[1]
    return _fuse_rows(cfg, target, parts)


def split_lora_b(cfg: ModelConfig, target: str, b: torch.Tensor, ranks: Sequence[int]
                 ) -> list[torch.Tensor]:
    """Inverse of :func:`stack_lora_b`: each module's rows, its own column block (copies)."""
    if target == "linear_qkv":
        rows = list(split_qkv(b, cfg.num_query_groups, cfg.num_attention_heads, cfg.kv_channels))
    else:
        rows = list(b.split(module_widths(cfg, target), dim=0))
    starts = [sum(ranks[:i]) for i in range(len(ranks))]
    return [r[:, s:s + n].contiguous() for r, s, n in zip(rows, starts, ranks)]


def lora_block_mask(cfg: ModelConfig, target: str, ranks: Sequence[int]) -> torch.Tensor:
    """0/1 mask ``[out, sum(ranks)]`` of a rank-stacked B's blocks (1 = module's own block)."""
    # host-tensor: built once at set-up; lora.blocks shards it and moves it to the weight's device
    return stack_lora_b(cfg, target, [torch.ones(w, r) for w, r in
                                      zip(module_widths(cfg, target), ranks)])


def lora_block_masks(cfg: ModelConfig, lora: LoRAConfig) -> dict[str, torch.Tensor]:
    """:func:`lora_block_mask` of every rank-stacked target with blocks to keep (more than one
    module), for mindlora.lora.blocks.keep_block_structure."""
    return {t: lora_block_mask(cfg, t, r) for t, r in lora.ranks.items() if len(r) > 1}
