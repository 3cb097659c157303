"""Bit-exact round trips HF -> Megatron layouts -> HF, and the rank files' contents."""
from __future__ import annotations

import filecmp
import json
import os

import pytest
import torch

from mindlora.checkpoint import describe
from mindlora.checkpoint import megatron_format as fmt
from mindlora.checkpoint.loading import load_model_shard
from mindlora.parallel.layout import pad_vocab
from tests.checkpoint.conftest import (SPECS, assert_same_tensors, hf_logits, load_hf_tensors,
                                       run_convert)


@pytest.mark.parametrize("name", list(SPECS))
def test_hf_mg_hf_and_reshard_round_trips(hf_models, tmp_path, name):
    src = hf_models[name]
    family = SPECS[name]["family"]
    mg22, mg14 = str(tmp_path / "tp2pp2"), str(tmp_path / "tp1pp4")
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=src, save_dir=mg22,
                model_type_hf=family, target_tensor_parallel_size=2,
                target_pipeline_parallel_size=2)
    run_convert(load_model_type="mg", save_model_type="mg", load_dir=mg22, save_dir=mg14,
                target_pipeline_parallel_size=4)
    original = load_hf_tensors(src)
    for mg in (mg22, mg14):
        out = str(tmp_path / f"hf_from_{os.path.basename(mg)}")
        run_convert(load_model_type="mg", save_model_type="hf", load_dir=mg, save_dir=out,
                    max_shard_size="100KB")
        assert_same_tensors(load_hf_tensors(out), original)
        index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
        assert set(index["weight_map"]) == set(original)
        for asset in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            assert filecmp.cmp(os.path.join(src, asset), os.path.join(out, asset), shallow=False)
        a, b = (json.load(open(os.path.join(d, "config.json"))) for d in (src, out))
        assert a == b


def test_rank_file_contents_follow_the_contract(hf_models, tmp_path):
    """Keys, local layer ids, vocab padding, and the tied head copied to the last stage."""
    src = hf_models["qwen2"]
    root = str(tmp_path / "mg")
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=src, save_dir=root,
                model_type_hf="qwen2", target_tensor_parallel_size=2,
                target_pipeline_parallel_size=2, num_layer_list=[1, 3])
    assert open(os.path.join(root, fmt.TRACKER)).read() == "1"
    import megatron.core  # noqa: F401  registers argparse.Namespace (Megatron 'args') as safe
    first = torch.load(fmt.rank_file_path(root, 1, 1, 0, 2), weights_only=True)
    last = torch.load(fmt.rank_file_path(root, 1, 0, 1, 2), weights_only=True)
    assert first["mindlora"]["layer_ids"] == {"model": [0]}
    assert last["mindlora"]["layer_ids"] == {"model": [1, 2, 3]}
    assert first["checkpoint_version"] == 3.0 and first["mindlora"]["padded_vocab_size"] == 256
    emb = first["model"]["embedding.word_embeddings.weight"]
    assert emb.shape == (128, 64) and torch.count_nonzero(emb[-1]) == 0  # row 255 = padding
    assert "decoder.layers.2.self_attention.linear_qkv.bias" in last["model"]
    assert "decoder.layers.3.input_layernorm.weight" not in last["model"]
    assert {"output_layer.weight", "decoder.final_layernorm.weight"} <= set(last["model"])
    assert last["model"]["decoder.layers.0.mlp.linear_fc1.weight"].shape == (128, 64)

    tied = str(tmp_path / "tied")
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=hf_models["llama_tied"],
                save_dir=tied, model_type_hf="llama", target_pipeline_parallel_size=2)
    s0 = torch.load(fmt.rank_file_path(tied, 1, 0, 0, 2), weights_only=True)["model"]
    s1 = torch.load(fmt.rank_file_path(tied, 1, 0, 1, 2), weights_only=True)["model"]
    assert torch.equal(s1["output_layer.weight"], s0["embedding.word_embeddings.weight"])
    pp1 = str(tmp_path / "tied_pp1")
    run_convert(load_model_type="mg", save_model_type="mg", load_dir=tied, save_dir=pp1)
    assert "output_layer.weight" not in torch.load(fmt.rank_file_path(pp1, 1, 0, 0, 1),
                                                   weights_only=True)["model"]


def test_load_model_shard_reshards_any_layout(hf_models, tmp_path):
    """A TP1 chunk cut from a TP2 x PP2 checkpoint equals the TP1 x PP1 conversion's own file."""
    src = hf_models["qwen3"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=src, save_dir=a,
                model_type_hf="qwen3", target_tensor_parallel_size=2,
                target_pipeline_parallel_size=2)
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=src, save_dir=b,
                model_type_hf="qwen3")
    reference = torch.load(fmt.rank_file_path(b, 1, 0, 0, 1), weights_only=True)["model"]
    got = load_model_shard(a, 1, 0, [0, 1, 2, 3], True, True, True, 256)
    assert_same_tensors(got, reference)
    # A TP2 rank of the last two layers, from the TP1 checkpoint, equals the TP2 x PP2 file.
    want = torch.load(fmt.rank_file_path(a, 1, 1, 1, 2), weights_only=True)["model"]
    got = load_model_shard(b, 2, 1, [2, 3], False, True, True, pad_vocab(256, 2))
    assert_same_tensors(got, want)


