"""LoRA's communication cost, counted: what each LoRA layer adds to its base layer's collectives.

The claim that matters most: a row-parallel LoRA adds NO forward collective (its partial sum joins
the base's all-reduce / reduce-scatter). The whole table is the one in docs/lora.md. Counted at
TP=2 by wrapping the collective functions megatron-core's mappings and linears call.
"""
from __future__ import annotations

import contextlib
from collections import Counter

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel import layers as mcore_layers
from megatron.core.tensor_parallel import mappings

from mindlora.config import COLUMN_TARGETS, LoRAConfig, ParallelConfig
from mindlora.runtime import init_parallel
from tests.distributed.harness import spawn
from tests.lora.test_layers import SEQ_LEN, SHAPES, build_layer

# (target kind, sequence parallel) -> (extra forward, extra backward) collectives of LoRA.
EXTRA = {("column", False): ({}, {"all-reduce": 1}),                       # dz
         ("column", True): ({"all-gather": 1}, {"reduce-scatter": 1,       # z, dz
                                                "all-reduce": 1}),         # dA
         ("row", False): ({}, {"all-reduce": 1}),                          # dB
         ("row", True): ({}, {"all-reduce": 1})}                           # dB


@contextlib.contextmanager
def counting(counter: Counter):
    """Count all-reduce / all-gather / reduce-scatter calls made inside the block."""
    sites = [(torch.distributed, "all_reduce", "all-reduce"),
             (mappings, "dist_all_gather_func", "all-gather"),
             (mappings, "dist_reduce_scatter_func", "reduce-scatter"),
             (mcore_layers, "dist_all_gather_func", "all-gather"),
             (mcore_layers, "dist_reduce_scatter_func", "reduce-scatter")]
    saved = [(module, name, getattr(module, name)) for module, name, _ in sites]
    for (module, name, kind), (_, _, original) in zip(sites, saved):
        def wrapped(*args, _original=original, _kind=kind, **kwargs):
            counter[_kind] += 1
            return _original(*args, **kwargs)
        setattr(module, name, wrapped)
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def _plain(target: str, lora_layer):
    """The same base layer without LoRA (megatron-core's class, same arguments)."""
    out, inp, skip = SHAPES[target]
    common = dict(config=lora_layer.config, init_method=torch.nn.init.zeros_, bias=True,
                  skip_bias_add=skip)
    if target in COLUMN_TARGETS:
        return ColumnParallelLinear(inp, out, gather_output=False, **common)
    return RowParallelLinear(inp, out, input_is_parallel=True, **common)


def _count(layer, x: torch.Tensor) -> tuple[Counter, Counter]:
    """(forward, backward) collective counts of one step; the base is frozen as in a model."""
    for name, p in layer.named_parameters():
        p.requires_grad_("lora_" in name)
    fwd, bwd = Counter(), Counter()
    with counting(fwd):
        output, _ = layer(x)
    with counting(bwd):
        output.sum().backward()
    return fwd, bwd


def _body(rank: int, world: int) -> None:
    tp = world
    init_parallel(ParallelConfig(tensor_model_parallel_size=tp))
    lora = LoRAConfig(r=4, alpha=8.0)
    for sp in (False, True):
        for target, (out, inp, _) in SHAPES.items():
            kind = "column" if target in COLUMN_TARGETS else "row"
            seq = SEQ_LEN // tp if (sp and kind == "column") else SEQ_LEN
            width = inp if kind == "column" else inp // tp
            with_lora = build_layer(target, tp, sp, lora)
            counts = []
            for layer in (_plain(target, with_lora), with_lora):
                x = torch.randn(seq, 2, width, requires_grad=True)
                counts.append(_count(layer, x))
            (base_fwd, base_bwd), (lora_fwd, lora_bwd) = counts
            extra_fwd, extra_bwd = EXTRA[(kind, sp)]
            assert lora_fwd - base_fwd == Counter(extra_fwd) and not base_fwd - lora_fwd, (
                target, sp, base_fwd, lora_fwd)
            assert lora_bwd - base_bwd == Counter(extra_bwd) and not base_bwd - lora_bwd, (
                target, sp, base_bwd, lora_bwd)


def test_lora_adds_only_the_documented_collectives() -> None:
    spawn(_body, 2)
