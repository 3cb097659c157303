"""Mixture-of-experts LoRA training: expert parallelism trains like one process.

A tiny random Qwen3-MoE and a tiny Mixtral (4 layers, 4 experts, top-2, GQA, load-balancing loss
coefficient 0.01) are converted from HF; 10 iterations of LoRA SFT (all-linear: attention and
every expert) in float32, global batch 8, aux loss included in the gradient. EP2 (DP2), TP2+SP,
TP2 x EP2 + SP and PP2 x EP2 (Qwen3-MoE) and EP2 (Mixtral) must give the per-iteration lm
losses, load-balancing losses and grad norms of EP1 on one process to 1e-5 relative, as the
dense layouts do in test_parity.py. Refused layouts are checked by message.
"""
import json

import pytest

from mindlora.checkpoint import describe
from tests.checkpoint.conftest import run_convert
from tests.distributed.harness import spawn
from tests.training.fixtures import preprocess_alpaca
from tests.training.test_parity import ITERS, _flags

LORA = ["--lora-target-modules", "all-linear"]


def _run(base, data, extra):
    """test_parity's run, but padded to --seq-length: the CPU's allgather token dispatcher needs
    equal token counts on every rank of an expert group (see the refusal test)."""
    from mindlora.training.args import parse_args
    from mindlora.training.loop import train

    flags = [f for f in _flags(base, data, [*LORA, *extra]) if f != "--no-pad-to-seq-lengths"]
    lines = []
    result = train(parse_args([*flags, "--log-interval", "5"]), log=lines.append)
    aux = [a["load_balancing_loss"] for a in result.aux_losses]
    logged = [line for line in lines if line.startswith(" iteration ")]
    if logged:  # rank 0 prints Megatron's line: lm loss, then the load-balancing loss apart
        assert " | lm loss: " in logged[0] and " | load_balancing_loss: " in logged[0], logged[0]
    return result.losses, result.grad_norms, aux


def _layouts_body(rank, world, base, data, ref_path, layouts):
    import torch

    with open(ref_path) as f:
        ref = json.load(f)
    for name, extra in layouts:
        losses, norms, aux = _run(base, data, extra)
        assert len(losses) == ITERS, name
        torch.testing.assert_close(torch.tensor(aux, dtype=torch.float64),
                                   torch.tensor(ref["aux"], dtype=torch.float64),
                                   rtol=1e-5, atol=0, msg=lambda m: f"{name} aux losses: {m}")
        torch.testing.assert_close(torch.tensor(losses, dtype=torch.float64),
                                   torch.tensor(ref["losses"], dtype=torch.float64),
                                   rtol=1e-5, atol=0, msg=lambda m: f"{name} losses: {m}")
        torch.testing.assert_close(torch.tensor(norms, dtype=torch.float64),
                                   torch.tensor(ref["norms"], dtype=torch.float64),
                                   rtol=1e-5, atol=1e-7, msg=lambda m: f"{name} grad norms: {m}")


def _moe_base(root: str, vocab: int, family: str = "qwen3-moe") -> str:
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

    common = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, num_experts_per_tok=2,
                  router_aux_loss_coef=0.01, max_position_embeddings=128,
                  tie_word_embeddings=False)
    if family == "mixtral":
        config = MixtralConfig(intermediate_size=32, num_local_experts=4, **common)
    else:
        config = Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=32, head_dim=16,
                                num_experts=4, norm_topk_prob=True, **common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if n.endswith("gate.weight") else 0.02))
    model.save_pretrained(f"{root}/hf")
    return run_convert(load_model_type="hf", save_model_type="mg", load_dir=f"{root}/hf",
                       save_dir=f"{root}/mg", model_type_hf=family)


def _reference_body(rank, world, base, data, out):
    losses, norms, aux = _run(base, data, [])
    with open(out, "w") as f:
        json.dump({"losses": losses, "norms": norms, "aux": aux}, f)


