"""Bad input fails early with a message naming the file or flag, and --save-dir stays untouched."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from mindlora.checkpoint import megatron_format as fmt
from mindlora.checkpoint.hf_format import HFSource, HFWriter
from mindlora.config import LoRAConfig
from tests.checkpoint.conftest import random_adapter, run_convert, write_adapter
from tools.convert_ckpt import main


def _cli(capsys, *args: str) -> str:
    assert main(["--no-progress", *args]) == 2
    return capsys.readouterr().err


def _no_leftovers(parent) -> None:
    assert not [n for n in os.listdir(parent) if ".tmp-" in n]


def test_missing_shard(hf_models, tmp_path, capsys):
    src = str(tmp_path / "src")
    shutil.copytree(hf_models["llama"], src)
    victim = sorted(p for p in os.listdir(src) if p.startswith("model-0"))[1]
    os.remove(os.path.join(src, victim))
    err = _cli(capsys, "--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", src,
               "--save-dir", str(tmp_path / "out"), "--model-type-hf", "llama")
    assert f"shard {os.path.join(src, victim)} listed in" in err and "is missing" in err
    assert not os.path.exists(tmp_path / "out")
    _no_leftovers(tmp_path)


def test_wrong_model_type_hf(hf_models, tmp_path, capsys):
    err = _cli(capsys, "--load-model-type", "hf", "--save-model-type", "mg", "--load-dir",
               hf_models["qwen2"], "--save-dir", str(tmp_path / "out"), "--model-type-hf", "llama")
    assert "--model-type-hf llama does not match" in err and "--model-type-hf qwen2" in err
    assert not os.path.exists(tmp_path / "out")


def test_tp_not_dividing_heads(hf_models, tmp_path, capsys):
    err = _cli(capsys, "--load-model-type", "hf", "--save-model-type", "mg", "--load-dir",
               hf_models["llama"], "--save-dir", str(tmp_path / "out"), "--model-type-hf",
               "llama", "--target-tensor-parallel-size", "3")
    assert "num_attention_heads (4) must be a multiple of --target-tensor-parallel-size (3)" in err
    err = _cli(capsys, "--load-model-type", "hf", "--save-model-type", "mg", "--load-dir",
               hf_models["llama"], "--save-dir", str(tmp_path / "out"), "--model-type-hf",
               "llama", "--target-pipeline-parallel-size", "2", "--num-layer-list", "1,2")
    assert "--num-layer-list sums to 3 but the model has 4 layers" in err
    assert not os.path.exists(tmp_path / "out")


def test_truncated_files(hf_models, tmp_path):
    src = str(tmp_path / "src")
    shutil.copytree(hf_models["qwen3"], src)
    shard = os.path.join(src, sorted(p for p in os.listdir(src) if p.startswith("model-0"))[-1])
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 10)
    with pytest.raises(ValueError, match=f"{os.path.basename(shard)} is truncated"):
        run_convert(load_model_type="hf", save_model_type="mg", load_dir=src,
                    model_type_hf="qwen3", save_dir=str(tmp_path / "out"))
    mg = str(tmp_path / "mg")
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=hf_models["qwen3"],
                model_type_hf="qwen3", save_dir=mg, target_tensor_parallel_size=2)
    victim = fmt.rank_file_path(mg, 1, 1, 0, 1)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 3)
    with pytest.raises(ValueError, match=r"mp_rank_01/model_optim_rng.pt is not a readable"):
        run_convert(load_model_type="mg", save_model_type="hf", load_dir=mg,
                    save_dir=str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    _no_leftovers(tmp_path)


def test_adapter_that_does_not_match(hf_models, tmp_path, capsys):
    src = hf_models["llama"]
    cfg = HFSource(src, "llama").model_config
    lora = LoRAConfig(r=4, alpha=8.0)
    adapter = write_adapter(str(tmp_path / "adapter"), cfg, lora, random_adapter(cfg, lora),
                            tp=1, pp=1)
    common = ["--load-model-type", "hf", "--save-model-type", "hf", "--load-dir", src,
              "--model-type-hf", "llama", "--save-dir", str(tmp_path / "out"),
              "--lora-load", adapter]
    err = _cli(capsys, *common, "--lora-r", "16")
    assert "--lora-r 16 but the adapter has r=4" in err and adapter in err
    err = _cli(capsys, *common, "--lora-target-modules", "linear_qkv", "linear_proj")
    assert "--lora-target-modules linear_qkv linear_proj but the adapter targets" in err
    # An adapter trained on another model (hidden 64 -> 32 would not even build; use 2 layers).
    other = cfg.to_dict() | {"num_layers": 2}
    from mindlora.config import ModelConfig

    small = ModelConfig.from_dict(other)
    wrong = write_adapter(str(tmp_path / "wrong"), small, lora, random_adapter(small, lora),
                          tp=1, pp=1)
    err = _cli(capsys, *common[:-1], wrong)
    assert "adapter num_layers=2 but the base model has 4" in err
    # Factors whose shape disagrees with the r the metadata claims.
    liar = LoRAConfig(r=8, alpha=8.0)
    bad = write_adapter(str(tmp_path / "bad"), cfg, liar, random_adapter(cfg, lora), tp=2, pp=1)
    err = _cli(capsys, *common[:-1], bad)
    assert "rank 8 expects A (8, 64)" in err
    assert not os.path.exists(tmp_path / "out")


def test_save_dir_untouched_or_absent(hf_models, tmp_path, monkeypatch):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty"):
        run_convert(load_model_type="hf", save_model_type="mg", load_dir=hf_models["llama"],
                    model_type_hf="llama", save_dir=str(existing))
    assert os.listdir(existing) == ["keep.txt"]

    calls = []

    def boom(self, layer_id, full):
        calls.append(layer_id)
        if layer_id == 2:
            raise OSError("disk full (simulated)")
        return original(self, layer_id, full)

    original = HFWriter.write_layer
    monkeypatch.setattr(HFWriter, "write_layer", boom)
    with pytest.raises(OSError, match="simulated"):
        run_convert(load_model_type="hf", save_model_type="hf", load_dir=hf_models["llama"],
                    model_type_hf="llama", save_dir=str(tmp_path / "out"))
    assert calls == [0, 1, 2]  # it failed half-way, after writing had started
    assert not os.path.exists(tmp_path / "out")
    _no_leftovers(tmp_path)


def test_flag_combinations(hf_models, tmp_path, capsys):
    err = _cli(capsys, "--load-model-type", "hf", "--save-model-type", "mg", "--load-dir",
               hf_models["llama"], "--save-dir", str(tmp_path / "o"), "--save-lora-to-hf")
    assert "--model-type-hf is required" in err and "--save-lora-to-hf needs --lora-load" in err
    cfg = HFSource(hf_models["llama"], "llama").model_config
    lora = LoRAConfig(r=2, alpha=2.0)
    adapter = write_adapter(str(tmp_path / "a"), cfg, lora, random_adapter(cfg, lora), 1, 1)
    err = _cli(capsys, "--load-model-type", "mg", "--save-model-type", "hf", "--load-dir",
               adapter, "--save-dir", str(tmp_path / "o"))
    assert "is an adapter: export it with --save-lora-to-hf" in err
    assert torch.load(fmt.rank_file_path(adapter, 7, 0, 0, 1), weights_only=True)["optimizer"]
