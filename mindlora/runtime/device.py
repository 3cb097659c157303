"""Pick the device and collective backend once: CUDA -> nccl, Ascend NPU -> hccl, CPU -> gloo.

Everything else in mindlora asks :func:`current` instead of testing ``torch.cuda`` itself, so the
NCCL, HCCL and gloo paths differ only here. The device a process runs on is chosen once, by
:func:`mindlora.runtime.init_distributed` (which calls :func:`select`); from then on
:func:`current` returns that choice even on a host whose other accelerators are visible, so a CPU
run on a GPU machine stays a CPU run. ``MINDLORA_DEVICE=cpu|cuda|npu`` overrides detection.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Optional

import torch

_BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}


@dataclass(frozen=True)
class Device:
    """The accelerator kind this process runs on."""

    kind: str
    """``cuda``, ``npu`` or ``cpu``."""
    backend: str
    """torch.distributed backend: ``nccl``, ``hccl`` or ``gloo``."""

    @property
    def is_cpu(self) -> bool:
        return self.kind == "cpu"

    def torch_device(self, local_rank: Optional[int] = None) -> torch.device:
        """``cpu``, or ``<kind>:<local rank>`` (torchrun's ``LOCAL_RANK`` unless given).

        Every rank of a node binds its own accelerator: Megatron's convention, also on Ascend.
        """
        if self.is_cpu:
            return torch.device("cpu")
        if local_rank is None:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device(self.kind, local_rank)

    def set_local(self, local_rank: int) -> None:
        """Bind this process to its accelerator (no-op on CPU)."""
        if self.kind == "cuda":
            torch.cuda.set_device(local_rank)
        elif self.kind == "npu":
            torch.npu.set_device(local_rank)  # type: ignore[attr-defined]

    def synchronize(self) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize()
        elif self.kind == "npu":
            torch.npu.synchronize()  # type: ignore[attr-defined]

    def max_memory_allocated(self) -> int:
        """Peak bytes on the accelerator, or the process's peak RSS on CPU."""
        if self.kind == "cuda":
            return torch.cuda.max_memory_allocated()
        if self.kind == "npu":
            return torch.npu.max_memory_allocated()  # type: ignore[attr-defined]
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_SELECTED: Optional[Device] = None


def _make(kind: str) -> Device:
    backend = _BACKENDS.get(kind)
    if backend is None:
        raise ValueError(f"unknown device kind {kind!r}; expected cuda, npu or cpu")
    return Device(kind, backend)


@functools.lru_cache(maxsize=None)
def _detect() -> Device:
    forced = os.environ.get("MINDLORA_DEVICE")
    if forced:
        return _make(forced)
    if torch.cuda.is_available():
        return _make("cuda")
    if importlib.util.find_spec("torch_npu") is not None:
        import torch_npu  # noqa: F401  (registers torch.npu)

        if torch.npu.is_available():  # type: ignore[attr-defined]
            return _make("npu")
    return _make("cpu")


def current(force: str | None = None) -> Device:
    """The device this process uses.

    Args:
        force: ``cpu``/``cuda``/``npu``: that device, whatever was selected or detected.
    Returns the device chosen by :func:`select` (``init_distributed`` selects), else the
    detected one (``MINDLORA_DEVICE``, then CUDA, then an Ascend NPU, then the CPU).
    """
    if force is not None:
        return _make(force)
    return _SELECTED if _SELECTED is not None else _detect()


def select(device: Optional[Device]) -> None:
    """Make ``device`` this process's runtime device (``None``: back to detection)."""
    global _SELECTED
    _SELECTED = device


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move a host batch to ``device``: pinned host memory, then an asynchronous copy.

    The copy is ordered on the current stream, so the forward that consumes it waits for it
    without a host synchronisation. On the CPU the batch is returned as is.
    """
    if device.type == "cpu":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}
