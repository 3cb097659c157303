"""File formats on their own: streamed rank files and safetensors, atomic writes, clear errors."""
from __future__ import annotations

import argparse
import os

import pytest
import torch
from safetensors.torch import load_file

from mindlora.checkpoint import describe
from mindlora.checkpoint import megatron_format as fmt
from mindlora.checkpoint.rank_writer import StreamingRankFile
from mindlora.checkpoint.safetensors_io import (SafetensorsFile, StreamingSafetensorsWriter,
                                                parse_size)
from mindlora.config import ModelConfig

CFG = ModelConfig(family="llama", num_layers=2, hidden_size=8, ffn_hidden_size=16,
                  num_attention_heads=2, num_query_groups=1, vocab_size=32)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(5, 3, generator=g),
            "b.weight": torch.randn(7, generator=g).to(torch.bfloat16),
            "c.weight": torch.randn(2, 2, generator=g).half()}


def test_streamed_rank_file_reads_like_torch_save(tmp_path):
    data = _tensors()
    meta = fmt.build_meta("base", CFG, 1, 1, None, {"model": [0, 1]}, 32, torch.float32)
    skeleton = {"model": {k: v.to("meta") for k, v in data.items()}, "checkpoint_version": 3.0,
                "iteration": 1, "mindlora": meta}
    path = str(tmp_path / "model_optim_rng.pt")
    f = StreamingRankFile(path, skeleton)
    f.write({("model", "b.weight"): data["b.weight"]})
    with pytest.raises(RuntimeError, match="never written"):
        f.close()
    f.write({("model", k): data[k] for k in ("c.weight", "a.weight")})
    f.close()
    with pytest.raises(KeyError, match="written already"):
        f.write({("model", "a.weight"): data["a.weight"]})
    for mmap in (True, False):
        loaded = torch.load(path, weights_only=True, mmap=mmap)
        assert list(loaded["model"]) == list(data)
        for k in data:
            assert loaded["model"][k].dtype == data[k].dtype
            assert torch.equal(loaded["model"][k], data[k]), k
        assert loaded["mindlora"] == meta and loaded["iteration"] == 1


def test_streamed_rank_file_rejects_wrong_shape(tmp_path):
    skeleton = {"model": {"a": torch.empty(2, 2, device="meta")}}
    f = StreamingRankFile(str(tmp_path / "x.pt"), skeleton)
    with pytest.raises(ValueError, match="planned as"):
        f.write({("model", "a"): torch.zeros(2, 3)})


def test_rank_file_atomic_write_and_meta(tmp_path):
    root = str(tmp_path)
    meta = fmt.build_meta("base", CFG, 2, 2, None, {"model": [0]}, 32, torch.bfloat16)
    for t in range(2):
        for p in range(2):
            fmt.write_rank_file(fmt.rank_file_path(root, 3, t, p, 2),
                               {"model": {}, "mindlora": {**meta, "tp_rank": t, "pp_rank": p}})
    fmt.write_tracker(root, 3)
    assert os.path.isfile(os.path.join(root, "iter_0000003", "mp_rank_01_001", fmt.RANK_FILE))
    assert not [n for n in os.listdir(os.path.join(root, "iter_0000003", "mp_rank_00_000"))
                if n != fmt.RANK_FILE]  # no temp file left behind
    it, got = describe.read_checkpoint_meta(root)
    assert it == 3 and got["params_dtype"] == "bfloat16" and got["pp"] == 2


def test_foreign_checkpoints_without_usable_args_are_refused_clearly(tmp_path):
    root = str(tmp_path / "a")
    path = fmt.rank_file_path(root, "release", 0, 0, 1)
    fmt.write_rank_file(path, {"model": {"x": torch.zeros(1)},
                              "args": argparse.Namespace(tensor_model_parallel_size=1)})
    fmt.write_tracker(root, "release")
    with pytest.raises(ValueError, match=r"Megatron args in .*mp_rank_00/model_optim_rng.pt:\n"
                                         r"  - args.num_layers is missing"):
        describe.read_checkpoint_meta(root)
    root = str(tmp_path / "b")
    fmt.write_rank_file(fmt.rank_file_path(root, "release", 0, 0, 1), {"model": {}})
    fmt.write_tracker(root, "release")
    with pytest.raises(ValueError, match=r"mp_rank_00/model_optim_rng.pt has neither 'mindlora' "
                                         r"metadata nor Megatron 'args'"):
        describe.read_checkpoint_meta(root)


def test_truncated_rank_file_names_the_file(tmp_path):
    path = str(tmp_path / "model_optim_rng.pt")
    torch.save({"model": {"x": torch.randn(100)}}, path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match=r"model_optim_rng.pt is not a readable torch checkpoint"):
        fmt.load_rank_file(path)
    with pytest.raises(FileNotFoundError, match="missing checkpoint file"):
        fmt.load_rank_file(str(tmp_path / "nope.pt"))


def test_streamed_safetensors_shards_read_by_safetensors(tmp_path):
    data = _tensors()
    plan = [(k, v.to("meta")) for k, v in data.items()]
    w = StreamingSafetensorsWriter(str(tmp_path), plan, max_shard_bytes=60)
    assert len(w.files) == 2  # a.weight (60 bytes) alone, then b and c
    for k in reversed(list(data)):
        w.write(k, data[k])
    w.close()
    got = {}
    for name in w.files:
        got.update(load_file(str(tmp_path / name)))
        assert SafetensorsFile(str(tmp_path / name)).entries  # our reader agrees
    assert all(torch.equal(got[k], data[k]) and got[k].dtype == data[k].dtype for k in data)


def test_truncated_safetensors_is_reported_up_front(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "model.safetensors")
    save_file(_tensors(), path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 4)
    with pytest.raises(ValueError, match=r"model.safetensors is truncated"):
        SafetensorsFile(path)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("1024") == 1024 and parse_size("0.5MB") == 500_000
    with pytest.raises(ValueError, match="--max-shard-size"):
        parse_size("lots")
