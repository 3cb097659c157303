"""The indexed format is byte-compatible with megatron-core's IndexedDataset, both ways."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from mindlora.data.indexed import IndexedDataset, IndexedDatasetWriter, bin_path, idx_path

mcore = pytest.importorskip("megatron.core.datasets.indexed_dataset")


def _sequences(dtype, n=7, seed=0):
    rng = np.random.default_rng(seed)
    lo = -100 if np.issubdtype(dtype, np.signedinteger) else 0
    return [rng.integers(lo, 120, size=int(rng.integers(0, 9))).astype(dtype) for _ in range(n)]


@pytest.mark.parametrize("dtype", [np.int32, np.uint16, np.int64, np.float32])
def test_roundtrip_ours(tmp_path, dtype):
    seqs = _sequences(dtype)
    with IndexedDatasetWriter(tmp_path / "d", dtype) as w:
        for s in seqs[:3]:
            w.add_document(s)
        w.add_documents(np.concatenate(seqs[3:]), [len(s) for s in seqs[3:]])
    ds = IndexedDataset(tmp_path / "d")
    assert ds.dtype == np.dtype(dtype) and len(ds) == len(seqs) == ds.num_documents
    for got, want in zip((ds[i] for i in range(len(ds))), seqs):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(ds.get(1, 1, 2), seqs[1][1:3])


def test_megatron_reads_ours(tmp_path):
    seqs = _sequences(np.int32)
    with IndexedDatasetWriter(tmp_path / "ours") as w:
        for s in seqs:
            w.add_document(s)
    theirs = mcore.IndexedDataset(str(tmp_path / "ours"))
    assert len(theirs) == len(seqs)
    np.testing.assert_array_equal(theirs.document_indices, np.arange(len(seqs) + 1))
    for i, s in enumerate(seqs):
        np.testing.assert_array_equal(theirs[i], s)


def test_ours_reads_megatron_multi_sequence_documents(tmp_path):
    seqs = _sequences(np.int32, n=6, seed=1)
    builder = mcore.IndexedDatasetBuilder(bin_path(tmp_path / "m"), dtype=np.int32)
    builder.add_item(torch.from_numpy(seqs[0]))
    builder.add_item(torch.from_numpy(seqs[1]))
    builder.end_document()  # one document of two sequences
    for s in seqs[2:]:
        builder.add_item(torch.from_numpy(s))
        builder.end_document()
    builder.finalize(idx_path(tmp_path / "m"))
    ds = IndexedDataset(tmp_path / "m")
    assert len(ds) == 6 and ds.num_documents == 5
    np.testing.assert_array_equal(ds.document(0), np.concatenate(seqs[:2]))
    np.testing.assert_array_equal(ds.document(4), seqs[5])


def test_same_bytes_as_megatron_builder(tmp_path):
    seqs = _sequences(np.int32, n=9, seed=2)
    builder = mcore.IndexedDatasetBuilder(bin_path(tmp_path / "m"), dtype=np.int32)
    with IndexedDatasetWriter(tmp_path / "o") as w:
        for s in seqs:
            builder.add_item(torch.from_numpy(s))
            builder.end_document()
            w.add_document(s)
    builder.finalize(idx_path(tmp_path / "m"))
    for path in (bin_path, idx_path):
        assert open(path(tmp_path / "o"), "rb").read() == open(path(tmp_path / "m"), "rb").read()


def test_abort_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "x") as w:
            w.add_document([1, 2, 3])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.bin.*nope\.idx"):
        IndexedDataset(tmp_path / "nope")
    with IndexedDatasetWriter(tmp_path / "c") as w:
        w.add_document(np.arange(10))
    raw = open(idx_path(tmp_path / "c"), "rb").read()
    open(idx_path(tmp_path / "c"), "wb").write(b"XXXXXXXXX" + raw[9:])
    with pytest.raises(ValueError, match="bad header"):
        IndexedDataset(tmp_path / "c")
    open(idx_path(tmp_path / "c"), "wb").write(raw)
    open(bin_path(tmp_path / "c"), "r+b").truncate(8)
    with pytest.raises(ValueError, match="truncated data"):
        IndexedDataset(tmp_path / "c")


def test_pickle_reopens_instead_of_copying(tmp_path):
    with IndexedDatasetWriter(tmp_path / "p") as w:
        w.add_document(np.arange(100_000))
    ds = IndexedDataset(tmp_path / "p")
    blob = pickle.dumps(ds)
    assert len(blob) < 1000  # the 400 kB of data did not travel
    np.testing.assert_array_equal(pickle.loads(blob)[0], np.arange(100_000))
