"""Any PEFT LoRA adapter on q/k/v/o/gate/up/down imports exactly (rank-stacked fused factors).

Adapters are made by ``get_peft_model`` with independent random A and B on all seven modules of
a GQA model (qwen2: 4 heads, 2 groups, qkv bias), one plain and one with ``rank_pattern``,
``alpha_pattern`` and rsLoRA. Imported at TP2 x PP2, mindlora's model must give HF + PEFT's
logits (to 1e-4; one spawned group of 4 ranks); untrained import -> export must give back the
PEFT tensors bit for bit. Training with the stacked factors: tests/training/test_peft_training.py.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from mindlora.checkpoint import describe
from mindlora.checkpoint.hf_format import HFSource
from mindlora.config import LoRAConfig
from tests.checkpoint.conftest import assert_same_tensors, hf_logits, run_convert
from tests.checkpoint.test_logit_parity import IDS, Case, _body
from tests.distributed.harness import spawn

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapter(src: str, out: str, seed: int = 0, **kw) -> str:
    """``get_peft_model`` + save_pretrained, then every A and B replaced by independent noise."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    kw.setdefault("target_modules", ALL)
    get_peft_model(model, LoraConfig(**kw)).save_pretrained(out)
    path = os.path.join(out, "adapter_model.safetensors")
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def setup(hf_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_import")
    src = hf_models["qwen2"]
    base = str(root / "base")
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=src, save_dir=base,
                model_type_hf="qwen2", target_tensor_parallel_size=2,
                target_pipeline_parallel_size=2)
    adapters = {
        "plain": make_peft_adapter(src, str(root / "plain"), r=4, lora_alpha=8),
        "patterns": make_peft_adapter(src, str(root / "patterns"), seed=1, r=4, lora_alpha=8,
                                      use_rslora=True, rank_pattern={"k_proj": 2, "o_proj": 6},
                                      alpha_pattern={"v_proj": 16, "up_proj": 4}),
    }
    imported = {}
    for name, peft_dir in adapters.items():
        imported[name] = str(root / f"{name}_mg")
        run_convert(load_model_type="hf", save_model_type="mg", load_dir=src,
                    model_type_hf="qwen2", load_lora_from_hf=peft_dir, save_dir=imported[name],
                    target_tensor_parallel_size=2, target_pipeline_parallel_size=2)
    return src, base, adapters, imported


def test_imported_peft_adapters_give_peft_logits_at_tp2pp2(setup):
    src, base, adapters, imported = setup
    cfg = HFSource(src, "qwen2").model_config
    cases = []
    for name in adapters:
        lora = LoRAConfig.from_dict(describe.read_checkpoint_meta(imported[name])[1]["lora_config"])
        expected = hf_logits(src, IDS, adapter=adapters[name])
        assert (expected - hf_logits(src, IDS)).abs().max() > 1e-2
        cases.append(Case(f"PEFT {name} -> mindlora TP2xPP2", cfg, base, 2, 2, expected, lora,
                          imported[name]))
    spawn(_body, 4, cases)


def test_stacked_structure_and_bit_exact_export(setup, tmp_path):
    src, base, adapters, imported = setup
    plain = describe.read_checkpoint_meta(imported["plain"])[1]["lora_config"]
    assert plain["ranks"] == {"linear_qkv": [4, 4, 4], "linear_fc1": [4, 4]}  # o, down: plain
    assert plain["scalings"] == {} and (plain["r"], plain["alpha"]) == (4, 8.0)
    patterns = LoRAConfig.from_dict(
        describe.read_checkpoint_meta(imported["patterns"])[1]["lora_config"])
    assert patterns.ranks["linear_qkv"] == [4, 2, 4] and patterns.ranks["linear_proj"] == [6]
    assert patterns.use_rslora and patterns.scalings["linear_proj"] == 8 / 6 ** 0.5
    for name in adapters:
        out = str(tmp_path / name)
        run_convert(load_model_type="hf", save_model_type="hf", load_dir=src,
                    model_type_hf="qwen2", lora_load=imported[name], save_lora_to_hf=True,
                    save_dir=out)
        config = json.load(open(os.path.join(out, "adapter_config.json")))
        original = json.load(open(os.path.join(adapters[name], "adapter_config.json")))
        assert sorted(config["target_modules"]) == sorted(original["target_modules"])
        assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (
            original["r"], original["lora_alpha"], original["use_rslora"])
        assert config["base_model_name_or_path"] == os.path.basename(src)
        exported = load_file(os.path.join(out, "adapter_model.safetensors"))
        theirs = load_file(os.path.join(adapters[name], "adapter_model.safetensors"))
        if name == "plain":
            assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
            assert_same_tensors(exported, theirs)  # bit for bit
        else:
            assert config["rank_pattern"] == {"k_proj": 2, "o_proj": 6}
            # one scaling per fused target (q's, gate's): v's and up's own alphas were folded
            # into their B blocks, k's differs through its rank -> an equivalent adapter
            assert set(config["alpha_pattern"]) == {"k_proj"}
            assert sorted(exported) == sorted(theirs)
            torch.testing.assert_close(hf_logits(src, IDS, adapter=out),
                                       hf_logits(src, IDS, adapter=adapters[name]),
                                       atol=1e-5, rtol=0)


@pytest.mark.parametrize("field,value,message", [
    ("use_dora", True, r"use_dora=True"),
    ("lora_bias", True, r"lora_bias=True"),
    ("modules_to_save", ["lm_head"], r"modules_to_save=\['lm_head'\]"),
    ("target_modules", ["q_proj", "embed_tokens"],
     r"target_modules \['embed_tokens'\] \(mindlora has LoRA on q_proj"),
])
def test_unsupported_peft_features_are_refused_by_name(setup, tmp_path, field, value, message):
    src, _, adapters, _ = setup
    peft_dir = str(tmp_path / "bad")
    os.makedirs(peft_dir)
    config = json.load(open(os.path.join(adapters["plain"], "adapter_config.json")))
    config[field] = value
    json.dump(config, open(os.path.join(peft_dir, "adapter_config.json"), "w"))
    save_file(load_file(os.path.join(adapters["plain"], "adapter_model.safetensors")),
              os.path.join(peft_dir, "adapter_model.safetensors"))
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"adapter_config.json uses PEFT features mindlora's "
                                         r"LoRA cannot represent: .*" + message):
        run_convert(load_model_type="hf", save_model_type="mg", load_dir=src,
                    model_type_hf="qwen2", load_lora_from_hf=peft_dir, save_dir=out)
    assert not os.path.exists(out)
