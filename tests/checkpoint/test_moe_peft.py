"""Expert LoRA <-> HF PEFT: export, PEFT/vLLM loading, merge, import back (Qwen3-MoE, Mixtral).

Export writes the per-expert layout (``mlp.experts.{e}.gate_proj.lora_A.weight``; Mixtral
``block_sparse_moe.experts.{e}.w1``), which vLLM reads for these models and which PEFT 0.21 on
transformers 5 converts on load to its fused ``target_parameters`` form. Proofs, for adapters
written at TP1 and at TP2 x EP2 (attention and every expert's fc1/fc2, non-zero B):

- ``PeftModel.from_pretrained`` on the exported folder gives the logits of the merged HF model
  (``--lora-load`` into HF) to 1e-4, and mindlora's own model running base + adapter (EP2 and
  TP2+SP, gloo) gives the same logits;
- import of the exported adapter (``--load-lora-from-hf``) at the source layout gives back the
  original adapter's tensors bit for bit;
- an adapter PEFT itself made on transformers 5 (fused 3-D expert parameters) imports exactly:
  mindlora's merge of it equals HF + PEFT, and re-export loads in PEFT with the same logits.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from mindlora.checkpoint.describe import read_checkpoint_meta
from mindlora.checkpoint.hf_format import HFSource
from mindlora.checkpoint.reshard import MegatronReader
from mindlora.config import LoRAConfig
from tests.checkpoint.conftest import hf_logits, run_convert
from tests.checkpoint.test_moe import IDS, MOE_SPECS, moe_models  # noqa: F401  (fixture)
from tests.checkpoint.test_moe_lora import LORA, _body, write_moe_adapter
from tests.distributed.harness import spawn

EXPERT_KEY = {"qwen3_moe": "mlp.experts.7.gate_proj", "mixtral": "block_sparse_moe.experts.3.w1"}


def _same_adapter(a: str, b: str) -> None:
    ra, rb = MegatronReader(a), MegatronReader(b)
    assert ra.lora_config.to_dict() == rb.lora_config.to_dict()
    for i in range(ra.model_config.num_layers):
        la, lb = ra.full_layer(i), rb.full_layer(i)
        assert sorted(la) == sorted(lb)
        for k in la:
            assert la[k].dtype == lb[k].dtype and torch.equal(la[k], lb[k]), (i, k)


@pytest.mark.parametrize("name,tp,ep", [("qwen3_moe", 1, 1), ("qwen3_moe", 2, 2),
                                        ("mixtral", 2, 2)])
def test_exported_expert_adapter_loads_in_peft_and_imports_back(moe_models, tmp_path,  # noqa: F811
                                                                name, tp, ep):
    src, family = moe_models[name], MOE_SPECS[name][0]
    cfg = HFSource(src, family).model_config
    base, peft, merged, back = (str(tmp_path / d) for d in ("base", "peft", "merged", "back"))
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=src, save_dir=base,
                model_type_hf=family)
    adapter = write_moe_adapter(str(tmp_path / "adapter"), cfg, LORA, tp=tp, ep=ep)
    run_convert(load_model_type="mg", save_model_type="hf", load_dir=base, lora_load=adapter,
                save_lora_to_hf=True, save_dir=peft)
    keys = load_file(os.path.join(peft, "adapter_model.safetensors"))
    assert f"base_model.model.model.layers.3.{EXPERT_KEY[name]}.lora_A.weight" in keys
    with open(os.path.join(peft, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["lora_dropout"] == 0.0 and not config.get("target_parameters")

    with_peft = hf_logits(src, IDS, adapter=peft)
    assert (with_peft - hf_logits(src, IDS)).abs().max() > 1e-2, "the adapter changes nothing"
    run_convert(load_model_type="mg", save_model_type="hf", load_dir=base, lora_load=adapter,
                save_dir=merged)
    torch.testing.assert_close(hf_logits(merged, IDS), with_peft, atol=1e-4, rtol=0)

    run_convert(load_model_type="hf", save_model_type="mg", load_dir=src, model_type_hf=family,
                load_lora_from_hf=peft, save_dir=back, target_tensor_parallel_size=tp,
                target_expert_parallel_size=ep)
    _same_adapter(adapter, back)
    assert (read_checkpoint_meta(back)[1]["tp"], read_checkpoint_meta(back)[1].get("ep", 1)) == (tp, ep)
    if tp == 2:  # mindlora's model on base + adapter: the logits HF + PEFT gives
        spawn(_body, 2, cfg, base, adapter, with_peft, [(1, 2, False), (2, 1, True)])


def _peft_made_fused_adapter(src: str, out: str, seed: int = 0) -> str:
    """What PEFT writes when it trains experts itself on transformers 5: target_parameters on the
    fused 3-D ``gate_up_proj`` / ``down_proj``, every factor replaced by random noise."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    get_peft_model(model, config).save_pretrained(out)
    path = os.path.join(out, "adapter_model.safetensors")
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in load_file(path).items()}
    assert any(k.endswith("mlp.experts.base_layer.lora_A.weight") for k in tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_peft_made_fused_expert_adapter_imports_exactly(moe_models, tmp_path, name):  # noqa: F811
    src, family = moe_models[name], MOE_SPECS[name][0]
    fused = _peft_made_fused_adapter(src, str(tmp_path / "fused"))
    imported, merged, again = (str(tmp_path / d) for d in ("imported", "merged", "again"))
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=src, model_type_hf=family,
                load_lora_from_hf=fused, save_dir=imported, target_expert_parallel_size=2)
    lora = LoRAConfig.from_dict(read_checkpoint_meta(imported)[1]["lora_config"])
    # PEFT's gate_up_proj has one A for gate and up: fc1 is not rank-stacked (q/k/v are: their
    # random A factors differ)
    assert (lora.r, lora.alpha, lora.ranks) == (4, 8.0, {"linear_qkv": [4, 4, 4]})
    assert lora.target_modules == ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    expected = hf_logits(src, IDS, adapter=fused)
    assert (expected - hf_logits(src, IDS)).abs().max() > 1e-2
    run_convert(load_model_type="hf", save_model_type="hf", load_dir=src, model_type_hf=family,
                lora_load=imported, save_dir=merged)
    torch.testing.assert_close(hf_logits(merged, IDS), expected, atol=1e-4, rtol=0)
    run_convert(load_model_type="hf", save_model_type="hf", load_dir=src, model_type_hf=family,
                lora_load=imported, save_lora_to_hf=True, save_dir=again)
    torch.testing.assert_close(hf_logits(src, IDS, adapter=again), expected, atol=1e-4, rtol=0)


