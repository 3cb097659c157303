"""The training side: InstructionDataset, collate, blends, splits and the tokenizer check."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mindlora.data.dataset import (BlendedDataset, InstructionDataset, build_train_valid_test,
                                   collate, parse_data_path, split_dataset)
from mindlora.data.meta import check_tokenizer, read_dataset_meta
from tests.data.helpers import alpaca_records, preprocess


class _Range(torch.utils.data.Dataset):
    def __init__(self, n: int, tag: str) -> None:
        self.n, self.tag = n, tag

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        assert 0 <= i < self.n
        return (self.tag, i)


@pytest.fixture(scope="module")
def built(tmp_path_factory, hf_dir):
    return preprocess(tmp_path_factory.mktemp("ds"), alpaca_records(30), hf_dir)[0]


def test_instruction_dataset_and_truncation(built):
    full, short = InstructionDataset(built, 4096), InstructionDataset(built, 16)
    assert len(full) == len(short) == 30
    s = full[3]
    assert s["input_ids"].dtype == s["labels"].dtype == torch.long
    assert torch.equal(s["loss_mask"], (s["labels"] != -100).float())
    assert len(s["input_ids"]) > 16
    assert torch.equal(short[3]["input_ids"], s["input_ids"][:16])
    with pytest.raises(IndexError):
        full[30]


def test_missing_prefix_names_the_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope_packed_input_ids_document\.bin.*"
                                                r"nope_packed_labels_document\.idx"):
        InstructionDataset(str(tmp_path / "nope"), 128)


def test_collate_dynamic_and_fixed(built):
    ds = InstructionDataset(built, 4096)
    samples = [ds[0], ds[5], ds[7]]
    longest = max(len(s["input_ids"]) for s in samples)
    b = collate(samples, pad_id=0, pad_to_multiple_of=8)
    width = -(-longest // 8) * 8
    assert b["input_ids"].shape == b["labels"].shape == (3, width) and width % 8 == 0
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        assert torch.equal(b["input_ids"][row, :n], s["input_ids"])
        assert (b["input_ids"][row, n:] == 0).all() and (b["labels"][row, n:] == -100).all()
        assert b["attention_mask"][row].sum() == n and b["attention_mask"].dtype == torch.bool
    assert torch.equal(b["loss_mask"], (b["labels"] != -100).float())
    fixed = collate(samples, pad_id=7, seq_length=64)
    assert fixed["input_ids"].shape == (3, 64) and (fixed["input_ids"][0, -1] == 7)
    loader = DataLoader(ds, batch_size=4, collate_fn=lambda s: collate(s, 0, 8), num_workers=0)
    assert sum(batch["input_ids"].shape[0] for batch in loader) == 30


def test_blend_is_proportional_deterministic_and_seeded():
    a, b = _Range(50, "a"), _Range(7, "b")
    blend = BlendedDataset([a, b], [0.7, 0.3], size=1000, seed=3)
    items = [blend[i] for i in range(len(blend))]
    counts = {t: sum(1 for x, _ in items if x == t) for t in "ab"}
    assert counts == {"a": 700, "b": 300}
    assert all(abs(sum(1 for x, _ in items[:k] if x == "a") - 0.7 * k) <= 1.5
               for k in range(1, 1000))  # spread evenly, not 700 a's then 300 b's
    again = BlendedDataset([a, b], [0.7, 0.3], size=1000, seed=3)
    other = BlendedDataset([a, b], [0.7, 0.3], size=1000, seed=4)
    assert [again[i] for i in range(1000)] == items != [other[i] for i in range(1000)]
    first_epoch = [i for t, i in items if t == "a"][:50]
    assert sorted(first_epoch) == list(range(50))  # every sample once before any repeats


def test_split_dataset():
    train, valid, test = split_dataset(_Range(1000, "x"), "949,50,1")
    assert (len(train), len(valid), len(test)) == (949, 50, 1)
    assert list(train.indices) + list(valid.indices) + list(test.indices) == list(range(1000))
    train, valid, test = split_dataset(_Range(10, "x"), "90,10")
    assert (len(train), len(valid), len(test)) == (9, 1, 0)
    with pytest.raises(ValueError, match="--split"):
        split_dataset(_Range(10, "x"), "a,b")


def test_data_path_parsing_and_building(built):
    assert parse_data_path("0.7 A 0.3 B") == [(0.7, "A"), (0.3, "B")]
    assert parse_data_path("onlyprefix") == [(1.0, "onlyprefix")]
    with pytest.raises(ValueError, match=r"--data-path: 'x' is not a weight"):
        parse_data_path("x A 0.3 B")
    with pytest.raises(ValueError, match="--data-path"):
        parse_data_path("0.7 A 0.3")
    train, valid, test = build_train_valid_test(built, 64, "80,10,10")
    assert (len(train), len(valid), len(test)) == (24, 3, 3)
    train, valid, _ = build_train_valid_test(f"0.5 {built} 0.5 {built}", 64, "80,20,0")
    assert len(train) == 48 and len(valid) == 12
    assert set(train[0]) == {"input_ids", "labels", "loss_mask"}


def test_tokenizer_mismatch_is_refused(built, hf_tok, tmp_path):
    meta = read_dataset_meta(built)
    assert meta["vocab_size"] == hf_tok.vocab_size and meta["pack"] is False
    check_tokenizer(built, hf_tok.vocab_size, hf_tok.fingerprint)  # same tokenizer: fine
    with pytest.raises(ValueError, match=rf"vocab size {hf_tok.vocab_size}.*vocab size 999"):
        check_tokenizer(built, 999)
    with pytest.raises(ValueError, match="built with another tokenizer"):
        check_tokenizer(built, hf_tok.vocab_size, "0" * 64)
    with pytest.raises(FileNotFoundError, match=r"elsewhere_meta\.json not found"):
        read_dataset_meta(str(tmp_path / "elsewhere"))
    assert read_dataset_meta(str(tmp_path / "elsewhere"), required=False) is None
    check_tokenizer(str(tmp_path / "elsewhere"), 5)  # data without sidecar is accepted
    np.testing.assert_equal(meta["summary"]["written"], 30)


def test_packed_rows_carry_segment_ids(built, hf_dir, tmp_path):
    packed, _ = preprocess(tmp_path, alpaca_records(30), hf_dir, name="packed", pack=True,
                           seq_length=512)
    rows, plain = InstructionDataset(packed, 512), InstructionDataset(built, 4096)
    assert rows.packed and not plain.packed and "segment_ids" not in plain[0]
    seg = rows[0]["segment_ids"]
    assert seg.shape == rows[0]["input_ids"].shape and seg[0] == 1 and seg.max() > 1
    assert (seg.diff() >= 0).all(), "segment ids rise along the row"
    assert sum(int(rows[i]["segment_ids"].max()) for i in range(len(rows))) == len(plain)
    # A batch mixing a packed row and an unpacked sample: the sample is segment 1, padding 0.
    b = collate([rows[0], plain[0]], pad_id=0, pad_to_multiple_of=8)
    n0, n1 = len(seg), len(plain[0]["input_ids"])
    assert torch.equal(b["segment_ids"][0, :n0], seg) and (b["segment_ids"][0, n0:] == 0).all()
    assert (b["segment_ids"][1, :n1] == 1).all() and (b["segment_ids"][1, n1:] == 0).all()
    assert "segment_ids" not in collate([plain[0], plain[1]], pad_id=0)
