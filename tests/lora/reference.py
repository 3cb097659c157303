"""A single-process, plain-PyTorch decoder that reads the FULL megatron-layout state dict.

It is the yardstick for the tensor-parallel model: nothing here imports megatron-core or mindlora's
layers, so a bug in the model cannot hide in the reference. Layouts it assumes (and so checks):

* ``linear_qkv`` rows are interleaved per query group: ``[q heads of group g; k_g; v_g]`` for
  g = 0..groups-1, each head ``kv_channels`` rows; optional bias in the same layout.
* q/k RMSNorm (Qwen3) is per head, applied before RoPE.
* RoPE is the non-interleaved rotate-half form with ``inv_freq = base^(-2i/d)``, positions 0..s-1.
* ``linear_fc1`` rows are ``[gate; up]``; the MLP is ``fc2(silu(gate) * up)``.
* LoRA on a target: ``y = x W^T (+ b) + scaling * (x A^T) B^T``.

Activations use megatron's ``[s, b, h]`` order at the boundary (embedding output) and return
logits as ``[b, s, vocab]`` like GPTModel.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from mindlora.config import LoRAConfig, ModelConfig

PARENT = {"linear_qkv": "self_attention", "linear_proj": "self_attention",
          "linear_fc1": "mlp", "linear_fc2": "mlp"}


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """``target -> (out_features, in_features)`` of the full (TP=1) weights."""
    d, nh, ng = cfg.kv_channels, cfg.num_attention_heads, cfg.num_query_groups
    return {"linear_qkv": ((nh + 2 * ng) * d, cfg.hidden_size),
            "linear_proj": (cfg.hidden_size, nh * d),
            "linear_fc1": (2 * cfg.ffn_hidden_size, cfg.hidden_size),
            "linear_fc2": (cfg.hidden_size, cfg.ffn_hidden_size)}


def make_state_dict(cfg: ModelConfig, lora: Optional[LoRAConfig], vocab: int,
                    seed: int) -> dict[str, torch.Tensor]:
    """A random full state dict with megatron-core's keys; lora_B is NON-zero on purpose.

    Scales keep activations O(1) so that relative tolerances mean something; norm weights are
    drawn around 1 (not exactly 1) so that a norm applied to the wrong axis shows.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    h, d = cfg.hidden_size, cfg.kv_channels
    sd = {"embedding.word_embeddings.weight": randn(vocab, h)}
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + randn(h, scale=0.1)
        sd[p + "pre_mlp_layernorm.weight"] = 1 + randn(h, scale=0.1)
        if cfg.qk_layernorm:
            sd[p + "self_attention.q_layernorm.weight"] = 1 + randn(d, scale=0.1)
            sd[p + "self_attention.k_layernorm.weight"] = 1 + randn(d, scale=0.1)
        for target, (out, inp) in linear_shapes(cfg).items():
            key = f"{p}{PARENT[target]}.{target}."
            sd[key + "weight"] = randn(out, inp, scale=1 / math.sqrt(inp))
            if target == "linear_qkv" and cfg.add_qkv_bias:
                sd[key + "bias"] = randn(out, scale=0.1)
            if lora is not None and target in lora.target_modules:
                sd[key + "lora_A.weight"] = randn(lora.r, inp, scale=1 / math.sqrt(inp))
                sd[key + "lora_B.weight"] = randn(out, lora.r, scale=0.5 / math.sqrt(lora.r))
    sd["decoder.final_layernorm.weight"] = 1 + randn(h, scale=0.1)
    if not cfg.tie_word_embeddings:
        sd["output_layer.weight"] = randn(vocab, h, scale=1 / math.sqrt(h))
    return sd


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate-half RoPE on ``[b, s, heads, d]`` for positions 0..s-1."""
    s, d = x.shape[1], x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(s, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)[None, :, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return x * emb.cos() + torch.cat((-x2, x1), dim=-1) * emb.sin()


def lora_linear(x: torch.Tensor, sd: dict, key: str, scaling: float) -> torch.Tensor:
    """``x W^T (+ b) + scaling * (x A^T) B^T`` for the linear at ``key`` (LoRA if present)."""
    y = F.linear(x, sd[key + "weight"], sd.get(key + "bias"))
    if key + "lora_A.weight" in sd:
        y = y + scaling * F.linear(F.linear(x, sd[key + "lora_A.weight"]),
                                   sd[key + "lora_B.weight"])
    return y


def attention(x: torch.Tensor, sd: dict, p: str, cfg: ModelConfig, scaling: float) -> torch.Tensor:
    b, s, _ = x.shape
    d, nh, ng = cfg.kv_channels, cfg.num_attention_heads, cfg.num_query_groups
    per_group = nh // ng
    qkv = lora_linear(x, sd, p + "self_attention.linear_qkv.", scaling)
    qkv = qkv.view(b, s, ng, per_group + 2, d)
    q = qkv[:, :, :, :per_group].reshape(b, s, nh, d)
    k, v = qkv[:, :, :, per_group], qkv[:, :, :, per_group + 1]
    if cfg.qk_layernorm:
        q = rms_norm(q, sd[p + "self_attention.q_layernorm.weight"], cfg.norm_epsilon)
        k = rms_norm(k, sd[p + "self_attention.k_layernorm.weight"], cfg.norm_epsilon)
    q, k = rope(q, cfg.rotary_base), rope(k, cfg.rotary_base)
    # [b, heads, s, d]; query head i reads key/value group i // per_group.
    q = q.transpose(1, 2)
    k = k.transpose(1, 2).repeat_interleave(per_group, dim=1)
    v = v.transpose(1, 2).repeat_interleave(per_group, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(b, s, nh * d)
    return lora_linear(out, sd, p + "self_attention.linear_proj.", scaling)


def mlp(x: torch.Tensor, sd: dict, p: str, scaling: float) -> torch.Tensor:
    gate, up = lora_linear(x, sd, p + "mlp.linear_fc1.", scaling).chunk(2, dim=-1)
    return lora_linear(F.silu(gate) * up, sd, p + "mlp.linear_fc2.", scaling)


def embed(sd: dict, input_ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings in megatron's ``[s, b, h]`` order."""
    return F.embedding(input_ids, sd["embedding.word_embeddings.weight"]).transpose(0, 1)


def decoder_logits(sd: dict, cfg: ModelConfig, scaling: float,
                   hidden: torch.Tensor) -> torch.Tensor:
    """Logits ``[b, s, vocab]`` from the embedding output ``hidden`` ``[s, b, h]``."""
    x = hidden.transpose(0, 1)
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        x = x + attention(rms_norm(x, sd[p + "input_layernorm.weight"], cfg.norm_epsilon),
                          sd, p, cfg, scaling)
        x = x + mlp(rms_norm(x, sd[p + "pre_mlp_layernorm.weight"], cfg.norm_epsilon),
                    sd, p, scaling)
    x = rms_norm(x, sd["decoder.final_layernorm.weight"], cfg.norm_epsilon)
    out_w = sd["embedding.word_embeddings.weight" if cfg.tie_word_embeddings
               else "output_layer.weight"]
    return F.linear(x, out_w)
