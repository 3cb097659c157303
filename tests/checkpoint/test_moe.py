"""Mixture-of-experts conversion: Qwen3-MoE and Mixtral, HF <-> Megatron with expert parallelism.

Tiny random models (4 layers, GQA 4/2 heads, top-2 routing; Qwen3-MoE with 8 experts and
``norm_topk_prob`` on, a second Qwen3-MoE with it off, Mixtral with 4 experts). Proofs:

- bit-exact HF round trips through TP1, TP2 x PP2 x EP2 and EP4 checkpoints;
- mindlora's GPTModel on the converted checkpoints reproduces HF logits to 1e-4 at TP1, EP2,
  PP2, TP2 x EP2 (with and without sequence parallelism) and PP2 x EP2, and a TP2 x EP2
  checkpoint loaded at TP1 (one spawned group of 2 gloo ranks, one of 4);
- bad layouts are refused by name.

Router weights are drawn large (std 0.5) so that a token's top-2 experts are decided by margins
far above float32 rounding: the two implementations sum in different orders (~1e-6), which must
not flip a routing decision on a near tie.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from mindlora.checkpoint import describe
from mindlora.checkpoint import megatron_format as fmt
from mindlora.checkpoint.hf_format import HFSource
from mindlora.checkpoint.loading import load_model_shard
from mindlora.config import ModelConfig, ParallelConfig
from tests.checkpoint.conftest import (assert_same_tensors, hf_logits, load_hf_tensors,
                                       run_convert)
from tests.distributed.harness import spawn

ATOL = 1e-4
IDS = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(5))
MOE_SPECS = {
    "qwen3_moe": ("qwen3-moe", dict(num_experts=8, norm_topk_prob=True)),
    "qwen3_moe_nonorm": ("qwen3-moe", dict(num_experts=4, norm_topk_prob=False)),
    "mixtral": ("mixtral", dict(num_local_experts=4)),
}


def build_moe_model(path: str, name: str, seed: int = 0) -> str:
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

    family, extra = MOE_SPECS[name]
    common = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                  num_experts_per_tok=2, tie_word_embeddings=False)
    if family == "mixtral":
        config = MixtralConfig(intermediate_size=32, **common, **extra)
    else:
        config = Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=32, head_dim=32,
                                **common, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if n.endswith("gate.weight") else 0.02))
    model.save_pretrained(path, max_shard_size="200KB")
    return path


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("moe_hf")
    return {name: build_moe_model(str(root / name), name) for name in MOE_SPECS}


def test_hf_files_use_per_expert_keys(moe_models):
    """transformers 5 fuses experts in memory but saves (and we read) one tensor per expert."""
    keys = load_hf_tensors(moe_models["qwen3_moe"])
    assert "model.layers.0.mlp.experts.7.gate_proj.weight" in keys
    assert "model.layers.0.mlp.gate.weight" in keys
    assert "model.layers.0.block_sparse_moe.experts.3.w3.weight" in load_hf_tensors(
        moe_models["mixtral"])


def test_router_settings_from_config(moe_models):
    cfg = HFSource(moe_models["qwen3_moe"], "qwen3-moe").model_config
    assert (cfg.num_moe_experts, cfg.moe_ffn_hidden_size, cfg.moe_router_topk,
            cfg.moe_router_pre_softmax, cfg.moe_aux_loss_coeff) == (8, 32, 2, False, 0.001)
    assert HFSource(moe_models["qwen3_moe_nonorm"], "qwen3-moe").model_config \
        .moe_router_pre_softmax
    mix = HFSource(moe_models["mixtral"], "mixtral").model_config
    assert (mix.num_moe_experts, mix.moe_ffn_hidden_size, mix.moe_router_pre_softmax) == \
        (4, 32, False)


@pytest.mark.parametrize("name,tp,pp,ep", [("qwen3_moe", 1, 1, 1), ("qwen3_moe", 2, 2, 2),
                                           ("qwen3_moe", 1, 1, 4), ("mixtral", 2, 1, 2)])
def test_hf_round_trip_is_bit_exact(moe_models, tmp_path, name, tp, pp, ep):
    src, family = moe_models[name], MOE_SPECS[name][0]
    mg, back = str(tmp_path / "mg"), str(tmp_path / "back")
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=src, save_dir=mg,
                model_type_hf=family, target_tensor_parallel_size=tp,
                target_pipeline_parallel_size=pp, target_expert_parallel_size=ep)
    meta = describe.read_checkpoint_meta(mg)[1]
    assert (meta["tp"], meta["pp"], meta.get("ep", 1)) == (tp, pp, ep)
    if ep > 1:  # each EP rank holds only its own experts, renumbered from 0
        last = fmt.rank_file_path(mg, 1, 0, pp - 1, pp, ep - 1, ep)
        state = fmt.load_rank_file(last)["model"]
        experts = {k.split("local_experts.")[1].split(".")[0] for k in state
                   if "local_experts" in k}
        assert experts == {str(i) for i in range(ModelConfig.from_dict(
            meta["model_config"]).num_moe_experts // ep)}
    run_convert(load_model_type="mg", save_model_type="hf", load_dir=mg, save_dir=back)
    assert_same_tensors(load_hf_tensors(src), load_hf_tensors(back))
    with open(os.path.join(back, "config.json")) as f:
        assert json.load(f)["architectures"] == [HFSource(src, family).family.architecture]


def test_megatron_args_carry_the_expert_flags_and_megatron_moe_is_refused(moe_models, tmp_path):
    """Rank files carry Megatron's MoE ``args``; a Megatron-LM MoE checkpoint (``args`` only, no
    mindlora metadata) is refused by name rather than read as a dense model."""
    mg = str(tmp_path / "mg")
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=moe_models["qwen3_moe"],
                save_dir=mg, model_type_hf="qwen3-moe", target_expert_parallel_size=2)
    path = fmt.rank_file_path(mg, 1, 0, 0, 1, 1, 2)
    payload = fmt.load_rank_file(path, mmap=False)
    args = vars(payload["args"])
    assert (args["num_experts"], args["moe_router_topk"], args["moe_ffn_hidden_size"],
            args["expert_model_parallel_size"]) == (8, 2, 32, 2)
    for e in range(2):
        rank_file = fmt.rank_file_path(mg, 1, 0, 0, 1, e, 2)
        legacy = fmt.load_rank_file(rank_file, mmap=False)
        del legacy["mindlora"]
        torch.save(legacy, rank_file)
    with pytest.raises(ValueError, match=r"args.num_experts=8: Megatron-LM / MindSpeed-LLM "
                                         r"mixture-of-experts checkpoints are not read yet"):
        describe.read_checkpoint_meta(mg, hf_config_dir=moe_models["qwen3_moe"])


def test_bad_expert_layouts_are_refused(moe_models, tmp_path):
    with pytest.raises(ValueError, match=r"num_moe_experts \(4\) must be a multiple of "
                                         r"--target-expert-parallel-size \(3\)"):
        run_convert(load_model_type="hf", save_model_type="mg", load_dir=moe_models["mixtral"],
                    save_dir=str(tmp_path / "a"), model_type_hf="mixtral",
                    target_expert_parallel_size=3)
    assert not os.path.exists(tmp_path / "a")
    with pytest.raises(ValueError, match="does not match"):
        HFSource(moe_models["mixtral"], "qwen3-moe")


def test_dense_model_refuses_expert_parallelism():
    dense = ModelConfig(family="llama", num_layers=2, hidden_size=8, ffn_hidden_size=16,
                        num_attention_heads=2, num_query_groups=2, vocab_size=16)
    with pytest.raises(ValueError, match=r"--expert-model-parallel-size \(2\) needs a "
                                         r"mixture-of-experts model; llama is dense"):
        ParallelConfig(expert_model_parallel_size=2).check_model(dense)


@dataclass
class Case:
    name: str
    cfg: ModelConfig
    base: str
    tp: int
    pp: int
    ep: int
    sp: bool
    expected: torch.Tensor


def _forward(case: Case) -> torch.Tensor | None:
    from megatron.core import parallel_state as ps

    from mindlora.models.builder import build_model
    from mindlora.parallel.layout import chunk_layer_ids, pad_vocab
    from mindlora.runtime import init_parallel

    parallel = ParallelConfig(tensor_model_parallel_size=case.tp,
                              pipeline_model_parallel_size=case.pp,
                              expert_model_parallel_size=case.ep, sequence_parallel=case.sp)
    init_parallel(parallel)
    (model,) = build_model(case.cfg, parallel)
    model.eval()
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    first, last = pp_rank == 0, pp_rank == case.pp - 1
    vocab = pad_vocab(case.cfg.vocab_size, case.tp)
    state = load_model_shard(case.base, case.tp, tp_rank,
                                chunk_layer_ids(case.cfg, parallel, pp_rank, 0), first, last,
                                False, vocab, ep_size=case.ep,
                                ep_rank=ps.get_expert_model_parallel_rank())
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (
        case.name, unexpected, [k for k in missing if not k.endswith("_extra_state")])
    pos = torch.arange(IDS.shape[1]).expand(IDS.shape[0], -1)
    with torch.no_grad():
        if not first:
            hidden = torch.empty(IDS.shape[1] // (case.tp if case.sp else 1), IDS.shape[0],
                                 case.cfg.hidden_size)
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(IDS, pos, attention_mask=None)
        if not last:
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
    parts = [torch.empty_like(out) for _ in range(case.tp)]
    dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)[..., : case.cfg.vocab_size]


def _body(rank: int, world: int, cases: list[Case]) -> None:
    for case in cases:
        logits = _forward(case)
        if logits is not None:
            torch.testing.assert_close(logits, case.expected, atol=ATOL, rtol=0,
                                       msg=lambda m: f"{case.name}: {m}")


LAYOUTS_2 = {"TP1": (1, 1, 1, False), "EP2": (1, 1, 2, False), "PP2": (1, 2, 1, False),
             "TP2 SP": (2, 1, 1, True)}
LAYOUTS_4 = {"TP2xEP2 SP": (2, 1, 2, True), "TP2xEP2": (2, 1, 2, False),
             "PP2xEP2": (1, 2, 2, False)}


@pytest.fixture(scope="module")
def parity_cases(moe_models, tmp_path_factory) -> dict[int, list[Case]]:
    tmp = tmp_path_factory.mktemp("moe_parity")
    out: dict[int, list[Case]] = {2: [], 4: []}
    for name, (family, _) in MOE_SPECS.items():
        src = moe_models[name]
        cfg = HFSource(src, family).model_config
        expected = hf_logits(src, IDS)
        for world, layouts in ((2, LAYOUTS_2), (4, LAYOUTS_4)):
            for label, (tp, pp, ep, sp) in layouts.items():
                if name == "qwen3_moe_nonorm" and label not in ("EP2", "TP2xEP2 SP"):
                    continue
                base = str(tmp / f"{name}_{label.replace(' ', '_')}")
                run_convert(load_model_type="hf", save_model_type="mg", load_dir=src,
                            save_dir=base, model_type_hf=family, target_tensor_parallel_size=tp,
                            target_pipeline_parallel_size=pp, target_expert_parallel_size=ep)
                out[world].append(Case(f"{name} {label}", cfg, base, tp, pp, ep, sp, expected))
        out[2].append(Case(f"{name} TP2xEP2 checkpoint loaded at TP1", cfg,
                           str(tmp / f"{name}_TP2xEP2_SP"), 1, 1, 1, False, expected))
    return out


def test_converted_moe_models_match_hf_logits(parity_cases):
    assert len(parity_cases[2]) == 12 and len(parity_cases[4]) == 7
    spawn(_body, 2, parity_cases[2])
    spawn(_body, 4, parity_cases[4])
