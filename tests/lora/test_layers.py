"""Standalone LoRA linears under TP = 1, 2, 4 (with and without sequence parallel) vs plain PyTorch.

Every rank draws the same full W, bias, A and a NON-zero B, cuts its shard with the sharding table
(``split_rule`` + ``shard``, so the table is under test too: fc1's ``[gate; up]`` per-block split
included), runs forward + backward with a random upstream gradient, and all-gathers the output,
the input gradient and both LoRA gradients. They must equal
``y = x W^T + b + s * (x A^T) B^T`` and its autograd gradients computed from the full tensors.
"""
from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from megatron.core import parallel_state

from mindlora.config import COLUMN_TARGETS, LoRAConfig, ModelConfig, ParallelConfig
from mindlora.lora.layers import LoRAColumnParallelLinear, LoRARowParallelLinear
from mindlora.models.builder import transformer_config
from mindlora.parallel.layout import REPLICATED, Split, shard, split_rule
from mindlora.runtime import init_parallel
from tests.distributed.harness import spawn
from tests.lora.checks import SEQ, assert_matches, compare_all, gather_tp

SEQ_LEN, BATCH, RANK = 8, 2, 4
MODEL = ModelConfig(family="llama", num_layers=1, hidden_size=32, ffn_hidden_size=48,
                    num_attention_heads=8, num_query_groups=4, vocab_size=64)
# target -> (out, in, skip_bias_add) of the full weight; skip_bias_add as megatron's spec uses it.
SHAPES = {"linear_qkv": (64, 32, False),   # (8 q heads + 2 * 4 groups) * kv_channels 4
          "linear_proj": (32, 32, True),
          "linear_fc1": (96, 32, True),    # [gate; up], ffn 48 each
          "linear_fc2": (32, 48, False)}


def _scaling(lora: LoRAConfig) -> float:
    """LoRA scale computed here, not read from the layer: alpha/r, or alpha/sqrt(r) (rsLoRA)."""
    return lora.alpha / (math.sqrt(lora.r) if lora.use_rslora else lora.r)


def _full_tensors(target: str, seed: int) -> dict[str, torch.Tensor]:
    out, inp, _ = SHAPES[target]
    g = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(out, inp, generator=g) / math.sqrt(inp),
            "bias": torch.randn(out, generator=g) * 0.1,
            "lora_A.weight": torch.randn(RANK, inp, generator=g) / math.sqrt(inp),
            "lora_B.weight": torch.randn(out, RANK, generator=g) * 0.5,
            "x": torch.randn(SEQ_LEN, BATCH, inp, generator=g),
            "grad_out": torch.randn(SEQ_LEN, BATCH, out, generator=g)}


def build_layer(target: str, tp: int, sp: bool, lora: LoRAConfig,
                gather_output: bool = False):
    """A standalone LoRA linear for ``target`` (full shape in SHAPES) under TP=tp, SP=sp."""
    out, inp, skip = SHAPES[target]
    config = transformer_config(MODEL, ParallelConfig(tensor_model_parallel_size=tp,
                                                      sequence_parallel=sp))
    common = dict(lora_config=lora, config=config, init_method=torch.nn.init.zeros_, bias=True,
                  skip_bias_add=skip)
    if target in COLUMN_TARGETS:
        return LoRAColumnParallelLinear(inp, out, gather_output=gather_output, **common)
    return LoRARowParallelLinear(inp, out, input_is_parallel=True, **common)


