"""Column- and row-parallel LoRA linears: ``y = base(x) + s * B(A(dropout(x)))``.

Both subclass megatron-core's parallel linears, so the frozen base weight keeps its key, layout
and ``(output, bias)`` return, and a base checkpoint loads into a LoRA model unchanged.

Sharding (docs/lora.md has the diagram; ``mindlora.parallel.layout`` has the table):

* column base (W split on rows): A ``[r, in]`` replicated, B ``[out/tp, r]`` split like W's rows.
  ``z = A x`` is computed locally and only ``z`` (r wide) crosses ranks: its backward all-reduce
  (or, under sequence parallel, the all-gather/reduce-scatter pair) sums B's partial ``dz``, so
  A's gradient and the LoRA input-gradient come out already reduced. Under sequence parallel each
  rank sees a slice of the sequence, so A's gradient is summed over TP (identity-forward wrapper).
* row base (W split on columns): A ``[r, in/tp]`` split like W's columns, B ``[out, r]``
  replicated. ``B (A_k x_k)`` is rank k's partial product and joins the base partial sum *before*
  the base layer's all-reduce / reduce-scatter, so LoRA adds no forward collective; B's gradient
  is summed over TP because each rank saw only its partial ``z``.

LoRA factors are kept in float32 whatever the base dtype, and cast to the activation dtype in the
forward: the optimizer then steps float32 weights directly (no master copies to keep).

For megatron-core's distributed checkpointing, :meth:`LoRAMixin.sharded_state_dict` reports each
factor with the axis the sharding table gives it (the inherited method knows only
``weight``/``bias`` and would mark a TP-sharded factor as replicated).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from mindlora.config import LoRAConfig
from mindlora.lora import fused
from mindlora.lora.factors import merged_weight
from mindlora.parallel.layout import lora_factor_splits, shard, split_rule


class LoRAMixin:
    """State and helpers shared by both LoRA linears (A, B, scaling, dropout, merge)."""

    lora_config: LoRAConfig
    merged: bool

    def _add_lora(self, in_features: int, out_features: int, lora: LoRAConfig) -> None:
        self.lora_config = lora
        self.scaling = lora.scaling
        self.merged = False
        device = self.weight.device
        self.lora_A = torch.nn.Linear(in_features, lora.r, bias=False, device=device,
                                      dtype=torch.float32)
        self.lora_B = torch.nn.Linear(lora.r, out_features, bias=False, device=device,
                                      dtype=torch.float32)
        torch.nn.init.zeros_(self.lora_A.weight)
        torch.nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = torch.nn.Dropout(lora.dropout) if lora.dropout > 0 else None

    def _dropout(self, x: torch.Tensor, sharded_input: bool) -> torch.Tensor:
        """Dropout on the LoRA input; shard-local inputs draw from the per-TP-rank stream."""
        if self.lora_dropout is None or not self.training:
            return x
        if sharded_input:
            with get_cuda_rng_tracker().fork():
                return self.lora_dropout(x)
        return self.lora_dropout(x)

    def _use_fused_path(self, weight: Optional[torch.Tensor] = None) -> bool:
        """Use the fused path (lora/fused.py): not merged, base frozen, and either TP=1, where
        there is no collective to fold and the fused kernel (in-place accumulation, fast factor
        gradients) is simply the faster way to compute the same sum, or ``fold_collectives``
        (``--lora-fusion``, CCLoRA) under TP > 1."""
        weight = self.weight if weight is None else weight
        tp1 = self.tp_group is None or self.tp_group.size() == 1
        if getattr(self, "explicit_expert_comm", False) and not tp1:
            return False  # routed experts: the dispatcher owns communication (_expert_forward)
        fuse = self.lora_config.fold_collectives or tp1
        return fuse and not self.merged and not weight.requires_grad

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None) -> dict:
        """megatron-core's sharded state dict of the base layer, plus the LoRA factors with the
        TP axis ``mindlora.parallel.layout`` gives them: column base -> A replicated, B split on
        dim 0 (gate/up halves of a gated ``linear_fc1`` split separately, as megatron-core does
        for the base weight); row base -> A split on dim 1, B replicated.

        Args:
            prefix: this module's key prefix, e.g. ``decoder.layers.0.mlp.linear_fc1.``.
            sharded_offsets: offsets already applied by the parents (the layer axis).
            metadata: megatron-core's sharded-state-dict metadata (``dp_cp_group``, ...).
        """
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        factors = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        rules = lora_factor_splits(prefix, gated_fc1=self.config.gated_linear_unit)
        lora = make_sharded_tensors_for_checkpoint(
            factors, prefix, {k: r.dim for k, r in rules.items() if r.dim is not None},
            sharded_offsets, tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
        for k, rule in rules.items():
            if rule.parts > 1:
                if (rule.dim, rule.parts) != (0, 2):
                    raise ValueError(f"{prefix}{k}: no sharded-checkpoint factory for {rule}")
                lora[prefix + k] = apply_swiglu_sharded_factory(
                    lora[prefix + k], sharded_offsets,
                    (metadata or {}).get("singleton_local_shards", False))
        sharded.update(lora)
        return sharded

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``s * B @ A`` into this rank's base shard (mindlora.lora.factors, in float32)."""
        if not self.merged:
            self._fold(+1)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact up to the base dtype's rounding)."""
        if self.merged:
            self._fold(-1)
            self.merged = False

    def _fold(self, sign: int) -> None:
        self.weight.copy_(merged_weight(self.weight, self.lora_A.weight, self.lora_B.weight,
                                        self.scaling, sign=sign))