def test_params_dtype_and_transformers_load(hf_models, tmp_path):
    src = hf_models["llama"]
    mg, hf = str(tmp_path / "mg"), str(tmp_path / "hf")
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=src, save_dir=mg,
                model_type_hf="llama", params_dtype="bf16", target_tensor_parallel_size=2)
    assert describe.read_checkpoint_meta(mg)[1]["params_dtype"] == "bfloat16"
    run_convert(load_model_type="mg", save_model_type="hf", load_dir=mg, save_dir=hf)
    tensors = load_hf_tensors(hf)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    original = load_hf_tensors(src)
    assert all(torch.equal(tensors[k], original[k].bfloat16()) for k in original)
    assert json.load(open(os.path.join(hf, "config.json")))["dtype"] == "bfloat16"
    ids = torch.randint(0, 256, (1, 6))
    got, want = hf_logits(hf, ids), hf_logits(src, ids)
    assert torch.allclose(got, want, atol=0.05)  # bf16 weights: coarse, but must load and run


def test_reads_interleaved_pipeline_checkpoints(hf_models, tmp_path):
    """A TP2 x PP2 x VPP2 checkpoint (model0/model1 chunks, as training saves) converts to HF."""
    from mindlora.checkpoint.hf_format import HFSource
    from mindlora.checkpoint.reshard import shard_tensor

    src = hf_models["qwen2"]
    cfg = HFSource(src, "qwen2").model_config
    tp1 = str(tmp_path / "tp1")
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=src, save_dir=tp1,
                model_type_hf="qwen2")
    full = torch.load(fmt.rank_file_path(tp1, 1, 0, 0, 1), weights_only=True)["model"]
    root, padded = str(tmp_path / "vpp"), pad_vocab(cfg.vocab_size, 2)
    for p in range(2):
        for t in range(2):
            payload, layer_ids = {}, {}
            for v in range(2):
                layer = v * 2 + p  # interleaved: chunk (p, v) follows all chunks of v - 1
                state = {k.replace(f"layers.{layer}.", "layers.0."): shard_tensor(k, x, 2, t)
                         for k, x in full.items() if k.startswith(f"decoder.layers.{layer}.")}
                if (p, v) == (0, 0):
                    state["embedding.word_embeddings.weight"] = shard_tensor(
                        "embedding.word_embeddings.weight",
                        full["embedding.word_embeddings.weight"], 2, t, padded)
                if (p, v) == (1, 1):
                    for k in ("decoder.final_layernorm.weight", "output_layer.weight"):
                        state[k] = shard_tensor(k, full[k], 2, t, padded)
                payload[f"model{v}"], layer_ids[f"model{v}"] = state, [layer]
            meta = fmt.build_meta("base", cfg, 2, 2, 2, layer_ids, padded, torch.float32,
                                 tp_rank=t, pp_rank=p)
            fmt.write_rank_file(fmt.rank_file_path(root, 5, t, p, 2),
                               {**payload, "checkpoint_version": 3.0, "iteration": 5,
                                "mindlora": meta})
    fmt.write_tracker(root, 5)
    out = str(tmp_path / "hf")
    run_convert(load_model_type="mg", save_model_type="hf", load_dir=root, save_dir=out)
    original = load_hf_tensors(src)
    assert_same_tensors(load_hf_tensors(out), original)
    # No hf_assets here: config.json is generated from the family, and transformers loads it.
    ids = torch.randint(0, 255, (1, 5))
    torch.testing.assert_close(hf_logits(out, ids), hf_logits(src, ids), atol=0, rtol=0)


def test_single_file_hf_model(hf_models, tmp_path):
    """A folder with one model.safetensors and no index converts like a sharded one."""
    import shutil

    from safetensors.torch import save_file

    src = str(tmp_path / "single")
    shutil.copytree(hf_models["llama_tied"], src,
                    ignore=shutil.ignore_patterns("model-*", "*.index.json"))
    original = load_hf_tensors(hf_models["llama_tied"])
    save_file(original, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    mg, out = str(tmp_path / "mg"), str(tmp_path / "out")
    run_convert(load_model_type="hf", save_model_type="mg", load_dir=src, save_dir=mg,
                model_type_hf="llama", target_tensor_parallel_size=2)
    run_convert(load_model_type="mg", save_model_type="hf", load_dir=mg, save_dir=out)
    assert_same_tensors(load_hf_tensors(out), original)
