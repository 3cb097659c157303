"""The spec seam: the one place where LoRA enters the megatron-core GPT layer.

The layer spec names, for each of ``linear_qkv``, ``linear_proj``, ``linear_fc1`` and
``linear_fc2``, either megatron-core's plain parallel linear or mindlora's LoRA subclass. The model
is then built by megatron-core as usual; nothing is swapped after construction.
"""
from __future__ import annotations

from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from mindlora.config import LoRAConfig
from mindlora.lora.layers import LoRAColumnParallelLinear, LoRARowParallelLinear
from mindlora.models.attention import SDPAttention
from mindlora.models.moe import moe_mlp_spec
from mindlora.models.norm import QKRMSNorm, RMSNorm


def _linear(target: str, row: bool, lora: Optional[LoRAConfig]):
    if lora is None or target not in lora.target_modules:
        return RowParallelLinear if row else ColumnParallelLinear
    cls = LoRARowParallelLinear if row else LoRAColumnParallelLinear
    return ModuleSpec(module=cls, params={"lora_config": lora.for_target(target)})


def gpt_layer_spec(qk_layernorm: bool, lora: Optional[LoRAConfig] = None,
                   moe: bool = False) -> ModuleSpec:
    """A Llama/Qwen decoder layer (RMSNorm, RoPE attention, SwiGLU MLP) with LoRA on targets;
    ``moe``: megatron-core's routed-experts MLP instead (mindlora.models.moe)."""
    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=_linear("linear_qkv", False, lora),
            core_attention=SDPAttention,
            linear_proj=_linear("linear_proj", True, lora),
            q_layernorm=QKRMSNorm if qk_layernorm else IdentityOp,
            k_layernorm=QKRMSNorm if qk_layernorm else IdentityOp,
        ),
    )
    mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(
        linear_fc1=_linear("linear_fc1", False, lora),
        linear_fc2=_linear("linear_fc2", True, lora),
    ))
    if moe:
        mlp = moe_mlp_spec(lora)
    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=RMSNorm,
        self_attention=attention,
        self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=RMSNorm,
        mlp=mlp,
        mlp_bda=get_bias_dropout_add,
    ))
