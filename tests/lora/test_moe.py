"""LoRA on every routed expert of a mixture-of-experts GPTModel vs plain PyTorch.

Each expert's ``linear_fc1`` / ``linear_fc2`` carries its own A and B (sharded with the expert:
expert parallelism picks the expert, TP splits it like the dense MLP); the router is frozen. One
seeded FULL state dict (non-zero lora_B for every expert) is cut per rank and loaded; the
reference below runs the same weights unsharded with explicit top-k routing. Compared: logits,
the decoder-input gradient and every LoRA gradient (experts mapped back to their global number),
at TP1, EP2, TP2+SP on 2 gloo ranks and TP2 x EP2 + SP, EP4 on 4. The load-balancing loss is
off here (coefficient 0) so the reference is the plain model; tokens are never dropped.

TP > 1 without SP is not a training layout for MoE: megatron-core raises in training mode, and
rightly so: its allgather dispatcher then gathers the TP ranks' identical token copies, so every
expert weight (and expert LoRA) gradient would be counted TP times (docs/moe.md).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps

from mindlora.config import LoRAConfig, ModelConfig, ParallelConfig
from mindlora.models.builder import build_model
from mindlora.parallel.layout import pad_vocab
from mindlora.parallel.layout import (REPLICATED, Split, expert_global_key, expert_owner, shard,
                                      split_rule)
from mindlora.runtime import init_parallel
from tests.distributed.harness import spawn
from tests.lora import reference
from tests.lora.checks import RTOL, SEQ, gather_tp

SEQ_LEN, BATCH, EXPERTS = 8, 2, 4


def _model(pre_softmax: bool) -> ModelConfig:
    return ModelConfig(family="qwen3-moe", num_layers=2, hidden_size=32, ffn_hidden_size=48,
                       num_attention_heads=4, num_query_groups=2, vocab_size=64,
                       qk_layernorm=True, num_moe_experts=EXPERTS, moe_ffn_hidden_size=16,
                       moe_router_topk=2, moe_router_pre_softmax=pre_softmax)


VARIANTS = {
    "all-linear, renormalised top-2": (_model(False), LoRAConfig(
        r=4, alpha=8.0, target_modules=("all-linear",))),
    "experts only, softmax before top-2, rsLoRA": (_model(True), LoRAConfig(
        r=2, alpha=4.0, target_modules=("linear_fc1", "linear_fc2"), use_rslora=True)),
}


def make_state_dict(cfg: ModelConfig, lora: LoRAConfig, vocab: int, seed: int) -> dict:
    """The dense reference state dict with its MLP replaced by a router and per-expert MLPs."""
    dense = ModelConfig(**{**cfg.to_dict(), "num_moe_experts": None,
                           "ffn_hidden_size": cfg.moe_ffn_hidden_size})
    sd = reference.make_state_dict(dense, lora, vocab, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    h, f, r = cfg.hidden_size, cfg.moe_ffn_hidden_size, lora.r
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}.mlp."
        for k in [k for k in sd if k.startswith(p)]:
            del sd[k]
        # Large router weights: top-2 margins far above float32 rounding of the two paths.
        sd[p + "router.weight"] = torch.randn(EXPERTS, h, generator=gen) * 2 / math.sqrt(h)
        for e in range(EXPERTS):
            for t, (out, inp) in (("linear_fc1", (2 * f, h)), ("linear_fc2", (h, f))):
                key = f"{p}experts.local_experts.{e}.{t}."
                sd[key + "weight"] = torch.randn(out, inp, generator=gen) / math.sqrt(inp)
                if t in lora.target_modules:
                    sd[key + "lora_A.weight"] = torch.randn(r, inp, generator=gen) / math.sqrt(inp)
                    sd[key + "lora_B.weight"] = (torch.randn(out, r, generator=gen) * 0.5
                                                 / math.sqrt(r))
    return sd


def moe_mlp(x: torch.Tensor, sd: dict, p: str, cfg: ModelConfig, scaling: float) -> torch.Tensor:
    """Top-k routing written out: weights, then a weighted sum of each chosen expert's SwiGLU."""
    flat = x.reshape(-1, x.shape[-1])
    logits = F.linear(flat, sd[p + "mlp.router.weight"])
    k = cfg.moe_router_topk
    if cfg.moe_router_pre_softmax:
        weights, idx = logits.softmax(-1).topk(k, dim=-1)
    else:
        top, idx = logits.topk(k, dim=-1)
        weights = top.softmax(-1)
    out = torch.zeros_like(flat)
    for e in range(cfg.num_moe_experts):
        rows, slot = (idx == e).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        q = f"{p}mlp.experts.local_experts.{e}."
        gate, up = reference.lora_linear(flat[rows], sd, q + "linear_fc1.", scaling).chunk(2, -1)
        y = reference.lora_linear(F.silu(gate) * up, sd, q + "linear_fc2.", scaling)
        out = out.index_add(0, rows, y * weights[rows, slot, None])
    return out.view_as(x)


