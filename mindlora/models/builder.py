"""Build the megatron-core GPTModel chunk(s) of this pipeline rank from the typed configs.

The parallel layout is turned into an explicit ``pipeline_model_parallel_layout`` (even, uneven via
``--num-layer-list``, or interleaved) from mindlora.parallel.layout, which also says which global
layers a chunk holds for the model, the checkpoint loader and the adapter files alike.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from mindlora.config import LoRAConfig, ModelConfig, ParallelConfig
from mindlora.lora.layers import LORA_LAYER_TYPES, init_lora_factors
from mindlora.models.spec import gpt_layer_spec
from mindlora.models.gpt import MindloraGPTModel
from mindlora.models.moe import moe_config_fields
from mindlora.models.norm import RMSNorm
from mindlora.parallel.layout import (chunk_layer_ids, expert_index, pad_vocab,
                                      parallel_layer_counts, pipeline_layout)
from mindlora.runtime.device import current


_CUDA_ONLY_FUSIONS = ("bias_activation_fusion", "bias_dropout_fusion")
"""megatron-core's jit-scripted bias/activation and bias/dropout fusions: on with CUDA only."""
_UNUSED_FUSIONS = ("masked_softmax_fusion", "apply_rope_fusion", "gradient_accumulation_fusion",
                   "persist_layer_norm")
"""Fusions needing kernels (apex, TE, CUDA extensions) mindlora does not use on any device."""


def transformer_config(model: ModelConfig, parallel: ParallelConfig,
                       params_dtype: torch.dtype = torch.float32,
                       recompute_granularity: Optional[str] = None,
                       recompute_method: Optional[str] = None,
                       recompute_num_layers: Optional[int] = None) -> TransformerConfig:
    """megatron-core TransformerConfig for ``model`` under ``parallel``.

    Fusions that need CUDA kernels are switched off on the CPU and the NPU; ``batch_p2p_comm`` is
    off on gloo, where batched isend/irecv gave wrong gradients for interleaved pipelines with
    PP=2. Weights are allocated straight on the accelerator (``use_cpu_initialization`` only on
    the CPU): a rank never stages its chunk in host RAM.
    """
    parallel.check_model(model)
    device = current()
    on_gpu = not device.is_cpu
    cuda = device.kind == "cuda"
    pp = parallel.pipeline_model_parallel_size
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        pipeline_model_parallel_layout=(pipeline_layout(parallel_layer_counts(model, parallel))
                                        if pp > 1 else None),
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        perform_initialization=False,
        **dict.fromkeys(_CUDA_ONLY_FUSIONS, cuda),
        **dict.fromkeys(_UNUSED_FUSIONS, False),
        batch_p2p_comm=on_gpu,
        calculate_per_token_loss=True,
        recompute_granularity=recompute_granularity,
        recompute_method=recompute_method,
        recompute_num_layers=recompute_num_layers,
        **moe_config_fields(model, parallel, not on_gpu),
    )


def build_model(model: ModelConfig, parallel: ParallelConfig, lora: Optional[LoRAConfig] = None,
                params_dtype: torch.dtype = torch.float32,
                config: Optional[TransformerConfig] = None) -> list[MindloraGPTModel]:
    """The GPTModel chunk(s) of this pipeline rank (one per virtual stage), base frozen.

    Base weights are allocated but not initialised (they come from a checkpoint); LoRA A is drawn
    TP-invariantly and B is zero. Requires :func:`mindlora.runtime.init_parallel` first.
    """
    config = config or transformer_config(model, parallel, params_dtype)
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp = parallel.pipeline_model_parallel_size
    vpp = parallel.virtual_pipeline_model_parallel_size or 1
    spec = gpt_layer_spec(model.qk_layernorm, lora, moe=model.is_moe)
    device = current().torch_device()  # this rank's accelerator (LOCAL_RANK), or the CPU
    chunks = []
    for v in range(vpp):
        n_layers = len(chunk_layer_ids(model, parallel, pp_rank, v))
        block = TransformerBlockSubmodules(layer_specs=[spec] * n_layers, layer_norm=RMSNorm)
        gpt = MindloraGPTModel(
            config=config,
            transformer_layer_spec=block,
            vocab_size=pad_vocab(model.vocab_size, tp_size),
            max_sequence_length=model.max_position_embeddings,
            pre_process=pp_rank == 0 and v == 0,
            post_process=pp_rank == pp - 1 and v == vpp - 1,
            share_embeddings_and_output_weights=model.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(model.rotary_base),
            rope_scaling=bool(model.rope_scaling),
            rope_scaling_factor=float((model.rope_scaling or {}).get("factor", 8.0)),
            vp_stage=v if vpp > 1 else None,
            real_vocab_size=model.vocab_size,
        ).to(device)
        for p in gpt.parameters():
            p.requires_grad_(False)
        if config.recompute_granularity is not None and gpt.pre_process:
            # megatron-core recomputes through a reentrant autograd Function, which only
            # propagates gradients if its *input* requires grad; with a frozen embedding it does
            # not, and the LoRA factors inside would silently get no gradient.
            gpt.embedding.register_forward_hook(_require_grad)
        if lora is not None:
            _init_lora(gpt, tp_rank, tp_size)
        chunks.append(gpt)
    return chunks


def _require_grad(module, inputs, output: torch.Tensor) -> torch.Tensor:
    return output.requires_grad_(True) if not output.requires_grad else output


def _init_lora(gpt: MindloraGPTModel, tp_rank: int, tp_size: int) -> None:
    """A drawn per (layer, target[, global expert]) so it is independent of TP and EP."""
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    for layer in gpt.decoder.layers:
        n_local = getattr(getattr(layer.mlp, "experts", None), "num_local_experts", 0)
        for name, module in layer.named_modules():
            if isinstance(module, LORA_LAYER_TYPES):
                local = expert_index(name + ".weight")
                expert = None if local is None else ep_rank * n_local + local
                init_lora_factors(module, layer.layer_number, name.split(".")[-1], tp_rank,
                                  tp_size, expert=expert)
                module.lora_A.weight.requires_grad_(True)
                module.lora_B.weight.requires_grad_(True)


def parameter_report(chunks: list[torch.nn.Module]) -> str:
    """``trainable params: X || all params: Y || trainable%: Z`` for this rank's chunks."""
    total = sum(p.numel() for c in chunks for p in c.parameters())
    train = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
    return (f"trainable params: {train:,} || all params: {total:,} || "
            f"trainable%: {100.0 * train / max(total, 1):.4f}")
