"""The mixture-of-experts MLP: megatron-core's MoELayer (router + token dispatcher + experts).

Experts are megatron-core's ``SequentialMLP`` (one ColumnParallel fc1 / RowParallel fc2 pair per
local expert, a Python loop); grouped GEMM is not used because it needs Transformer Engine or the
``grouped_gemm`` CUDA package. Tokens are never dropped (no capacity factor), so an expert-parallel
model computes exactly what a single process does.

Token dispatcher: ``alltoall`` on accelerators (Megatron's default for EP); ``allgather`` on the
CPU, because megatron-core 0.16.1's alltoall dispatcher creates a ``torch.cuda.Stream`` in its
constructor. Both give the same result; they differ only in communication volume.
"""
from __future__ import annotations

from typing import Any, Optional

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec

from mindlora.config import LoRAConfig, ModelConfig, ParallelConfig
from mindlora.lora.layers import LoRAColumnParallelLinear, LoRARowParallelLinear


def _patch_router_gemm_without_te() -> None:
    """megatron-core 0.16.1's router GEMM tests ``te_general_gemm is not None`` although that name
    is only bound when Transformer Engine imports; without TE every router forward raises
    NameError. Binding it to None selects the plain ``torch.mm`` path it already has."""
    from megatron.core.transformer.moe import moe_utils

    if not getattr(moe_utils, "HAVE_TE", False) and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


class PerTokenAuxLossRouter(TopKRouter):
    """megatron-core's TopKRouter with the load-balancing loss weighted the same at every TP/SP.

    With per-token loss (mindlora's, Megatron's ``--calculate-per-token-loss``) the router scales
    its aux loss by the rank's token count, to cancel the division by the global labelled-token
    count in the gradient finalisation. Under sequence parallelism a rank's aux loss is already
    its *share* of the sequence's loss (local probabilities x sequence-wide expert counts), so
    scaling it by the rank's *local* token count makes the effective coefficient 1/TP of the
    TP=1 value, and training curves drift with the layout. The weight must be the tokens of the
    whole reduce group (the sequence), which is what this override passes.
    """

    def attach_and_log_load_balancing_loss(self, activation, aux_loss_coeff, aux_loss,
                                           aux_loss_name, reduce_group,
                                           reduce_group_has_dp=False, valid_token_count=None):
        if (aux_loss_name == "load_balancing_loss" and valid_token_count is not None
                and not reduce_group_has_dp and reduce_group is not None):
            valid_token_count = valid_token_count * reduce_group.size()
        return super().attach_and_log_load_balancing_loss(
            activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
            reduce_group_has_dp=reduce_group_has_dp, valid_token_count=valid_token_count)


def _expert_linear(target: str, row: bool, lora: Optional[LoRAConfig]):
    if lora is None or target not in lora.target_modules:
        return RowParallelLinear if row else ColumnParallelLinear
    cls = LoRARowParallelLinear if row else LoRAColumnParallelLinear
    return ModuleSpec(module=cls, params={"lora_config": lora.for_target(target)})


def moe_mlp_spec(lora: Optional[LoRAConfig] = None) -> ModuleSpec:
    """The MLP spec of a MoE decoder layer (no shared experts).

    LoRA targets ``linear_fc1`` / ``linear_fc2`` put a LoRA linear in every expert (each expert
    its own A and B, living and sharded with the expert); the router stays frozen and plain.
    """
    _patch_router_gemm_without_te()
    experts = ModuleSpec(module=SequentialMLP, submodules=MLPSubmodules(
        linear_fc1=_expert_linear("linear_fc1", False, lora),
        linear_fc2=_expert_linear("linear_fc2", True, lora)))
    return ModuleSpec(module=MoELayer, submodules=MoESubmodules(experts=experts,
                                                                router=PerTokenAuxLossRouter),
                      metainfo={"fuse_pre_mlp_layernorm": False})


def moe_config_fields(model: ModelConfig, parallel: ParallelConfig, on_cpu: bool
                      ) -> dict[str, Any]:
    """TransformerConfig fields of a MoE model (empty for a dense one)."""
    if not model.is_moe:
        return {}
    return dict(
        num_moe_experts=model.num_moe_experts,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size,
        moe_router_topk=model.moe_router_topk,
        moe_router_pre_softmax=model.moe_router_pre_softmax,
        moe_router_load_balancing_type="aux_loss" if model.moe_aux_loss_coeff else "none",
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_token_dispatcher_type="allgather" if on_cpu else "alltoall",
        moe_expert_capacity_factor=None,
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
    )
