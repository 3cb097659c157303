"""Rank-stacked LoRA targets keep their block structure while training.

An imported PEFT adapter with independent q/k/v (gate/up) factors becomes one fused factor pair
per target: ``A = [A_q; A_k; A_v]`` and a block-structured B whose q rows use only A_q's rank
slice, and so on (mindlora.models.families.base.stack_lora_b, which also builds the masks used
here: the blocks' widths are the model's knowledge, not LoRA's). The math of the layer is unchanged
(``y = base(x) + s * B A x``). Left alone, B's gradient ``dY (A x)^T`` is dense, so training would
fill the off-block zeros and the factors could no longer be split back into q/k/v. Masking B's
gradient to its blocks keeps them zero (Adam's update of a parameter whose gradient is always
zero is zero, and decoupled weight decay keeps a zero at zero); A's gradient already is
block-local because B is. Then export gives separate per-module factors again, bit for bit.
"""
from __future__ import annotations

import torch

from mindlora.config import TARGET_PATHS
from mindlora.parallel.layout import shard, split_rule


def keep_block_structure(chunks: list[torch.nn.Module], masks: dict[str, torch.Tensor],
                         tp_size: int, tp_rank: int) -> int:
    """Mask the off-block gradient of every rank-stacked target's B (every expert's, in a MoE
    layer); return how many layers.

    Args:
        masks: target -> 0/1 mask of its full (TP=1) B's blocks
            (mindlora.models.families.base.lora_block_masks); targets with one module (o, down)
            or with mindlora's shared A have none.
    """
    hooked = 0
    for chunk in chunks:
        for name, module in chunk.named_modules():
            for target, full in masks.items():
                expert = ".experts.local_experts." in name and name.endswith("." + target)
                if (name.endswith("." + TARGET_PATHS[target]) or expert) and hasattr(
                        module, "lora_B"):
                    weight = module.lora_B.weight
                    mask = shard(full, split_rule(f"{TARGET_PATHS[target]}.lora_B.weight"),
                                 tp_size, tp_rank).to(device=weight.device, dtype=weight.dtype)
                    if mask.shape != weight.shape:
                        raise ValueError(f"{name}: block mask {tuple(mask.shape)} does not fit "
                                         f"lora_B {tuple(weight.shape)}")
                    weight.register_hook(lambda grad, m=mask: grad * m.to(grad.dtype))
                    hooked += 1
    return hooked
