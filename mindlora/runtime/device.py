"""Pick the device and collective backend once: CUDA -> nccl, Ascend NPU -> hccl, CPU -> gloo.

Everything else in mindlora asks :func:`current` instead of testing ``torch.cuda`` itself, so the
NCCL, HCCL and gloo paths differ only here.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch


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

    def torch_device(self, local_rank: int = 0) -> torch.device:
        return torch.device("cpu") if self.is_cpu else torch.device(self.kind, local_rank)

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


@functools.lru_cache(maxsize=None)
def current(force: str | None = None) -> Device:
    """The device this process should use.

    Args:
        force: ``cpu``/``cuda``/``npu`` to override detection (tests force ``cpu``).
    """
    kind = force
    if kind is None:
        if torch.cuda.is_available():
            kind = "cuda"
        elif importlib.util.find_spec("torch_npu") is not None:
            import torch_npu  # noqa: F401  (registers torch.npu)

            kind = "npu" if torch.npu.is_available() else "cpu"  # type: ignore[attr-defined]
        else:
            kind = "cpu"
    backend = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}.get(kind)
    if backend is None:
        raise ValueError(f"unknown device kind {kind!r}; expected cuda, npu or cpu")
    return Device(kind, backend)
