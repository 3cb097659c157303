"""Model FLOPs of one LoRA training token, for tokens/s -> TFLOP/s -> MFU (docs/performance.md).

Per token, for a decoder of ``L`` layers at sequence length ``s``:

* every frozen linear weight (q/k/v, output projection, gate/up, down, the LM head; ``N_frozen``
  weights) costs 2 FLOPs per weight forward and 2 backward for the input gradient, and nothing
  for a weight gradient it does not have: ``4 * N_frozen``;
* every LoRA factor weight (``N_lora``) is trained: forward, input gradient and weight gradient,
  ``6 * N_lora``;
* causal attention: ``Q K^T`` and ``P V`` cost ``2 * 2 * s * h_q`` FLOPs per token forward over all
  positions, half of them masked away by causality, and the backward twice the forward:
  ``6 * L * s * h_q`` with ``h_q = heads * head_dim``.

Embedding lookups, norms, activations and the softmax are not counted (as in the usual ``6N``
convention); recomputation is not counted (model FLOPs, not hardware FLOPs). The LM head counts
for every token, although mindlora only evaluates it on labelled tokens: both sides of a
comparison use this one count.
"""
from __future__ import annotations

from dataclasses import dataclass

TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass(frozen=True)
class Shapes:
    """What the count needs of a dense GQA decoder with a gated MLP."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int


def linear_shapes(m: Shapes) -> dict[str, tuple[int, int]]:
    """``(in, out)`` of each per-layer linear (megatron-core names; fc1 holds gate and up)."""
    q = m.num_attention_heads * m.kv_channels
    kv = m.num_query_groups * m.kv_channels
    return {"linear_qkv": (m.hidden_size, q + 2 * kv), "linear_proj": (q, m.hidden_size),
            "linear_fc1": (m.hidden_size, 2 * m.ffn_hidden_size),
            "linear_fc2": (m.ffn_hidden_size, m.hidden_size)}


def frozen_weights(m: Shapes) -> int:
    """Weights of every frozen linear, the LM head included (embedding lookups excluded)."""
    per_layer = sum(i * o for i, o in linear_shapes(m).values())
    return m.num_layers * per_layer + m.vocab_size * m.hidden_size


def lora_weights(m: Shapes, r: int, targets=TARGETS) -> int:
    """Weights of the LoRA factors: ``r * (in + out)`` per adapted linear and layer."""
    return m.num_layers * sum(r * (i + o) for t, (i, o) in linear_shapes(m).items()
                              if t in targets)


def train_flops_per_token(m: Shapes, r: int, seq_length: int, targets=TARGETS) -> dict:
    """The three terms above and their sum (``total``), in FLOPs per token."""
    frozen = 4 * frozen_weights(m)
    lora = 6 * lora_weights(m, r, targets)
    attention = 6 * m.num_layers * seq_length * m.num_attention_heads * m.kv_channels
    return {"frozen": frozen, "lora": lora, "attention": attention,
            "total": frozen + lora + attention}


# Dense bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s (without sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.5, "H100 PCIe": 756.0, "H100": 989.5, "H800": 989.5,
                    "A100": 312.0, "A800": 312.0, "L40S": 362.0, "B200": 2250.0}


def peak_tflops(device_name: str) -> float | None:
    """Datasheet bf16 peak for a ``torch.cuda.get_device_name()``, longest match first."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_BF16_TFLOPS[key]
    return None
