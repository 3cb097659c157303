"""Export details: an fp32 merge cast once to the requested dtype; adapter_config's base name."""
from __future__ import annotations

import json
import os

import torch

from mindlora.checkpoint.hf_format import HFSource
from mindlora.config import LoRAConfig
from tests.checkpoint.conftest import (assert_same_tensors, load_hf_tensors, random_adapter,
                                       run_convert, write_adapter)


def test_bf16_base_merged_for_fp32_equals_the_fp32_merge(hf_models, tmp_path):
    src = hf_models["llama"]
    cfg = HFSource(src, "llama").model_config
    lora = LoRAConfig(r=4, alpha=8.0, target_modules=("all-linear",))
    adapter = write_adapter(str(tmp_path / "adapter"), cfg, lora, random_adapter(cfg, lora, 4),
                            tp=2, pp=2)
    bf16, fp32 = str(tmp_path / "bf16"), str(tmp_path / "bf16_as_fp32")
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=src, save_dir=bf16,
                model_type_hf="llama", params_dtype="bf16")
    run_convert(load_model_type="mg", save_model_type="mg", load_dir=bf16, save_dir=fp32,
                params_dtype="fp32")  # exact: every bf16 value is an fp32 value
    direct, reference = str(tmp_path / "direct"), str(tmp_path / "reference")
    run_convert(load_model_type="mg", save_model_type="hf", load_dir=bf16, lora_load=adapter,
                save_dir=direct, params_dtype="fp32")
    run_convert(load_model_type="mg", save_model_type="hf", load_dir=fp32, lora_load=adapter,
                save_dir=reference)
    got, want = load_hf_tensors(direct), load_hf_tensors(reference)
    assert got["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    assert_same_tensors(got, want)
    # and it is not the bf16-rounded merge
    rounded = str(tmp_path / "rounded")
    run_convert(load_model_type="mg", save_model_type="hf", load_dir=bf16, lora_load=adapter,
                save_dir=rounded)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert load_hf_tensors(rounded)[q].dtype == torch.bfloat16
    assert not torch.equal(load_hf_tensors(rounded)[q].float(), got[q])


def test_base_model_name_or_path(hf_models, tmp_path):
    src = hf_models["llama"]
    cfg = HFSource(src, "llama").model_config
    lora = LoRAConfig(r=2, alpha=4.0, target_modules=("linear_qkv",))
    adapter = write_adapter(str(tmp_path / "adapter"), cfg, lora, random_adapter(cfg, lora),
                            tp=1, pp=1)

    def export(name, **kw):
        out = str(tmp_path / name)
        run_convert(load_model_type="hf", save_model_type="hf", load_dir=src,
                    model_type_hf="llama", lora_load=adapter, save_lora_to_hf=True,
                    save_dir=out, **kw)
        return json.load(open(os.path.join(out, "adapter_config.json")))[
            "base_model_name_or_path"]

    assert export("a", base_model_name_or_path="meta-llama/Llama-3.2-1B") == \
        "meta-llama/Llama-3.2-1B"
    assert export("b") == "llama"  # the folder's name, never the absolute local path
    config = json.load(open(os.path.join(src, "config.json")))
    named = str(tmp_path / "named_hf")
    os.makedirs(named)
    for f in os.listdir(src):
        os.symlink(os.path.join(src, f), os.path.join(named, f))
    os.remove(os.path.join(named, "config.json"))
    json.dump({**config, "_name_or_path": "HuggingFaceTB/SmolLM2-135M"},
              open(os.path.join(named, "config.json"), "w"))
    out = str(tmp_path / "c")
    run_convert(load_model_type="hf", save_model_type="hf", load_dir=named,
                model_type_hf="llama", lora_load=adapter, save_lora_to_hf=True, save_dir=out)
    assert json.load(open(os.path.join(out, "adapter_config.json")))[
        "base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M"
