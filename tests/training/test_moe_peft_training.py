"""A rank-stacked expert adapter imported from PEFT trains under EP2 keeping every expert's blocks.

A per-expert PEFT adapter for a tiny Mixtral (4 experts) whose gate (w1) and up (w3) A factors
differ, as PEFT trains them on transformers 4, imports with ``linear_fc1`` rank-stacked in every
expert. Trained 3 iterations with ``--lora-load --finetune`` at EP2 and, as the reference, at DP2:
the losses agree to 1e-5, every expert's fc1 B is still exactly zero off its blocks (the
gradient mask reaches the experts), and the PEFT export's HF + PEFT logits equal the merged
model's.
"""
import os

import torch
from safetensors.torch import load_file, save_file

from mindlora.checkpoint.hf_format import HFSource
from mindlora.checkpoint.reshard import MegatronReader
from mindlora.config import LoRAConfig
from mindlora.models.families.base import lora_block_mask, target_module_paths
from tests.checkpoint.conftest import hf_logits, run_convert
from tests.checkpoint.test_moe import build_moe_model
from tests.checkpoint.test_moe_lora import write_moe_adapter
from tests.distributed.harness import spawn
from tests.training.fixtures import write_instruction_data
from tests.training.test_peft_training import ITERS, _flags


def _body(rank, world, base, data, lora, save_a, save_b):
    from mindlora.training.args import parse_args
    from mindlora.training.loop import train

    a = train(parse_args(_flags(base, data, lora, save_a, ["--expert-model-parallel-size", "2"])),
              log=lambda *_: None)
    b = train(parse_args(_flags(base, data, lora, save_b, [])), log=lambda *_: None)
    torch.testing.assert_close(torch.tensor(a.losses, dtype=torch.float64),
                               torch.tensor(b.losses, dtype=torch.float64), rtol=1e-5, atol=0)
    assert len(a.losses) == ITERS


def test_rank_stacked_expert_adapter_trains_under_ep_and_exports(tmp_path):
    hf = build_moe_model(str(tmp_path / "hf"), "mixtral")
    cfg = HFSource(hf, "mixtral").model_config
    data = write_instruction_data(str(tmp_path / "data" / "toy"), n=32, vocab=256)
    base, mine, peft, imported = (str(tmp_path / d) for d in ("base", "mine", "peft", "imported"))
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=hf, save_dir=base,
                model_type_hf="mixtral")
    write_moe_adapter(mine, cfg, LoRAConfig(r=4, alpha=8.0, target_modules=("all-linear",)),
                      tp=1, ep=1)
    run_convert(load_model_type="mg", save_model_type="hf", load_dir=base, lora_load=mine,
                save_lora_to_hf=True, save_dir=peft)
    path = os.path.join(peft, "adapter_model.safetensors")
    g = torch.Generator().manual_seed(9)
    save_file({k: torch.randn(v.shape, generator=g) * 0.2 if ".w3.lora_A" in k else v
               for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=hf, model_type_hf="mixtral",
                load_lora_from_hf=peft, save_dir=imported)
    save_a, save_b = str(tmp_path / "trained_ep2"), str(tmp_path / "trained_dp2")
    spawn(_body, 2, base, data, imported, save_a, save_b)

    before, after, dp2 = (MegatronReader(p) for p in (imported, save_a, save_b))
    assert after.lora_config.ranks == {"linear_fc1": [4, 4]}
    off_block = lora_block_mask(cfg, "linear_fc1", [4, 4]) == 0
    for layer in range(cfg.num_layers):
        old, new, ref = before.full_layer(layer), after.full_layer(layer), dp2.full_layer(layer)
        for path in target_module_paths(cfg, "linear_fc1"):
            key = f"{path}.lora_B.weight"
            assert torch.count_nonzero(new[key][off_block]) == 0, (layer, path)
            assert not torch.equal(new[key], old[key]), (layer, path)  # it trained
        for key in new:
            torch.testing.assert_close(new[key], ref[key], rtol=1e-3, atol=1e-4)
    out, merged = str(tmp_path / "peft_out"), str(tmp_path / "merged")
    run_convert(load_model_type="hf", save_model_type="hf", load_dir=hf, model_type_hf="mixtral",
                lora_load=save_a, save_lora_to_hf=True, save_dir=out)
    run_convert(load_model_type="hf", save_model_type="hf", load_dir=hf, model_type_hf="mixtral",
                lora_load=save_a, save_dir=merged)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with_peft = hf_logits(hf, ids, adapter=out)
    assert (with_peft - hf_logits(hf, ids, adapter=peft)).abs().max() > 1e-3
    torch.testing.assert_close(with_peft, hf_logits(merged, ids), atol=1e-4, rtol=0)