def _setup(root, family: str):
    data, vocab = preprocess_alpaca(str(root / "alpaca"), n=96)
    base = _moe_base(str(root), ((vocab + 63) // 64) * 64, family)
    ref = str(root / "ref.json")
    spawn(_reference_body, 1, base, data, ref)
    with open(ref) as f:
        result = json.load(f)
    assert len(result["losses"]) == ITERS and result["losses"][-1] < result["losses"][0], \
        "the reference run must learn"
    assert min(result["aux"]) > 0, "the load-balancing loss must be on"
    return base, data, ref


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return _setup(tmp_path_factory.mktemp("moe_train"), "qwen3-moe")


@pytest.fixture(scope="module")
def mixtral_setup(tmp_path_factory):
    return _setup(tmp_path_factory.mktemp("mixtral_train"), "mixtral")


EP2 = ("EP2", ["--expert-model-parallel-size", "2"])
TP2_SP = ("TP2+SP", ["--tensor-model-parallel-size", "2", "--sequence-parallel"])
TP2_EP2_SP = ("TP2xEP2+SP", ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                             "--expert-model-parallel-size", "2"])
PP2_EP2 = ("PP2xEP2", ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2"])
LAYOUTS = {"qwen3-moe": {2: [EP2, TP2_SP], 4: [TP2_EP2_SP, PP2_EP2]},
           "mixtral": {2: [EP2]}}
"""family -> {world size: layouts run in one spawned group}. Mixtral checks EP2 only: its
layer differs from Qwen3-MoE's in the family's config and key map, not in the parallel code."""


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_expert_parallel_layouts_match_single_process(family, request):
    base, data, ref = request.getfixturevalue("mixtral_setup" if family == "mixtral"
                                              else "setup")
    for world, layouts in LAYOUTS[family].items():
        spawn(_layouts_body, world, base, data, ref, layouts)


def test_bad_moe_flags_are_refused(setup):
    from mindlora.training.args import parse_args
    from mindlora.training.loop import resolve_model

    base, data, _ = setup

    def resolve(extra, pad=True):
        flags = _flags(base, data, [*LORA, *extra])
        return resolve_model(parse_args([f for f in flags
                                         if pad is False or f != "--no-pad-to-seq-lengths"]))

    with pytest.raises(ValueError, match=r"--num-experts 8 \(checkpoint: 4\)"):
        resolve(["--num-experts", "8"])
    with pytest.raises(ValueError, match=r"--moe-router-topk 1 \(checkpoint: 2\)"):
        resolve(["--moe-router-topk", "1"])
    with pytest.raises(ValueError, match=r"num_moe_experts \(4\) must be a multiple of "
                                         r"--expert-model-parallel-size \(3\)"):
        resolve(["--expert-model-parallel-size", "3"])
    with pytest.raises(ValueError, match="needs --sequence-parallel"):
        resolve(["--tensor-model-parallel-size", "2"])
    with pytest.raises(ValueError, match="--no-pad-to-seq-lengths with "
                                         "--expert-model-parallel-size > 1 on the CPU"):
        resolve(["--expert-model-parallel-size", "2"], pad=False)
    with pytest.raises(ValueError, match=r"--expert-tensor-parallel-size \(1\) must equal "
                                         r"--tensor-model-parallel-size \(2\)"):
        resolve(["--tensor-model-parallel-size", "2", "--sequence-parallel",
                 "--expert-tensor-parallel-size", "1"])
    model, parallel = resolve(["--num-experts", "4", "--expert-model-parallel-size", "2"])
    assert (model.num_moe_experts, parallel.expert_model_parallel_size) == (4, 2)
    _, parallel = resolve(["--tensor-model-parallel-size", "2", "--sequence-parallel",
                           "--expert-tensor-parallel-size", "2"])
    assert parallel.expert_tensor_parallel_size == 2


def _resume_body(rank, world, base, data, root):
    """EP2: an uninterrupted run equals one stopped at iteration 5 and resumed (exactly)."""
    from mindlora.checkpoint import megatron_format as fmt

    ep = ["--expert-model-parallel-size", "2", "--train-iters", "8"]
    full = _run(base, data, ep)[0]
    stopped = _run(base, data, [*ep, "--save", f"{root}/ckpt", "--save-interval", "5",
                                "--exit-interval", "5"])[0]
    assert len(stopped) == 5 and describe.read_checkpoint_meta(f"{root}/ckpt")[1]["ep"] == 2
    # one file per EP rank, each with its own experts (renumbered from 0)
    for e in range(2):
        payload = fmt.load_rank_file(fmt.rank_file_path(f"{root}/ckpt", 5, 0, 0, 1, e, 2))
        assert payload["mindlora"]["ep_rank"] == e
        assert any(".local_experts.1.linear_fc2.lora_B" in k for k in payload["model"])
        assert not any(".local_experts.2." in k for k in payload["model"])
    resumed = _run(base, data, [*ep, "--lora-load", f"{root}/ckpt"])[0]
    assert resumed == full[5:], (resumed, full)


def test_exact_resume_with_expert_parallelism(setup, tmp_path):
    base, data, _ = setup
    spawn(_resume_body, 2, base, data, str(tmp_path))
