"""safetensors files read and written one tensor at a time, at known offsets.

The format is an 8-byte little-endian header length, a JSON header (``dtype``, ``shape``,
``data_offsets`` per tensor, optional ``__metadata__``) and the raw bytes. Parsing the header here
(rather than through ``safe_open``) lets a reader check up front that every file is complete (a
truncated shard is reported before anything is written) and read a tensor with one ``readinto``
into its own buffer, without mapping the file. Knowing shapes in advance lets the writer lay out
every shard first and then write tensors in any order, so output never buffers a whole shard.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Optional

import torch

from mindlora.runtime.dtypes import from_safetensors_code, safetensors_code



def read_header(path: str) -> tuple[int, dict]:
    """(offset of the data section, header dict) of one safetensors file, checked for truncation."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing safetensors file {path}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path} is truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise ValueError(f"{path} is truncated or not a safetensors file (header of {n} "
                             f"bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} has a corrupt safetensors header: {e}") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{path} is truncated: its header describes {8 + n + end} bytes but the "
                         f"file has {size}")
    return 8 + n, header


class SafetensorsFile:
    """Random access to the tensors of one safetensors file (header parsed once)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.data_start, header = read_header(path)
        header.pop("__metadata__", None)
        self.entries = header

    def meta(self, key: str) -> torch.Tensor:
        """A ``meta`` tensor with the stored shape and dtype."""
        e = self.entries[key]
        dtype = from_safetensors_code(e["dtype"])
        if dtype is None:
            raise ValueError(f"{self.path}: {key} has unsupported dtype {e['dtype']}")
        return torch.empty(e["shape"], dtype=dtype, device="meta")

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor into a fresh CPU buffer."""
        e = self.entries[key]
        out = torch.empty(e["shape"], dtype=self.meta(key).dtype)
        begin, end = e["data_offsets"]
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else b""
        if len(view) != end - begin:
            raise ValueError(f"{self.path}: {key} has {end - begin} bytes for shape {e['shape']}")
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            if view and f.readinto(view) != len(view):
                raise ValueError(f"{self.path} is truncated inside {key}")
        return out


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count -> bytes (HF's max_shard_size)."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "B": 1}
    t = str(text).strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit) and t[: -len(unit)].replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * factor)
    if t.isdigit():
        return int(t)
    raise ValueError(f"--max-shard-size {text!r}: expected e.g. 5GB, 500MB or a byte count")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class StreamingSafetensorsWriter:
    """Shards laid out from a plan of (key, meta tensor), then filled tensor by tensor.

    Args:
        directory: output folder.
        plan: every tensor to write, in file order, as (key, tensor with the final shape/dtype).
        max_shard_bytes: start a new shard before one would exceed this (a larger tensor gets a
            shard of its own).
        name: shard file name pattern with ``{index}`` and ``{total}``.
    """

    def __init__(self, directory: str, plan: Iterable[tuple[str, torch.Tensor]],
                 max_shard_bytes: int,
                 name: str = "model-{index:05d}-of-{total:05d}.safetensors") -> None:
        shards: list[list[tuple[str, torch.Tensor]]] = [[]]
        size = 0
        for key, t in plan:
            if shards[-1] and size + _nbytes(t) > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((key, t))
            size += _nbytes(t)
        self.directory = directory
        self.locations: dict[str, tuple[str, int, torch.Tensor]] = {}
        self.files = [name.format(index=i + 1, total=len(shards)) for i in range(len(shards))]
        self.total_size = 0
        for fname, entries in zip(self.files, shards):
            self._lay_out(fname, entries)
        self._pending = set(self.locations)

    def _lay_out(self, fname: str, entries: list[tuple[str, torch.Tensor]]) -> None:
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key, t in entries:
            if safetensors_code(t.dtype) is None:
                raise ValueError(f"{key}: dtype {t.dtype} cannot be written to safetensors")
            header[key] = {"dtype": safetensors_code(t.dtype), "shape": list(t.shape),
                           "data_offsets": [offset, offset + _nbytes(t)]}
            offset += _nbytes(t)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned
        path = os.path.join(self.directory, fname)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)
        start = 8 + len(raw)
        for key, t in entries:
            self.locations[key] = (path, start + header[key]["data_offsets"][0], t)
        self.total_size += offset

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor at its place."""
        if key not in self._pending:
            raise KeyError(f"{key} is not planned or was written already")
        path, offset, planned = self.locations[key]
        if tensor.shape != planned.shape or tensor.dtype != planned.dtype:
            raise ValueError(f"{key}: planned {tuple(planned.shape)} {planned.dtype}, got "
                             f"{tuple(tensor.shape)} {tensor.dtype}")
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(memoryview(data))
        self._pending.discard(key)

    def close(self, index_name: Optional[str] = "model.safetensors.index.json") -> None:
        """Check every tensor was written; write the HF index (weight_map) beside the shards."""
        if self._pending:
            raise RuntimeError(f"{len(self._pending)} tensors never written, e.g. "
                               f"{sorted(self._pending)[:3]}")
        if index_name:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {k: os.path.basename(p)
                                    for k, (p, _, _) in self.locations.items()}}
            with open(os.path.join(self.directory, index_name), "w") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
