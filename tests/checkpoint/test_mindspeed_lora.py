"""MindSpeed-LLM LoRA checkpoints (``lora_A.default.weight`` keys, r/alpha/targets in ``args``)
read like mindlora adapters, and mindlora writes that dialect with ``--lora-key-style mindspeed``.
"""
from __future__ import annotations

import pytest
import torch

from mindlora.checkpoint import megatron_format as fmt
from mindlora.checkpoint.hf_format import HFSource
from mindlora.checkpoint.reshard import MegatronReader
from mindlora.config import LoRAConfig
from tests.checkpoint.conftest import (assert_same_tensors, hf_logits, load_hf_tensors,
                                       random_adapter, run_convert, write_adapter)
from tests.checkpoint.megatron_lm_files import to_megatron_lm

LORA = LoRAConfig(r=4, alpha=16.0, target_modules=("linear_qkv", "linear_proj", "linear_fc1"))
MINDSPEED_ARGS = {"lora_r": 4, "lora_alpha": 16,
                  "lora_target_modules": ["linear_qkv", "linear_proj", "linear_fc1"]}


@pytest.fixture
def adapters(hf_models, tmp_path):
    cfg = HFSource(hf_models["qwen2"], "qwen2").model_config
    ours = write_adapter(str(tmp_path / "ours"), cfg, LORA, random_adapter(cfg, LORA, 3),
                         tp=2, pp=2)
    theirs = to_megatron_lm(ours, str(tmp_path / "theirs"), lora_args=MINDSPEED_ARGS)
    return hf_models["qwen2"], ours, theirs


def test_mindspeed_lora_checkpoint_equals_mindlora_adapter(adapters, tmp_path):
    src, ours, theirs = adapters
    raw = fmt.load_rank_file(fmt.rank_file_path(theirs, 1000, 0, 0, 2))
    assert "decoder.layers.0.self_attention.linear_qkv.lora_A.default.weight" in raw["model"]
    reader = MegatronReader(theirs)
    assert reader.kind == "adapter" and reader.lora_config.r == 4
    assert (reader.lora_config.alpha, reader.lora_config.target_modules) == (
        16.0, ("linear_qkv", "linear_proj", "linear_fc1"))
    for i in range(4):
        assert_same_tensors(reader.full_layer(i), MegatronReader(ours).full_layer(i))
    # merged and exported (PEFT) alike: the same model, hence the same logits
    outs = {}
    for name, adapter in (("ours", ours), ("theirs", theirs)):
        outs[name] = str(tmp_path / f"merged_{name}")
        run_convert(load_model_type="hf", save_model_type="hf", load_dir=src,
                    model_type_hf="qwen2", lora_load=adapter, save_dir=outs[name], lora_r=4,
                    lora_alpha=16)
    assert_same_tensors(load_hf_tensors(outs["ours"]), load_hf_tensors(outs["theirs"]))
    peft = str(tmp_path / "peft")
    run_convert(load_model_type="hf", save_model_type="hf", load_dir=src, model_type_hf="qwen2",
                lora_load=theirs, save_lora_to_hf=True, save_dir=peft)
    ids = torch.randint(0, 255, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hf_logits(src, ids, adapter=peft), hf_logits(outs["ours"], ids),
                               atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"--lora-r 8 but the adapter has r=4"):
        run_convert(load_model_type="hf", save_model_type="hf", load_dir=src,
                    model_type_hf="qwen2", lora_load=theirs, save_dir=str(tmp_path / "x"),
                    lora_r=8)


def test_mindspeed_key_style_export_round_trips(adapters, tmp_path):
    src, ours, _ = adapters
    styled = str(tmp_path / "styled")
    run_convert(load_model_type="mg", save_model_type="mg", load_dir=ours, save_dir=styled,
                target_tensor_parallel_size=2, lora_key_style="mindspeed")
    payload = fmt.load_rank_file(fmt.rank_file_path(styled, 1, 1, 0, 1))
    keys = set(payload["model"])
    assert "decoder.layers.3.mlp.linear_fc1.lora_B.default.weight" in keys
    assert not any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    args = payload["args"]
    assert (args.lora_r, args.lora_alpha, args.lora_target_modules) == (
        4, 16.0, ["linear_qkv", "linear_proj", "linear_fc1"])
    back = str(tmp_path / "back")
    run_convert(load_model_type="mg", save_model_type="mg", load_dir=styled, save_dir=back,
                target_tensor_parallel_size=2, target_pipeline_parallel_size=2)
    a, b = MegatronReader(ours), MegatronReader(back)
    assert b.lora_config == a.lora_config
    for i in range(4):
        assert_same_tensors(a.full_layer(i), b.full_layer(i))
    with pytest.raises(ValueError, match=r"--lora-key-style \(peft\) must be one of"):
        run_convert(load_model_type="mg", save_model_type="mg", load_dir=ours,
                    save_dir=str(tmp_path / "y"), lora_key_style="peft")
