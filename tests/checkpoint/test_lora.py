"""LoRA adapters: export to HF PEFT, import from it, and merging, checked against PEFT itself."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from mindlora.checkpoint import describe
from mindlora.checkpoint.loading import load_model_shard
from mindlora.checkpoint.hf_format import HFSource
from mindlora.config import LoRAConfig
from tests.checkpoint.conftest import (SPECS, assert_same_tensors, hf_logits, load_hf_tensors,
                                       random_adapter, run_convert, write_adapter)

IDS = torch.randint(0, 255, (2, 9), generator=torch.Generator().manual_seed(3))
# float32 end to end; merged weights round differently from PEFT's unmerged x@A@B path, which
# moves logits by ~1e-6 here. 1e-4 leaves margin while a wrong slice or scale moves them by >1e-2.
ATOL = 1e-4

CASES = {
    "llama": LoRAConfig(r=4, alpha=8.0, target_modules=("all-linear",)),
    "qwen2": LoRAConfig(r=4, alpha=16.0, target_modules=("linear_qkv", "linear_fc1")),
    "qwen3": LoRAConfig(r=8, alpha=8.0, target_modules=("all-linear",), use_rslora=True),
}


def _adapter(hf_models, tmp_path, name):
    family = SPECS[name]["family"]
    cfg = HFSource(hf_models[name], family).model_config
    lora = CASES[name]
    root = write_adapter(str(tmp_path / f"{name}_adapter"), cfg, lora,
                         random_adapter(cfg, lora, seed=1), tp=2, pp=2)
    return family, cfg, lora, root


@pytest.mark.parametrize("name", list(CASES))
def test_peft_export_equals_merge_equals_peft(hf_models, tmp_path, name):
    family, cfg, lora, adapter = _adapter(hf_models, tmp_path, name)
    src = hf_models[name]
    peft_dir, merged = str(tmp_path / "peft"), str(tmp_path / "merged")
    run_convert(load_model_type="hf", save_model_type="hf", load_dir=src, model_type_hf=family,
                lora_load=adapter, save_lora_to_hf=True, save_dir=peft_dir, lora_r=lora.r)
    run_convert(load_model_type="hf", save_model_type="hf", load_dir=src, model_type_hf=family,
                lora_load=adapter, save_dir=merged)
    config = json.load(open(os.path.join(peft_dir, "adapter_config.json")))
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (lora.r, lora.alpha,
                                                                          lora.use_rslora)
    modules = {"linear_qkv": ["k_proj", "q_proj", "v_proj"], "linear_proj": ["o_proj"],
               "linear_fc1": ["gate_proj", "up_proj"], "linear_fc2": ["down_proj"]}
    assert config["target_modules"] == sorted(m for t in lora.target_modules for m in modules[t])
    keys = load_file(os.path.join(peft_dir, "adapter_model.safetensors"))
    assert "base_model.model.model.layers.3.self_attn.k_proj.lora_B.weight" in keys
    assert keys["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (
        cfg.num_query_groups * cfg.kv_channels, lora.r)

    base = hf_logits(src, IDS)
    with_peft = hf_logits(src, IDS, adapter=peft_dir)
    assert (with_peft - base).abs().max() > 1e-2  # the adapter really changes the model
    torch.testing.assert_close(hf_logits(merged, IDS), with_peft, atol=ATOL, rtol=0)


def test_merge_from_sharded_mg_base_equals_merge_from_hf(hf_models, tmp_path):
    family, cfg, lora, adapter = _adapter(hf_models, tmp_path, "llama")
    mg = str(tmp_path / "mg")
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=hf_models["llama"],
                save_dir=mg, model_type_hf=family, target_tensor_parallel_size=2,
                target_pipeline_parallel_size=2)
    a, b, mg_merged = (str(tmp_path / n) for n in ("a", "b", "mg_merged"))
    run_convert(load_model_type="hf", save_model_type="hf", load_dir=hf_models["llama"],
                model_type_hf=family, lora_load=adapter, save_dir=a)
    run_convert(load_model_type="mg", save_model_type="mg", load_dir=mg, lora_load=adapter,
                save_dir=mg_merged, target_pipeline_parallel_size=4)
    run_convert(load_model_type="mg", save_model_type="hf", load_dir=mg_merged, save_dir=b)
    assert_same_tensors(load_hf_tensors(a), load_hf_tensors(b))


def test_peft_import_export_round_trip_is_bit_exact(hf_models, tmp_path):
    family, cfg, lora, adapter = _adapter(hf_models, tmp_path, "qwen3")
    src = hf_models["qwen3"]
    peft1, imported, peft2 = (str(tmp_path / n) for n in ("peft1", "imported", "peft2"))
    run_convert(load_model_type="hf", save_model_type="hf", load_dir=src, model_type_hf=family,
                lora_load=adapter, save_lora_to_hf=True, save_dir=peft1)
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=src, model_type_hf=family,
                load_lora_from_hf=peft1, save_dir=imported, target_pipeline_parallel_size=4)
    _, meta = describe.read_checkpoint_meta(imported)
    assert meta["kind"] == "adapter" and LoRAConfig.from_dict(meta["lora_config"]) == lora
    run_convert(load_model_type="hf", save_model_type="hf", load_dir=src, model_type_hf=family,
                lora_load=imported, save_lora_to_hf=True, save_dir=peft2)
    assert_same_tensors(load_file(os.path.join(peft1, "adapter_model.safetensors")),
                        load_file(os.path.join(peft2, "adapter_model.safetensors")))
    # The TP2 x PP2 adapter and the imported TP1 x PP4 one hold the same factors.
    for layer in (0, 3):
        want = load_model_shard(adapter, 1, 0, [layer], False, False, True, 256)
        got = load_model_shard(imported, 1, 0, [layer], False, False, True, 256)
        assert_same_tensors(got, want)


def _peft_adapter(src: str, out: str, share_a: bool) -> None:
    """A PEFT-made adapter on q_proj, v_proj and down_proj with non-zero B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=12,
                                            target_modules=["q_proj", "v_proj", "down_proj"]))
    peft.save_pretrained(out)
    path = os.path.join(out, "adapter_model.safetensors")
    tensors = load_file(path)
    g = torch.Generator().manual_seed(5)
    for k in tensors:
        if "lora_B" in k:
            tensors[k] = torch.randn(tensors[k].shape, generator=g) * 0.2
        if share_a and "v_proj.lora_A" in k:
            tensors[k] = tensors[k.replace("v_proj", "q_proj")].clone()
    save_file(tensors, path, metadata={"format": "pt"})


def test_import_of_a_peft_made_adapter(hf_models, tmp_path):
    src = hf_models["qwen2"]
    peft_dir, imported, merged = (str(tmp_path / n) for n in ("peft", "imported", "merged"))
    _peft_adapter(src, peft_dir, share_a=True)
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=src, model_type_hf="qwen2",
                load_lora_from_hf=peft_dir, save_dir=imported, target_tensor_parallel_size=2,
                target_pipeline_parallel_size=2)
    _, meta = describe.read_checkpoint_meta(imported)
    assert meta["lora_config"]["target_modules"] == ["linear_qkv", "linear_fc2"]
    assert meta["lora_config"]["alpha"] == 12.0
    run_convert(load_model_type="hf", save_model_type="hf", load_dir=src, model_type_hf="qwen2",
                lora_load=imported, save_dir=merged)
    torch.testing.assert_close(hf_logits(merged, IDS), hf_logits(src, IDS, adapter=peft_dir),
                               atol=ATOL, rtol=0)
