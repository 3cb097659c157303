"""CCLoRA (``--lora-fusion``, ``mindlora/lora/fused.py``) against the unfused layers it replaces.

* Layers, TP = 1, 2, 4, SP on/off, all four targets (GQA qkv, gated ``[gate; up]`` fc1, with and
  without ``skip_bias_add``): output, input gradient and both LoRA gradients of the fused layer
  equal the plain reference ``x W^T + b + s (x A^T) B^T`` (``test_layers.layer_parity``) AND the
  unfused layer, to 1e-5 relative in float32 with a non-zero B. Under LoRA dropout (training),
  fused and unfused draw the same masks and must agree too.
* A whole GPTModel (all-linear LoRA) with fusion on equals the reference and fusion off at TP=2,
  SP on/off.
* Collectives at TP=2: fused layers add fewer collectives over megatron-core's plain layer than
  unfused ones (exact numbers in FUSED_EXTRA vs ``test_collectives.EXTRA``); none at TP=1.
* The comparisons can fail: a wrongly cut B, a fused backward that drops LoRA's input-gradient
  term, and a 1e-3 nudge to one shard of a fused model must each be caught.

Every check asserts that the fused functions really ran, so "fused == unfused" cannot pass by
both taking the unfused path.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import replace
from unittest import mock

import pytest
import torch
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from mindlora.config import COLUMN_TARGETS, LoRAConfig, ParallelConfig
from mindlora.lora import fused
from mindlora.parallel.layout import REPLICATED, Split, shard, split_rule
from mindlora.runtime import init_parallel
from tests.distributed.harness import spawn
from tests.lora import test_model
from tests.lora.checks import SEQ, compare_all
from tests.lora.test_collectives import EXTRA, _plain, counting
from tests.lora.test_layers import RANK, SHAPES, _full_tensors, build_layer, layer_parity

PLAIN = LoRAConfig(r=RANK, alpha=8.0)
FUSED = replace(PLAIN, fold_collectives=True)
# (target kind, sequence parallel) -> (extra forward, extra backward) collectives of a FUSED LoRA
# layer over megatron-core's plain layer. Unfused (test_collectives.EXTRA): column +1 / +3
# (no SP / SP), row +1. The only one left is A's [r, in] gradient all-reduce under SP.
FUSED_EXTRA = {("column", False): ({}, {}),
               ("column", True): ({}, {"all-reduce": 1}),
               ("row", False): ({}, {}),
               ("row", True): ({}, {})}


@contextlib.contextmanager
def fused_calls():
    """Count the layers' calls into ``fused.column_forward`` / ``fused.row_forward``."""
    calls = Counter()
    originals = {name: getattr(fused, name) for name in ("column_forward", "row_forward")}

    def wrap(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)
        return call

    with mock.patch.multiple(fused, **{name: wrap(name) for name in originals}):
        yield calls


def _versus_unfused(fused_pairs, unfused_pairs, label: str):
    """``(what, fused actual, unfused actual)`` triples from two ``layer/model_parity`` runs."""
    return [(f"{what} [{label}: fused vs unfused]", f, u)
            for (what, f, _), (_, u, _) in zip(fused_pairs, unfused_pairs, strict=True)]


def _layers(rank: int, world: int) -> None:
    tp = world
    init_parallel(ParallelConfig(tensor_model_parallel_size=tp))
    for sp in ((False, True) if tp > 1 else (False,)):
        for i, target in enumerate(SHAPES):
            with fused_calls() as calls:
                fused_pairs = layer_parity(target, tp, rank, sp, FUSED, seed=i)
            assert sum(calls.values()) == 1, f"{target}: the fused path did not run"
            compare_all(fused_pairs)  # vs the plain reference
            compare_all(_versus_unfused(fused_pairs, layer_parity(target, tp, rank, sp, PLAIN,
                                                                  seed=i), f"sp={sp}"))
            _dropout_parity(target, tp, rank, sp)
    fused_pairs = layer_parity("linear_qkv", tp, rank, False, FUSED, seed=20, gather_output=True)
    compare_all(fused_pairs)
    if tp == 1:
        layer = build_layer("linear_fc1", 1, False, FUSED)
        layer.weight.requires_grad_(False)
        assert sum(_count(layer, torch.randn(8, 2, 32)), Counter()) == Counter(), "TP=1 collective"
    else:
        _check_can_fail(tp, rank)


def _io_rules(target: str, sp: bool) -> tuple[Split, Split]:
    """(input, output) split of a layer's activations, as ``layer_parity`` cuts them."""
    if target in COLUMN_TARGETS:
        return (SEQ if sp else REPLICATED), Split(-1, split_rule(f"{target}.weight").parts)
    return Split(-1), (SEQ if sp else REPLICATED)


def _dropout_parity(target: str, tp: int, rank: int, sp: bool) -> None:
    """With LoRA dropout in training, fused and unfused draw the same masks (same streams, same
    input), so output and gradients still agree; the mask must really have been applied."""
    lora = replace(PLAIN, dropout=0.3)
    full = _full_tensors(target, seed=30)
    in_rule, out_rule = _io_rules(target, sp)
    x, grad_out = shard(full["x"], in_rule, tp, rank), shard(full["grad_out"], out_rule, tp, rank)
    tracker = get_cuda_rng_tracker()
    rng, states = torch.get_rng_state(), tracker.get_states()
    results = []
    for cfg in (lora, replace(lora, fold_collectives=True)):
        layer = build_layer(target, tp, sp, cfg)
        with torch.no_grad():
            for key in ("weight", "bias", "lora_A.weight", "lora_B.weight"):
                layer.get_parameter(key).copy_(shard(full[key], split_rule(f"{target}.{key}"),
                                                     tp, rank))
        layer.weight.requires_grad_(False)
        layer.bias.requires_grad_(False)
        torch.set_rng_state(rng)
        tracker.set_states(dict(states))
        xi = x.clone().requires_grad_(True)
        output = layer(xi)[0]
        (output * grad_out).sum().backward()
        results.append((output.detach(), xi.grad, layer.lora_A.weight.grad,
                        layer.lora_B.weight.grad))
    layer.eval()
    assert not torch.allclose(layer(x)[0], results[1][0]), f"{target}: dropout not applied"
    names = ("output", "input grad", "lora_A grad", "lora_B grad")
    compare_all([(f"{target} sp={sp} dropout {n} [fused vs unfused]", f, u)
                 for n, f, u in zip(names, results[1], results[0], strict=True)])