def decoder_logits(sd: dict, cfg: ModelConfig, scaling: float, hidden: torch.Tensor):
    x = hidden.transpose(0, 1)
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        x = x + reference.attention(reference.rms_norm(x, sd[p + "input_layernorm.weight"],
                                                       cfg.norm_epsilon), sd, p, cfg, scaling)
        x = x + moe_mlp(reference.rms_norm(x, sd[p + "pre_mlp_layernorm.weight"],
                                           cfg.norm_epsilon), sd, p, cfg, scaling)
    x = reference.rms_norm(x, sd["decoder.final_layernorm.weight"], cfg.norm_epsilon)
    return F.linear(x, sd["output_layer.weight"])


_EP_REPLICAS = """The EP ranks of a group are data-parallel replicas for attention, and every rank
here is fed the same batch. An expert sees the tokens of its whole EP group, so its gradient is
the sum of EP identical contributions: EP x the single-replica reference. (Megatron's DDP scales
expert and dense gradients alike by 1/DP, after reducing expert gradients over the expert-DP
group only.)"""


class _Float:
    """A float64 reference leaf seen as float32 (value and gradient) for the comparison."""

    def __init__(self, t: torch.Tensor) -> None:
        self.data = t.detach().float()
        self.grad = None if t.grad is None else t.grad.float()


def _local_state(full: dict, tp: int, tp_rank: int, ep: int, ep_rank: int) -> dict:
    out = {}
    for key, value in full.items():
        owner, local = expert_owner(key, EXPERTS, ep)
        if owner in (-1, ep_rank):
            out[local] = shard(value, split_rule(local), tp, tp_rank)
    return out


