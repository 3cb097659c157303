"""Megatron-LM / MindSpeed-LLM legacy checkpoints as base weights, and the ``args`` mindlora writes.

A checkpoint is written the way Megatron-LM writes it (tests/checkpoint/megatron_lm_files.py:
``args`` Namespace, ``checkpoint_version``, ``iteration``, transformer-engine keys, vocabulary
padded with garbage rows, numpy RNG state) at TP2 x PP2; it must convert to HF bit for bit and
reshard to exactly what converting the HF model gives. Training on it: tests/training.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from mindlora.checkpoint import describe
from mindlora.checkpoint import megatron_format as fmt
from mindlora.checkpoint.megatron_lm import LegacyLayout
from mindlora.checkpoint.reshard import MegatronReader
from tests.checkpoint.conftest import assert_same_tensors, load_hf_tensors, run_convert
from tests.checkpoint.megatron_lm_files import to_megatron_lm


def _model_dicts(root):
    reader = MegatronReader(root)
    return {(t, p): fmt.load_rank_file(reader.path(t, p), mmap=False)["model"]
            for p in range(reader.pp) for t in range(reader.tp)}


@pytest.mark.parametrize("name,layers", [("qwen2", None), ("qwen3", [1, 3])])
def test_megatron_lm_checkpoint_converts_bit_exact(hf_models, tmp_path, name, layers):
    src = hf_models[name]
    mg = str(tmp_path / "mg")
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=src, save_dir=mg,
                model_type_hf=name, target_tensor_parallel_size=2,
                target_pipeline_parallel_size=2, num_layer_list=layers)
    lm = to_megatron_lm(mg, str(tmp_path / "lm"),
                        lora_args={"num_layer_list": "1,3"} if layers else None)
    raw = fmt.load_rank_file(fmt.rank_file_path(lm, 1000, 1, 1, 2))  # numpy RNG state too
    assert "mindlora" not in raw and raw["args"].padded_vocab_size == 320
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in raw["model"]

    # mg -> hf: the padding rows (random here) are cut with config.json's vocab_size
    out = str(tmp_path / "hf")
    run_convert(load_model_type="mg", save_model_type="hf", load_dir=lm, save_dir=out,
                hf_cfg_dir=src)
    assert_same_tensors(load_hf_tensors(src), load_hf_tensors(out))
    assert open(os.path.join(out, "tokenizer.json")).read() == open(
        os.path.join(src, "tokenizer.json")).read()

    # mg -> mg: resharding it gives exactly what converting the HF model to TP1 gives
    a, b = str(tmp_path / "tp1_from_lm"), str(tmp_path / "tp1_from_hf")
    run_convert(load_model_type="mg", save_model_type="mg", load_dir=lm, save_dir=a,
                hf_cfg_dir=src)
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=src, save_dir=b,
                model_type_hf=name)
    assert_same_tensors(_model_dicts(a)[0, 0], _model_dicts(b)[0, 0])
    assert MegatronReader(a).model_config == MegatronReader(b).model_config


def test_megatron_lm_checkpoint_errors_name_the_problem(hf_models, tmp_path):
    src = hf_models["qwen2"]
    mg = str(tmp_path / "mg")
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=src, save_dir=mg,
                model_type_hf="qwen2", target_tensor_parallel_size=2,
                target_pipeline_parallel_size=2)
    lm = to_megatron_lm(mg, str(tmp_path / "lm"))
    with pytest.raises(ValueError, match=r"the true vocabulary size is unknown .*--hf-cfg-dir"):
        run_convert(load_model_type="mg", save_model_type="hf", load_dir=lm,
                    save_dir=str(tmp_path / "x"))
    bad = to_megatron_lm(mg, str(tmp_path / "bad"), lora_args={"num_layer_list": "1,3"})
    with pytest.raises(ValueError, match=r"layers per \(stage, chunk\) \[\[2\], \[2\]\] differ "
                                         r"from what args say \(\[\[1\], \[3\]\]"):
        describe.read_checkpoint_meta(bad, hf_config_dir=src)
    wrong = to_megatron_lm(mg, str(tmp_path / "wrong"), lora_args={"hidden_size": 32})
    with pytest.raises(ValueError, match=r"hidden_size: args 32, config.json 64"):
        describe.read_checkpoint_meta(wrong, hf_config_dir=src)
    os.remove(fmt.rank_file_path(lm, 1000, 1, 1, 2))
    with pytest.raises(FileNotFoundError, match=r"mp_rank_01_001/model_optim_rng.pt"):
        describe.read_checkpoint_meta(lm, hf_config_dir=src)


def test_mindlora_checkpoints_carry_megatron_args(hf_models, tmp_path):
    """The args mindlora writes describe the model completely: a reader that ignores the
    ``mindlora`` metadata (as Megatron-LM / MindSpeed-LLM tools do) derives the same model."""
    mg = str(tmp_path / "mg")
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=hf_models["qwen3"],
                save_dir=mg, model_type_hf="qwen3", target_tensor_parallel_size=2,
                target_pipeline_parallel_size=2, num_layer_list=[3, 1])
    payload = torch.load(fmt.rank_file_path(mg, 1, 0, 1, 2), weights_only=True)
    args = payload["args"]
    assert (args.num_layers, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
            args.num_layer_list, args.qk_layernorm, args.kv_channels) == (4, 2, 2, "3,1", True, 32)
    stripped = str(tmp_path / "stripped")
    shutil.copytree(mg, stripped)
    for p in range(2):
        for t in range(2):
            path = fmt.rank_file_path(stripped, 1, t, p, 2)
            data = fmt.load_rank_file(path, mmap=False)
            del data["mindlora"]
            torch.save(data, path)
    theirs = LegacyLayout(stripped, 1).metas
    ours = MegatronReader(mg)
    assert theirs[1, 1]["model_config"] == ours.meta["model_config"]
    assert theirs[1, 1]["layer_ids"] == {"model": [3]}
    out_a, out_b = str(tmp_path / "a"), str(tmp_path / "b")
    run_convert(load_model_type="mg", save_model_type="hf", load_dir=stripped, save_dir=out_a)
    run_convert(load_model_type="mg", save_model_type="hf", load_dir=mg, save_dir=out_b)
    assert_same_tensors(load_hf_tensors(out_a), load_hf_tensors(out_b))


def test_megatron_lm_interleaved_checkpoint(hf_models, tmp_path):
    """VPP: ``model0``/``model1`` per stage, chunk (p, v) holding global layer v * 2 + p."""
    from tests.checkpoint.megatron_lm_files import TE, megatron_args

    src = hf_models["llama"]
    tp1 = str(tmp_path / "tp1")
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=src, save_dir=tp1,
                model_type_hf="llama")
    reader = MegatronReader(tp1)
    args = megatron_args(reader, 256, 128, pipeline_model_parallel_size=2,
                         virtual_pipeline_model_parallel_size=2,
                         num_layers_per_virtual_pipeline_stage=1)
    root = str(tmp_path / "vpp")
    for p in range(2):
        payload = {"args": args, "checkpoint_version": 3.0, "iteration": 5}
        for v in range(2):
            layer = {f"decoder.layers.0.{TE.get(k, k)}": t
                     for k, t in reader.full_layer(v * 2 + p).items()}
            if (p, v) == (0, 0):
                layer["embedding.word_embeddings.weight"] = reader.full_global(
                    "embedding.word_embeddings.weight")
            if (p, v) == (1, 1):
                for key in ("decoder.final_layernorm.weight", "output_layer.weight"):
                    layer[key] = reader.full_global(key)
            payload[f"model{v}"] = layer
        path = fmt.rank_file_path(root, 5, 0, p, 2)
        os.makedirs(os.path.dirname(path))
        torch.save(payload, path)
    fmt.write_tracker(root, 5)
    meta = describe.read_checkpoint_meta(root, hf_config_dir=src)[1]
    assert meta["vpp"] == 2 and meta["layer_ids"] == {"model0": [0], "model1": [2]}
    out = str(tmp_path / "hf")
    run_convert(load_model_type="mg", save_model_type="hf", load_dir=root, save_dir=out,
                hf_cfg_dir=src)
    assert_same_tensors(load_hf_tensors(src), load_hf_tensors(out))