def _check_can_fail(tp: int, rank: int) -> None:
    """The comparisons have teeth, for outputs and for the folded input gradient alike."""
    wrong = {"lora_B.weight": Split(0)}  # fc1's [gate; up] B cut as one block
    pairs = layer_parity("linear_fc1", tp, rank, False, FUSED, rules=wrong)
    unfused = layer_parity("linear_fc1", tp, rank, False, PLAIN)
    with pytest.raises(AssertionError, match="linear_fc1 output"):
        compare_all(pairs)
    with pytest.raises(AssertionError, match="linear_fc1 output"):
        compare_all(_versus_unfused(pairs, unfused, "wrong B"))
    # A fused backward that drops LoRA's ``dz A`` from the input gradient must be caught.
    with mock.patch.object(fused, "_input_grads", lambda dx, dz, a, shared: (dx, None)):
        for sp in (False, True):
            with pytest.raises(AssertionError, match="linear_qkv input grad"):
                compare_all(layer_parity("linear_qkv", tp, rank, sp, FUSED))


@contextlib.contextmanager
def counting_all(counter: Counter):
    """``test_collectives.counting`` plus the torch.distributed names fused.py calls."""
    names = {"all_gather_single": "all-gather", "all_gather_into_tensor": "all-gather",
             "reduce_scatter_single": "reduce-scatter", "reduce_scatter_tensor": "reduce-scatter"}
    patches = {}
    for name, kind in names.items():
        original = getattr(torch.distributed, name, None)
        if original is not None:
            def wrapped(*args, _original=original, _kind=kind, **kwargs):
                counter[_kind] += 1
                return _original(*args, **kwargs)
            patches[name] = wrapped
    with counting(counter), mock.patch.multiple(torch.distributed, **patches):
        yield


def _count(layer, x: torch.Tensor) -> tuple[Counter, Counter]:
    """(forward, backward) collective counts of one step; only LoRA factors are trainable."""
    for name, p in layer.named_parameters():
        p.requires_grad_("lora_" in name)
    fwd, bwd = Counter(), Counter()
    with counting_all(fwd):
        output, _ = layer(x.requires_grad_(True))
    with counting_all(bwd):
        output.sum().backward()
    return fwd, bwd


def _extra(lora: Counter, base: Counter) -> dict[str, int]:
    return {k: lora[k] - base[k] for k in lora | base if lora[k] != base[k]}


def _collectives(rank: int, world: int) -> None:
    tp = world
    init_parallel(ParallelConfig(tensor_model_parallel_size=tp))
    for sp in (False, True):
        for target, (_, inp, _) in SHAPES.items():
            kind = "column" if target in COLUMN_TARGETS else "row"
            seq = 8 // tp if (sp and kind == "column") else 8
            x = torch.randn(seq, 2, inp if kind == "column" else inp // tp)
            unfused = build_layer(target, tp, sp, PLAIN)
            with fused_calls() as calls:
                fused_counts = _count(build_layer(target, tp, sp, FUSED), x.clone())
            assert sum(calls.values()) == 1
            base = _count(_plain(target, unfused), x.clone())
            unfused_counts = _count(unfused, x.clone())
            for counts, expected, label in ((unfused_counts, EXTRA, "unfused"),
                                            (fused_counts, FUSED_EXTRA, "fused")):
                got = tuple(_extra(c, b) for c, b in zip(counts, base))
                assert got == expected[(kind, sp)], (label, target, sp, got)
            total = [sum(sum(c.values()) for c in counts) for counts in (fused_counts,
                                                                          unfused_counts)]
            assert total[0] < total[1], (target, sp, total)


def _model(rank: int, world: int) -> None:
    tp = world
    init_parallel(ParallelConfig(tensor_model_parallel_size=tp))
    with_fusion = {f"{name} +fusion": (mc, replace(lc, fold_collectives=True))
                   for name, (mc, lc) in test_model.VARIANTS.items()}
    name = "all-linear, GQA, qk-norm, qkv-bias"
    with mock.patch.dict(test_model.VARIANTS, with_fusion):
        for sp in (False, True):
            with fused_calls() as calls:
                fused_pairs = test_model.model_parity(f"{name} +fusion", tp, rank, sp)
            assert calls == {"column_forward": 4, "row_forward": 4}, calls  # 2 layers x 4
            compare_all(fused_pairs)
            compare_all(_versus_unfused(fused_pairs, test_model.model_parity(name, tp, rank, sp),
                                        f"sp={sp}"))
        with pytest.raises(AssertionError, match="logits"):
            compare_all(test_model.model_parity("linear_fc2, GQA, rsLoRA +fusion", tp, rank, True,
                                                perturb=True))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fused_layers_match_unfused_and_reference(tp: int) -> None:
    """All four targets, SP on/off, LoRA dropout on, and the can-fail checks (TP > 1)."""
    spawn(_layers, tp)


def test_fused_layers_add_fewer_collectives() -> None:
    spawn(_collectives, 2)


def test_fused_gpt_model_matches_unfused() -> None:
    spawn(_model, 2)
