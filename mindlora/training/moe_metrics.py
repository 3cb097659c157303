"""The load-balancing (aux) loss of mixture-of-experts layers, reported beside the lm loss.

megatron-core's router records each MoE layer's aux loss (divided by its coefficient) in a
per-layer tracker every micro-batch, already summed over a sequence-parallel group's shards
once reduced. As Megatron's ``track_moe_metrics``, the value logged is the mean over MoE layers
and micro-batches, averaged over data parallel. It is reported, not added to ``lm loss``; the
gradient always includes ``coeff x aux loss``.
"""
from __future__ import annotations

from megatron.core.transformer.moe.moe_utils import (clear_aux_losses_tracker,
                                                     get_moe_layer_wise_logging_tracker,
                                                     reduce_aux_losses_tracker_across_ranks)


def pop_aux_losses(num_microbatches: int, num_moe_layers: int) -> dict[str, float]:
    """``{name: value}`` of this iteration (collective over PP and DP); resets the tracker.

    Every rank must call it (the reduction is collective); dense models return ``{}``.
    """
    tracker = get_moe_layer_wise_logging_tracker()
    if not tracker:
        return {}
    names = sorted(tracker)
    reduce_aux_losses_tracker_across_ranks(names)
    out = {name: float(tracker[name]["values"].double().sum()) / max(num_microbatches, 1)
           / max(num_moe_layers, 1) for name in names}
    clear_aux_losses_tracker()
    return out