def layer_parity(target: str, tp: int, rank: int, sp: bool, lora: LoRAConfig, seed: int = 0,
                 gather_output: bool = False, rules: Optional[dict[str, Split]] = None):
    """Run one sharded LoRA linear and its reference; return ``(what, actual, expected)`` triples.

    Args:
        rules: override the sharding table for some of ``weight``/``bias``/``lora_A.weight``/
            ``lora_B.weight`` (how the "can fail" test feeds a wrong layout).
    """
    group = parallel_state.get_tensor_model_parallel_group()
    full = _full_tensors(target, seed)
    layer = build_layer(target, tp, sp, lora, gather_output)
    table = {k: split_rule(f"{target}.{k}") for k in ("weight", "bias", "lora_A.weight",
                                                        "lora_B.weight")}
    table.update(rules or {})
    with torch.no_grad():
        for key, rule in table.items():
            layer.get_parameter(key).copy_(shard(full[key], rule, tp, rank))
    layer.weight.requires_grad_(False)  # frozen base, as build_model leaves it
    layer.bias.requires_grad_(False)

    column = target in COLUMN_TARGETS
    w_rule = split_rule(f"{target}.weight")
    if column:  # output split like W's rows; input full (or sequence-sharded under SP)
        out_rule = REPLICATED if gather_output else Split(-1, w_rule.parts)
        in_rule = SEQ if sp else REPLICATED
    else:       # input split like W's columns; output full (or sequence-sharded under SP)
        out_rule, in_rule = (SEQ if sp else REPLICATED), Split(-1)
    x = shard(full["x"], in_rule, tp, rank).requires_grad_(True)
    output, bias = layer(x)
    (output * shard(full["grad_out"], out_rule, tp, rank)).sum().backward()

    # Reference from the full tensors.
    xr = full["x"].clone().requires_grad_(True)
    a = full["lora_A.weight"].clone().requires_grad_(True)
    b = full["lora_B.weight"].clone().requires_grad_(True)
    _, _, skip = SHAPES[target]
    ref = xr @ full["weight"].T + _scaling(lora) * (xr @ a.T) @ b.T
    if not skip:
        ref = ref + full["bias"]
    (ref * full["grad_out"]).sum().backward()

    assert layer.weight.grad is None and layer.bias.grad is None, "base received a gradient"
    pairs = [(f"{target} output", gather_tp(output, out_rule, group), ref.detach()),
             (f"{target} input grad", gather_tp(x.grad, in_rule, group), xr.grad),
             (f"{target} lora_A grad", gather_tp(layer.lora_A.weight.grad,
                                                 table["lora_A.weight"], group), a.grad),
             (f"{target} lora_B grad", gather_tp(layer.lora_B.weight.grad,
                                                 table["lora_B.weight"], group), b.grad)]
    if skip:
        pairs.append((f"{target} returned bias", gather_tp(bias, table["bias"], group),
                      full["bias"]))
    else:
        assert bias is None
    return pairs


def _all_layers(rank: int, world: int) -> None:
    tp = world
    init_parallel(ParallelConfig(tensor_model_parallel_size=tp))
    plain = LoRAConfig(r=RANK, alpha=8.0)
    rs = LoRAConfig(r=RANK, alpha=8.0, use_rslora=True)
    for sp in ((False, True) if tp > 1 else (False,)):
        for i, target in enumerate(SHAPES):
            compare_all(layer_parity(target, tp, rank, sp, plain, seed=i))
            compare_all(layer_parity(target, tp, rank, sp, rs, seed=10 + i))
    compare_all(layer_parity("linear_qkv", tp, rank, False, plain, seed=20, gather_output=True))
    if tp > 1:
        _check_can_fail(tp, rank, plain)
        _check_dropout_streams(tp, rank)
    else:
        with pytest.raises(ValueError, match="input_is_parallel"):
            LoRARowParallelLinear(32, 32, lora_config=plain, config=transformer_config(
                MODEL, ParallelConfig()), init_method=torch.nn.init.zeros_, bias=False,
                input_is_parallel=False, skip_bias_add=False)


def _check_can_fail(tp: int, rank: int, lora: LoRAConfig) -> None:
    """The comparison has teeth: B of fused fc1 cut as one block instead of [gate; up] must fail."""
    wrong = {"lora_B.weight": Split(0)}  # splits [gate; up] as one block: rank 0 gets gate only
    with pytest.raises(AssertionError, match="linear_fc1 output"):
        compare_all(layer_parity("linear_fc1", tp, rank, False, lora, rules=wrong))


def _check_dropout_streams(tp: int, rank: int) -> None:
    """LoRA dropout on a replicated column input must draw the same mask on every TP rank (else
    the replicated ``z = A x`` would silently differ), and eval mode must switch it off.

    With W = 0, bias = 0 and every rank's B shard = [I_r; 0], output[..., :r] is exactly ``s * z``.
    """
    group = parallel_state.get_tensor_model_parallel_group()
    lora = LoRAConfig(r=RANK, alpha=8.0, dropout=0.5)
    layer = build_layer("linear_qkv", tp, False, lora)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
        torch.nn.init.normal_(layer.lora_A.weight, generator=torch.Generator().manual_seed(0))
        layer.lora_B.weight.zero_()
        layer.lora_B.weight[:RANK] = torch.eye(RANK)
        x = torch.ones(SEQ_LEN, BATCH, 32)
        no_dropout = _scaling(lora) * F.linear(x, layer.lora_A.weight)
        layer.train()
        z_train = layer(x)[0][..., :RANK]
        gather_tp(z_train, REPLICATED, group)  # asserts bit-identical across TP ranks
        assert not torch.allclose(z_train, no_dropout), "dropout was not applied"
        layer.eval()
        assert_matches(layer(x)[0][..., :RANK], no_dropout, "eval-mode LoRA (no dropout)")


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_lora_linears_match_reference(tp: int) -> None:
    """All four targets (plain and rsLoRA scaling), SP on/off, plus the can-fail check."""
    spawn(_all_layers, tp)