def model_parity(name: str, tp: int, ep: int, sp: bool, seed: int, perturb: bool = False):
    mc, lc = VARIANTS[name]
    pc = ParallelConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                        sequence_parallel=sp)
    init_parallel(pc)
    tp_rank, ep_rank = ps.get_tensor_model_parallel_rank(), ps.get_expert_model_parallel_rank()
    group, etp_group = ps.get_tensor_model_parallel_group(), ps.get_expert_tensor_parallel_group()
    model = build_model(mc, pc, lc)[0]
    vocab = pad_vocab(mc.vocab_size, tp)
    full = make_state_dict(mc, lc, vocab, seed)
    missing, unexpected = model.load_state_dict(_local_state(full, tp, tp_rank, ep, ep_rank),
                                                strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing,
                                                                                unexpected)
    if perturb and ep_rank == ep - 1:
        with torch.no_grad():
            model.decoder.layers[1].mlp.experts.local_experts[0].linear_fc2.lora_A.weight[0, 0] \
                += 1e-3
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, mc.vocab_size, (BATCH, SEQ_LEN), generator=gen)
    pos = torch.arange(SEQ_LEN).expand(BATCH, -1)
    grad_logits = torch.randn(BATCH, SEQ_LEN, vocab, generator=gen)
    embedded = []

    def make_leaf(module, args, output):
        embedded.append(output.detach().requires_grad_(True))
        return embedded[-1]

    hook = model.embedding.register_forward_hook(make_leaf)
    logits = model(ids, pos, attention_mask=None)
    hook.remove()
    (logits * shard(grad_logits, Split(-1), tp, tp_rank)).sum().backward()

    # The reference runs in float64: routing sums many expert outputs in another order than
    # megatron-core's unpermute, so a float32 reference would add its own rounding to the check.
    sd = {k: v.double().requires_grad_("lora_" in k) for k, v in full.items()}
    hidden = reference.embed(sd, ids).detach().requires_grad_(True)
    ref_logits = decoder_logits(sd, mc, lc.scaling, hidden)
    (ref_logits * grad_logits.double()).sum().backward()
    sd = {k: _Float(v) for k, v in sd.items()}
    hidden, ref_logits = _Float(hidden), ref_logits.detach().float()

    act = SEQ if sp else REPLICATED
    label = f"{name} TP{tp} EP{ep}{' SP' if sp else ''}"
    pairs = [(f"{label}: logits", gather_tp(logits, Split(-1), group), ref_logits),
             (f"{label}: decoder input grad", gather_tp(embedded[0].grad, act, group),
              hidden.grad)]
    n_local = EXPERTS // ep
    for key, param in model.named_parameters():
        if "lora_" not in key:
            assert not param.requires_grad, f"base {key} is trainable"
            continue
        assert param.grad is not None, f"{key} got no gradient"
        g = expert_global_key(key, ep_rank, n_local)
        if ".local_experts." not in key:
            pairs.append((f"{label}: {g} grad", gather_tp(param.grad, split_rule(key), group),
                          sd[g].grad))
        else:  # see _EP_REPLICAS
            pairs.append((f"{label}: {g} grad", gather_tp(param.grad, split_rule(key), etp_group),
                          sd[g].grad * ep))
    experts = sum(".local_experts." in p[0] for p in pairs)
    assert experts == mc.num_layers * n_local * sum(
        t in lc.target_modules for t in ("linear_fc1", "linear_fc2")) * 2
    return pairs


def compare_all(pairs) -> None:
    """rtol 1e-5 as the dense tests; atol 1e-5 of the tensor's scale (dense: 1e-6) because an
    expert's gradient sums tokens of the whole EP group in the dispatcher's order, and an entry
    that cancels to ~0 keeps float32 noise of the terms summed (seen: 2.3e-6 at scale 1.4)."""
    for what, actual, expected in pairs:
        assert actual.shape == expected.shape, f"{what}: {actual.shape} != {expected.shape}"
        atol = 1e-5 * max(1.0, expected.abs().max().item())
        torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol,
                                   msg=lambda m, w=what: f"{w}: {m}")


def _body(rank: int, world: int, layouts: list) -> None:
    for tp, ep, sp in layouts:
        for i, name in enumerate(VARIANTS):
            compare_all(model_parity(name, tp, ep, sp, seed=i))
    tp, ep, sp = layouts[-1]
    with pytest.raises(AssertionError, match="logits"):
        compare_all(model_parity(list(VARIANTS)[1], tp, ep, sp, seed=1, perturb=True))


def test_expert_lora_matches_reference_on_2_ranks() -> None:
    spawn(_body, 2, [(1, 1, False), (2, 1, True), (1, 2, False)])


def test_expert_lora_matches_reference_on_4_ranks() -> None:
    spawn(_body, 4, [(2, 2, True), (1, 4, False)])


def test_expert_regex_targets_and_router_refusal() -> None:
    """The regex form matches every expert's fc1/fc2; a regex selecting some experts only, and
    any request for LoRA on the router (name or regex), are refused by name."""
    assert LoRAConfig(target_modules=(r".*experts\.local_experts\.\d+\.linear_fc1",)
                      ).target_modules == ("linear_fc1",)
    assert LoRAConfig(target_modules=(".*linear_qkv|.*experts.*linear_fc2",)).target_modules == (
        "linear_qkv", "linear_fc2")
    with pytest.raises(ValueError, match=r"selects \['linear_fc1'\] in some experts only"):
        LoRAConfig(target_modules=(r".*local_experts\.[0-3]\.linear_fc1",))
    for spec in ("router", r".*(linear_qkv|router)", r"decoder\.layers\.\d+\.mlp\.router"):
        with pytest.raises(ValueError, match=r"LoRA on the MoE router .* is not implemented"):
            LoRAConfig(target_modules=(spec,))