def _down(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``A x``: the factor is cast to the activation dtype."""
    return F.linear(x, a.to(x.dtype))


def _up(z: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``B z``, with B's gradient formed in the fast orientation (see lora/fused.py)."""
    return fused.from_rank(z, b.to(z.dtype))


class LoRAColumnParallelLinear(LoRAMixin, ColumnParallelLinear):
    """ColumnParallelLinear + LoRA (A replicated, B split on the output dim)."""

    def __init__(self, input_size: int, output_size: int, *, lora_config: LoRAConfig,
                 **kwargs) -> None:
        super().__init__(input_size, output_size, **kwargs)
        self._add_lora(input_size, self.output_size_per_partition, lora_config)

    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None,
                runtime_gather_output: Optional[bool] = None):
        if self._use_fused_path(weight):
            output, bias = fused.column_forward(self, input_, weight)
            return self._maybe_gather(output, runtime_gather_output), bias
        output, bias = super().forward(input_, weight, runtime_gather_output=False)
        if self.merged:
            return self._maybe_gather(output, runtime_gather_output), bias
        if getattr(self, "explicit_expert_comm", False):
            return self._expert_forward(input_, output, bias)
        a_weight = self.lora_A.weight
        if self.sequence_parallel:
            a_weight = copy_to_tensor_model_parallel_region(a_weight, group=self.tp_group)
        z = _down(self._dropout(input_, sharded_input=self.sequence_parallel), a_weight)
        if self.sequence_parallel:
            z = gather_from_sequence_parallel_region(z, group=self.tp_group)
        else:
            z = copy_to_tensor_model_parallel_region(z, group=self.tp_group)
        output = output + self.scaling * _up(z, self.lora_B.weight)
        return self._maybe_gather(output, runtime_gather_output), bias

    def _expert_forward(self, input_: torch.Tensor, output: torch.Tensor, bias):
        """A routed expert (megatron-core's ``explicit_expert_comm``): the token dispatcher does
        all communication, and each expert-TP rank returns a *partial* input gradient that the
        dispatcher sums. So ``z = A x`` must not be all-reduced (that would count the LoRA input
        gradient TP times); instead A's own gradient is summed over expert TP (identity-forward
        wrapper on A), because each rank saw only its rows of B."""
        a_weight = self.lora_A.weight
        if self.tp_group is not None and self.tp_group.size() > 1:
            a_weight = copy_to_tensor_model_parallel_region(a_weight, group=self.tp_group)
        z = _down(self._dropout(input_, sharded_input=False), a_weight)
        return output + self.scaling * _up(z, self.lora_B.weight), bias

    def _maybe_gather(self, output: torch.Tensor, runtime_gather_output: Optional[bool]):
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if not gather:
            return output
        from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

        return gather_from_tensor_model_parallel_region(output, group=self.tp_group)


