"""Training a rank-stacked adapter imported from PEFT keeps its blocks, and exports back to PEFT.

A ``get_peft_model`` adapter with independent random factors on all seven modules of a GQA
Llama is imported at TP2 x PP2 (q/k/v and gate/up rank-stacked), trained 3 iterations with
``--lora-load --finetune`` at TP2 x PP2 and, as the reference, at DP4; the losses must agree to
1e-5. The trained B factors must still be exactly zero off their blocks (the gradient mask), so
the PEFT export holds separate q/k/v factors whose HF + PEFT logits equal the merged model's.
"""
import json
import os

import pytest
import torch

from mindlora.checkpoint.reshard import MegatronReader
from mindlora.models.families.base import TARGET_PATHS, lora_block_mask
from tests.checkpoint.conftest import build_hf_model, hf_logits, run_convert
from tests.checkpoint.test_peft_import import make_peft_adapter
from tests.distributed.harness import spawn
from tests.training.fixtures import write_instruction_data

ITERS = 3


def _flags(base, data, lora, save, layout):
    return ["--load", base, "--data-path", data, "--micro-batch-size", "1",
            "--global-batch-size", "8", "--seq-length", "32", "--train-iters", str(ITERS),
            "--lr", "5e-3", "--lora-r", "4", "--lora-alpha", "8", "--log-interval", "100",
            "--weight-decay", "0.01", "--lora-load", lora, "--finetune", "--save", save,
            "--save-interval", str(ITERS), *layout]


def _body(rank, world, base, data, lora, save_a, save_b):
    from mindlora.training.args import parse_args
    from mindlora.training.loop import train

    a = train(parse_args(_flags(base, data, lora, save_a, [
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"])),
        log=lambda *_: None)
    b = train(parse_args(_flags(base, data, lora, save_b, [])), log=lambda *_: None)
    torch.testing.assert_close(torch.tensor(a.losses, dtype=torch.float64),
                               torch.tensor(b.losses, dtype=torch.float64), rtol=1e-5, atol=0)
    assert len(a.losses) == ITERS


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_training")
    hf = build_hf_model(str(root / "hf"), "llama")
    data = write_instruction_data(str(root / "data" / "toy"), n=32, vocab=256)
    base, imported = str(root / "base"), str(root / "imported")
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=hf, save_dir=base,
                model_type_hf="llama", target_tensor_parallel_size=2,
                target_pipeline_parallel_size=2)
    peft = make_peft_adapter(hf, str(root / "peft"), r=4, lora_alpha=8)
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=hf, model_type_hf="llama",
                load_lora_from_hf=peft, save_dir=imported, target_tensor_parallel_size=2,
                target_pipeline_parallel_size=2)
    save_a, save_b = str(root / "trained_tp2pp2"), str(root / "trained_dp4")
    spawn(_body, 4, base, data, imported, save_a, save_b)
    return root, hf, imported, save_a, save_b


def test_training_keeps_the_blocks_and_exports_back_to_peft(trained):
    root, hf, imported, save_a, save_b = trained
    before, after, dp4 = (MegatronReader(p) for p in (imported, save_a, save_b))
    assert after.lora_config.ranks == {"linear_qkv": [4, 4, 4], "linear_fc1": [4, 4]}
    cfg = after.model_config
    for layer in range(cfg.num_layers):
        old, new, ref = before.full_layer(layer), after.full_layer(layer), dp4.full_layer(layer)
        for target, ranks in after.lora_config.ranks.items():
            key = f"{TARGET_PATHS[target]}.lora_B.weight"
            off_block = lora_block_mask(cfg, target, ranks) == 0
            assert torch.count_nonzero(new[key][off_block]) == 0, (layer, target)
            assert not torch.equal(new[key], old[key])  # it trained
        for key in new:
            # Adam divides by sqrt(v): float32 sum-order noise of tiny grads shows at ~1e-5
            torch.testing.assert_close(new[key], ref[key], rtol=1e-3, atol=1e-4)
    peft_out, merged = str(root / "peft_out"), str(root / "merged")
    run_convert(load_model_type="hf", save_model_type="hf", load_dir=hf, model_type_hf="llama",
                lora_load=save_a, save_lora_to_hf=True, save_dir=peft_out)
    run_convert(load_model_type="hf", save_model_type="hf", load_dir=hf, model_type_hf="llama",
                lora_load=save_a, save_dir=merged)
    config = json.load(open(os.path.join(peft_out, "adapter_config.json")))
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (4, 8.0, {})
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with_peft = hf_logits(hf, ids, adapter=peft_out)
    assert (with_peft - hf_logits(hf, ids, adapter=str(root / "peft"))).abs().max() > 1e-3
    torch.testing.assert_close(with_peft, hf_logits(merged, ids), atol=1e-4, rtol=0)
