"""Megatron-LM's indexed dataset format (``.bin`` + ``.idx``): one writer, one reader.

Byte layout, so that files round-trip with ``megatron.core.datasets.indexed_dataset``:

``.idx``::

    b"MMIDIDX\\x00\\x00"          9-byte magic
    uint64   version = 1
    uint8    dtype code (see ``DTYPE_CODES``)
    uint64   sequence count  S
    uint64   document count  D  (entries of ``document_indices``, i.e. documents + 1)
    int32[S] sequence lengths (elements, not bytes)
    int64[S] sequence pointers (byte offsets into ``.bin``)
    int64[D] document indices (sequence index where each document ends; starts with 0)

``.bin`` is the raw concatenation of every sequence in that dtype, little-endian.

The writer writes under temporary names and only ``commit()`` renames them into place, so a
caller that writes several datasets can make them appear together or not at all.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO, Iterable

import numpy as np

from mindlora.runtime.files import AtomicPath

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# The code table megatron-core uses (DType enum); the order is part of the file format.
DTYPE_CODES: dict[int, type] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32,
    5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
_CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8


def idx_path(prefix: str | os.PathLike) -> str:
    """Path of the index file for a dataset prefix."""
    return f"{os.fspath(prefix)}.idx"


def bin_path(prefix: str | os.PathLike) -> str:
    """Path of the data file for a dataset prefix."""
    return f"{os.fspath(prefix)}.bin"


def require_dataset(prefix: str | os.PathLike) -> None:
    """Raise a FileNotFoundError that names both expected files when either is missing."""
    missing = [p for p in (bin_path(prefix), idx_path(prefix)) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"indexed dataset '{os.fspath(prefix)}' not found: expected {bin_path(prefix)} and "
            f"{idx_path(prefix)} (missing: {', '.join(missing)})")


class IndexedDatasetWriter:
    """Streams sequences into ``<prefix>.bin`` and writes ``<prefix>.idx`` on ``finalize``.

    Files are written under temporary names (``mindlora.runtime.files.AtomicPath``) and renamed
    by ``commit()``; ``abort()`` (also run when the ``with`` block raises) removes them, so an
    interrupted run leaves no half dataset.

    Args:
        prefix: output prefix (without ``.bin``/``.idx``).
        dtype: element type; int32 by default because labels hold -100.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: type = np.int32) -> None:
        if np.dtype(dtype) not in _CODE_OF:
            raise ValueError(f"dtype {dtype} cannot be stored; use one of "
                             f"{sorted(t.__name__ for t in DTYPE_CODES.values())}")
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._files = (AtomicPath(bin_path(self.prefix)), AtomicPath(idx_path(self.prefix)))
        self._bin: BinaryIO | None = open(self._files[0].tmp, "wb")
        self._lengths: list[int] = []
        self._doc_ends: list[int] = [0]
        self._finalized = False
        self._closed = False  # committed or aborted

    def add_item(self, values: np.ndarray | Iterable[int]) -> None:
        """Append one sequence (it joins the current document until ``end_document``)."""
        arr = np.ascontiguousarray(values, dtype=self.dtype)
        assert self._bin is not None, "writer already finalized or aborted"
        self._bin.write(arr.tobytes(order="C"))
        self._lengths.append(int(arr.size))

    def end_document(self) -> None:
        """Close the current document (the sequences added since the previous call)."""
        self._doc_ends.append(len(self._lengths))

    def add_document(self, values: np.ndarray | Iterable[int]) -> None:
        """Append a document made of exactly one sequence."""
        self.add_item(values)
        self.end_document()

    def add_documents(self, flat: np.ndarray, lengths: np.ndarray | list[int]) -> None:
        """Append many one-sequence documents at once: ``flat`` is their concatenation."""
        lengths = [int(n) for n in lengths]
        arr = np.ascontiguousarray(flat, dtype=self.dtype)
        if arr.size != sum(lengths):
            raise ValueError(f"{sum(lengths)} elements announced, {arr.size} given")
        assert self._bin is not None, "writer already finalized or aborted"
        self._bin.write(arr.tobytes(order="C"))
        start = len(self._lengths)
        self._lengths.extend(lengths)
        self._doc_ends.extend(range(start + 1, start + len(lengths) + 1))

    def __len__(self) -> int:
        return len(self._doc_ends) - 1

    def finalize(self) -> None:
        """Close ``.bin`` and write ``.idx`` (still under temporary names)."""
        assert self._bin is not None, "writer already finalized or aborted"
        self._bin.close()
        self._bin = None
        lengths = np.asarray(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        docs = np.asarray(self._doc_ends, dtype=np.int64)
        with open(self._files[1].tmp, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<Q", INDEX_VERSION))
            f.write(struct.pack("<B", _CODE_OF[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(docs)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(docs.tobytes(order="C"))
        self._finalized = True

    def commit(self) -> None:
        """Rename the finished files into place (``finalize`` first)."""
        if not self._finalized:
            self.finalize()
        for staged in self._files:
            staged.commit()
        self._closed = True

    def abort(self) -> None:
        """Drop everything written so far."""
        if self._bin is not None:
            self._bin.close()
            self._bin = None
        for staged in self._files:
            staged.abort()
        self._closed = True

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.commit()


class IndexedDataset:
    """Memory-mapped reader of an indexed dataset.

    ``ds[i]`` is sequence ``i`` as a read-only numpy view into the mapped ``.bin``; documents are
    ranges of sequences given by ``document_indices`` (our writers put one sequence per document).

    Args:
        prefix: dataset prefix (without ``.bin``/``.idx``).
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = os.fspath(prefix)
        require_dataset(self.prefix)
        path = idx_path(self.prefix)
        with open(path, "rb") as f:
            head = f.read(_HEADER_BYTES)
        if len(head) < _HEADER_BYTES or head[:9] != INDEX_HEADER:
            raise ValueError(f"{path}: not a Megatron indexed dataset index (bad header)")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
        if version != INDEX_VERSION:
            raise ValueError(f"{path}: index version {version} unsupported (expected 1)")
        if code not in DTYPE_CODES:
            raise ValueError(f"{path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = _HEADER_BYTES + n_seq * (4 + 8) + n_doc * 8
        if os.path.getsize(path) < expected:
            raise ValueError(f"{path}: truncated index ({os.path.getsize(path)} < {expected} bytes)")
        self._idx = np.memmap(path, mode="r", dtype=np.uint8)
        off = _HEADER_BYTES
        self.sequence_lengths = np.frombuffer(self._idx, np.int32, n_seq, off)
        off += 4 * n_seq
        self.sequence_pointers = np.frombuffer(self._idx, np.int64, n_seq, off)
        off += 8 * n_seq
        self.document_indices = np.frombuffer(self._idx, np.int64, n_doc, off)
        data_bytes = os.path.getsize(bin_path(self.prefix))
        need = int(self.sequence_lengths.astype(np.int64).sum()) * self.dtype.itemsize
        if data_bytes < need:
            raise ValueError(f"{bin_path(self.prefix)}: truncated data ({data_bytes} < {need} bytes)")
        # np.memmap refuses zero-length files; an empty dataset simply has nothing to map.
        self._bin = (np.memmap(bin_path(self.prefix), mode="r", dtype=np.uint8)
                     if data_bytes else np.zeros(0, np.uint8))

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getstate__(self) -> dict:
        # Pickling a memmap would copy the whole file; DataLoader workers reopen it instead.
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    @property
    def num_documents(self) -> int:
        """Number of documents (``document_indices`` holds one more entry)."""
        return max(len(self.document_indices) - 1, 0)

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences in {self.prefix}")
        i %= n
        return np.frombuffer(self._bin, self.dtype, int(self.sequence_lengths[i]),
                             int(self.sequence_pointers[i]))

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Elements ``[offset, offset + length)`` of sequence ``i`` without reading the rest."""
        seq_len = int(self.sequence_lengths[i])
        length = seq_len - offset if length is None else min(length, seq_len - offset)
        ptr = int(self.sequence_pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, self.dtype, max(length, 0), ptr)

    def document(self, d: int) -> np.ndarray:
        """All sequences of document ``d`` joined (a view when the document has one)."""
        lo, hi = int(self.document_indices[d]), int(self.document_indices[d + 1])
        if hi - lo == 1:
            return self[lo]
        return np.concatenate([self[j] for j in range(lo, hi)]) if hi > lo else \
            np.zeros(0, self.dtype)