class LoRARowParallelLinear(LoRAMixin, RowParallelLinear):
    """RowParallelLinear + LoRA (A split on the input dim, B replicated)."""

    def __init__(self, input_size: int, output_size: int, *, lora_config: LoRAConfig,
                 **kwargs) -> None:
        super().__init__(input_size, output_size, **kwargs)
        if not self.input_is_parallel:
            raise ValueError("LoRA row-parallel layers expect input_is_parallel=True")
        self._add_lora(self.input_size_per_partition, output_size, lora_config)

    def forward(self, input_: torch.Tensor):
        if self._use_fused_path():
            return fused.row_forward(self, input_)
        output_parallel = F.linear(input_, self.weight)
        if not self.merged:
            b_weight = copy_to_tensor_model_parallel_region(self.lora_B.weight, group=self.tp_group)
            z = _down(self._dropout(input_, sharded_input=True), self.lora_A.weight)
            output_parallel = output_parallel + self.scaling * _up(z, b_weight)
        if getattr(self, "explicit_expert_comm", False):
            output = output_parallel  # a routed expert: the dispatcher's combine reduces
        elif self.sequence_parallel:
            output = reduce_scatter_to_sequence_parallel_region(output_parallel,
                                                                group=self.tp_group)
        else:
            output = reduce_from_tensor_model_parallel_region(output_parallel, group=self.tp_group)
        if self.skip_bias_add:
            return output, self.bias
        return (output + self.bias if self.bias is not None else output), None


LORA_LAYER_TYPES = (LoRAColumnParallelLinear, LoRARowParallelLinear)
# Seeds the per-(layer, target) generator of init_lora_factors; part of what a seed reproduces.
_TARGET_IDS = {"linear_qkv": 0, "linear_proj": 1, "linear_fc1": 2, "linear_fc2": 3}


def init_lora_factors(layer: LoRAMixin, layer_number: int, target: str, tp_rank: int,
                      tp_size: int, expert: Optional[int] = None) -> None:
    """Initialise A from the FULL matrix drawn by a generator seeded per (layer, target), then
    keep this rank's slice; B = 0. The result is therefore independent of the TP size.
    ``expert``: the global expert number of a routed expert's linear (each expert its own A,
    independent of the expert-parallel size).
    """
    lora = layer.lora_config
    rule = split_rule(f"{target}.lora_A.weight")  # row base: A split on its input dim
    full_in = layer.lora_A.weight.shape[1] * (tp_size if rule.dim == 1 else 1)
    seed = lora.seed * 100003 + layer_number * 31 + _TARGET_IDS[target]
    if expert is not None:
        seed = seed * 1009 + 7 * (expert + 1)
    gen = torch.Generator().manual_seed(seed)
    if lora.init_a == "kaiming":
        bound = 1.0 / math.sqrt(full_in)  # kaiming_uniform_(a=sqrt(5)), as HF PEFT does
        # host-tensor: drawn from a seeded CPU generator, so A is the same on every device
        full = torch.empty(lora.r, full_in).uniform_(-bound, bound, generator=gen)
    else:
        # host-tensor: drawn from a seeded CPU generator, so A is the same on every device
        full = torch.empty(lora.r, full_in).normal_(0.0, 1.0 / lora.r, generator=gen)
    with torch.no_grad():
        layer.lora_A.weight.copy_(shard(full, rule, tp_size, tp_rank))
        layer.lora_B.weight.zero_()
