"""What the mixture-of-experts families share: router + per-expert key maps, router settings.

megatron-core's MoE layer holds ``mlp.router.weight`` and, for every expert ``e``,
``mlp.experts.local_experts.{e}.linear_fc1.weight`` (fused ``[gate; up]``) and ``...linear_fc2``.
Full (converted) layers number experts globally; a checkpoint rank of expert-parallel rank ``r``
holds experts ``r * E/EP ...`` renumbered from 0, as megatron-core's SequentialMLP names them
(the renumbering lives in mindlora.parallel.layout).
"""
from __future__ import annotations

from typing import Any

from mindlora.config import ModelConfig
from mindlora.models.families.base import TensorMap, llama_layer_maps

ROUTER_KEY = "mlp.router.weight"
EXPERT_KEY = "mlp.experts.local_experts.{}.{}.weight"


def attention_layer_maps(cfg: ModelConfig) -> list[TensorMap]:
    """The Llama-like maps of one layer without the dense MLP."""
    return [m for m in llama_layer_maps(cfg) if not m.mcore.startswith("mlp.")]


def expert_layer_maps(cfg: ModelConfig, hf_mlp: str, router: str,
                      names: tuple[str, str, str]) -> list[TensorMap]:
    """Router and experts, HF side ``{hf_mlp}.{router}.weight`` / ``{hf_mlp}.experts.{e}.{name}``.

    Args:
        names: the HF (gate, up, down) projection names of one expert.
    """
    gate, up, down = names
    maps = [TensorMap(ROUTER_KEY, (f"{hf_mlp}.{router}.weight",))]
    for e in range(cfg.num_moe_experts):
        hf = f"{hf_mlp}.experts.{e}."
        maps.append(TensorMap(EXPERT_KEY.format(e, "linear_fc1"),
                              (hf + f"{gate}.weight", hf + f"{up}.weight"), "gate_up"))
        maps.append(TensorMap(EXPERT_KEY.format(e, "linear_fc2"), (hf + f"{down}.weight",)))
    return maps


def router_fields(hf: dict[str, Any], norm_topk_prob: bool) -> dict[str, Any]:
    """ModelConfig MoE fields from config.json (``num_experts`` or ``num_local_experts``)."""
    experts = hf.get("num_experts") or hf.get("num_local_experts")
    if not experts:
        raise ValueError("unsupported config.json: no num_experts / num_local_experts")
    return dict(num_moe_experts=int(experts),
                moe_router_topk=int(hf.get("num_experts_per_tok", 2)),
                moe_router_pre_softmax=not norm_topk_prob,
                moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.0)))


def router_hf_fields(cfg: ModelConfig) -> dict[str, Any]:
    return {"num_experts_per_tok": cfg.moe_router_topk,
            "router_aux_loss_coef": cfg.moe_aux_loss_coeff,
            "output_router_logits": False}
