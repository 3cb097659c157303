"""Write a ``model_optim_rng.pt`` one layer at a time, so conversion never holds a whole rank file.

``torch.save`` needs every tensor in memory at once; for a TP1 x PP1 target that is the whole
model. Instead the file is laid out first from shapes alone (``torch.serialization.skip_data``
saves the pickle and reserves each tensor's bytes), then filled in place with plain positioned
writes as tensors become available, so the bytes go to the page cache, not to this process.

Where each tensor's bytes live is read back from the laid-out file itself: loading it with
``mmap=True`` maps the whole file once and gives every tensor a storage at its record's offset,
so (storage address - mapping base) is the file offset. That is checked against the zip
records' own offsets for every tensor before anything is written; any mismatch (a future torch
laying files out differently) is an error, never a silently misplaced tensor.

The result is an ordinary torch zip file that ``torch.load`` (with or without ``mmap``) reads like
any other. One caveat: the zip records' CRC32 fields describe the reserved bytes, not the data;
torch does not check them, but Python's ``zipfile.testzip`` would complain.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mindlora.checkpoint.megatron_format import allow_megatron_args

KeyPath = tuple[str, ...]
"""A tensor's place in a nested payload: ("model", "decoder.layers.0...")."""


def _fake_like(tree: Any, mode: FakeTensorMode) -> Any:
    """Replace every (meta) tensor in a nested dict by a CPU FakeTensor of the same shape."""
    if isinstance(tree, dict):
        return {k: _fake_like(v, mode) for k, v in tree.items()}
    if isinstance(tree, torch.Tensor):
        if tree.numel() == 0:
            raise ValueError("empty tensors cannot be streamed into a rank file")
        with mode:
            return torch.empty(tree.shape, dtype=tree.dtype, device="cpu")
    return tree


def _tensors(tree: Any, prefix: KeyPath = ()) -> dict[KeyPath, torch.Tensor]:
    if isinstance(tree, dict):
        out: dict[KeyPath, torch.Tensor] = {}
        for k, v in tree.items():
            out.update(_tensors(v, prefix + (k,)))
        return out
    return {prefix: tree} if isinstance(tree, torch.Tensor) else {}


def _locate(path: str) -> dict[KeyPath, int]:
    """File offset of every tensor's bytes in a torch zip file (see the module docstring)."""
    reader = torch._C.PyTorchFileReader(path)
    records = [n for n in reader.get_all_records() if n.startswith("data/")]
    offsets = sorted(reader.get_record_offset(n) for n in records)
    allow_megatron_args()  # the Megatron ``args`` in the skeleton
    loaded = _tensors(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    ptrs = sorted((t.untyped_storage().data_ptr(), key) for key, t in loaded.items())
    if len(ptrs) != len(offsets):
        raise RuntimeError(f"{path}: {len(ptrs)} tensors but {len(offsets)} data records")
    base = ptrs[0][0] - offsets[0]
    located = {}
    for (ptr, key), offset in zip(ptrs, offsets):
        if ptr - base != offset or loaded[key].storage_offset() != 0:
            raise RuntimeError(f"{path}: cannot locate {'/'.join(map(str, key))} in the file")
        located[key] = offset
    return located


class StreamingRankFile:
    """A rank file laid out from ``skeleton`` and filled tensor by tensor.

    Args:
        path: where to write (the caller renames the whole directory into place at the end).
        skeleton: the payload, with ``meta`` tensors (or any tensors; only shape and dtype count)
            standing for the data still to come.
    """

    def __init__(self, path: str, skeleton: dict[str, Any]) -> None:
        self.path = path
        self._planned = {k: (tuple(t.shape), t.dtype) for k, t in _tensors(skeleton).items()}
        with torch.serialization.skip_data(materialize_fake_tensors=True):
            torch.save(_fake_like(skeleton, FakeTensorMode()), path)
        self._offsets = _locate(path)
        self._pending = set(self._planned)

    def write(self, tensors: dict[KeyPath, torch.Tensor]) -> None:
        """Write tensors keyed by their path in the payload, e.g. ``("model", "x.weight")``."""
        fd = os.open(self.path, os.O_WRONLY)
        try:
            for key, value in tensors.items():
                name = "/".join(map(str, key))
                if key not in self._pending:
                    raise KeyError(f"{self.path}: {name} is not in the layout or was written "
                                   f"already")
                shape, dtype = self._planned[key]
                if tuple(value.shape) != shape or value.dtype != dtype:
                    raise ValueError(f"{self.path}: {name} planned as {shape} {dtype}, got "
                                     f"{tuple(value.shape)} {value.dtype}")
                data = memoryview(value.detach().contiguous().reshape(-1).view(torch.uint8)
                                  .numpy())
                offset, done = self._offsets[key], 0
                while done < len(data):
                    done += os.pwrite(fd, data[done:], offset + done)
                self._pending.discard(key)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Check that every planned tensor was written (a missing one would read as zeros)."""
        if self._pending:
            missing = sorted("/".join(map(str, p)) for p in self._pending)
            raise RuntimeError(f"{self.path}: {len(missing)} tensors never written, e.g. "
                               f"{missing[:3]}")