def test_router_targets_and_odd_fused_shapes_are_refused(moe_models, tmp_path):  # noqa: F811
    src = moe_models["qwen3_moe"]
    fused = _peft_made_fused_adapter(src, str(tmp_path / "fused"))
    cfg_path = os.path.join(fused, "adapter_config.json")
    with open(cfg_path) as f:
        config = json.load(f)
    with open(cfg_path, "w") as f:
        json.dump({**config, "target_modules": ["q_proj", "gate"]}, f)
    with pytest.raises(ValueError, match=r"target_modules \['gate'\] \(mindlora has LoRA on"):
        run_convert(load_model_type="hf", save_model_type="mg", load_dir=src,
                    model_type_hf="qwen3-moe", load_lora_from_hf=fused,
                    save_dir=str(tmp_path / "a"))
    with open(cfg_path, "w") as f:
        json.dump({**config, "target_parameters": ["mlp.gate.weight"]}, f)
    with pytest.raises(ValueError, match=r"target_parameters \['mlp.gate.weight'\]"):
        run_convert(load_model_type="hf", save_model_type="mg", load_dir=src,
                    model_type_hf="qwen3-moe", load_lora_from_hf=fused,
                    save_dir=str(tmp_path / "b"))
    # an adapter made for another expert count: the fused A is not [r * 8, hidden]
    src4 = moe_models["qwen3_moe_nonorm"]
    with open(cfg_path, "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=r"is rank 8 per expert if it holds 4 "
                       r"experts, but adapter_config.json gives rank 4: an adapter made for "
                       r"another number of experts\?"):
        run_convert(load_model_type="hf", save_model_type="mg", load_dir=src4,
                    model_type_hf="qwen3-moe", load_lora_from_hf=fused,
                    save_dir=str(tmp_path / "c"))


def test_rslora_and_independent_gate_up_factors(moe_models, tmp_path):  # noqa: F811
    """rsLoRA exports as its plain-LoRA equivalent (PEFT's per-expert conversion doubles r and
    alpha of gate_up_proj, which keeps alpha / r only); a per-expert adapter whose gate and up A
    differ (as PEFT trains them on transformers 4) imports rank-stacked and exports back bit for
    bit."""
    src = moe_models["mixtral"]
    cfg = HFSource(src, "mixtral").model_config
    lora = LoRAConfig(r=4, alpha=8.0, use_rslora=True, target_modules=("all-linear",))
    base, peft, merged = (str(tmp_path / d) for d in ("base", "peft", "merged"))
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=src, save_dir=base,
                model_type_hf="mixtral")
    adapter = write_moe_adapter(str(tmp_path / "adapter"), cfg, lora, tp=1, ep=2)
    run_convert(load_model_type="mg", save_model_type="hf", load_dir=base, lora_load=adapter,
                save_lora_to_hf=True, save_dir=peft)
    with open(os.path.join(peft, "adapter_config.json")) as f:
        config = json.load(f)
    assert (config["use_rslora"], config["lora_alpha"]) == (False, 16.0)  # 8 / sqrt(4) = 16 / 4
    run_convert(load_model_type="mg", save_model_type="hf", load_dir=base, lora_load=adapter,
                save_dir=merged)
    torch.testing.assert_close(hf_logits(src, IDS, adapter=peft), hf_logits(merged, IDS),
                               atol=1e-4, rtol=0)

    path = os.path.join(peft, "adapter_model.safetensors")
    g = torch.Generator().manual_seed(9)
    tensors = {k: torch.randn(v.shape, generator=g) * 0.2 if ".w3.lora_A" in k else v
               for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})
    stacked, merged2, again = (str(tmp_path / d) for d in ("stacked", "merged2", "again"))
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=src, model_type_hf="mixtral",
                load_lora_from_hf=peft, save_dir=stacked, target_tensor_parallel_size=2)
    assert LoRAConfig.from_dict(read_checkpoint_meta(stacked)[1]["lora_config"]).ranks == {
        "linear_fc1": [4, 4]}
    run_convert(load_model_type="hf", save_model_type="hf", load_dir=src, model_type_hf="mixtral",
                lora_load=stacked, save_dir=merged2)
    torch.testing.assert_close(hf_logits(merged2, IDS), hf_logits(src, IDS, adapter=peft),
                               atol=1e-4, rtol=0)
    run_convert(load_model_type="hf", save_model_type="hf", load_dir=src, model_type_hf="mixtral",
                lora_load=stacked, save_lora_to_hf=True, save_dir=again)
    back = load_file(os.path.join(again, "adapter_model.safetensors"))
    assert sorted(back) == sorted(tensors)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
