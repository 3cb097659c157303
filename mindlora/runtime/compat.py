"""The one place where megatron-core 0.16.1 is adapted to run on CPU with gloo.

megatron-core assumes CUDA in three ways; each adaptation below is applied only when the
runtime device is the CPU (on CUDA/NPU nothing here runs; Ascend has ``npu_compat.py``) and each
has its own test in ``tests/runtime/test_compat.py``. A CPU run on a host that also has GPUs (the
CPU test suite on a GPU machine) is still a CPU run: the process never touches CUDA, so the
patches apply there too.

1. ``torch.cuda.current_device()`` is used as a ``device=`` argument in ~175 places (buffers, RoPE,
   p2p shape exchange). On a CPU-only build it raises; we make it return the CPU device.
   ``torch.cuda.synchronize()`` (called after p2p batches) becomes a no-op for the same reason,
   and ``Tensor.cuda()`` (the tied-embedding copy on the last pipeline stage) keeps the tensor
   where it is.
2. The model-parallel RNG tracker (``tensor_parallel.random``) keeps CUDA generator states. We
   install a tracker with the same interface that keeps CPU generator states, so dropout inside
   tensor-parallel regions still forks a per-TP-rank stream. Activation recomputation saves and
   restores "the CUDA RNG state" beside the CPU one; on CPU there is none, so those two helpers
   return an empty state and restore nothing (the CPU state is saved by megatron-core itself).
3. A few modules write ``device="cuda"`` literally: the pipeline schedules (token counts), the
   default causal mask (``transformer.utils``) and the rerun state machine. Those modules (and only
   they) see a thin view of ``torch`` whose tensor factories map a CUDA device to the CPU; every
   other attribute is torch's own.

megatron-core's files are never edited; the patches are idempotent.
"""
from __future__ import annotations

import contextlib
import functools
import types
from typing import Any

import torch

_APPLIED = False


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _noop_synchronize(device: Any = None) -> None:
    return None


def _tensor_stays(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return self


def _patch_cuda_device_queries() -> None:
    torch.cuda.current_device = _cpu_current_device  # type: ignore[assignment]
    torch.cuda.synchronize = _noop_synchronize  # type: ignore[assignment]
    torch.Tensor.cuda = _tensor_stays  # type: ignore[assignment]


class CpuRNGStatesTracker:
    """megatron-core's RNG tracker interface over CPU generator states.

    ``add`` registers a named stream seeded with ``seed``; ``fork`` swaps it into the CPU default
    generator for the duration of a ``with`` block and saves its advanced state on exit.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        gen = torch.Generator().manual_seed(seed)
        self.states_[name] = gen.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # model_parallel_cuda_manual_seed(force_reset_rng=True) would rebuild a CUDA tracker.
    mp_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    mp_random._get_cuda_rng_state = _no_cuda_rng_state
    mp_random._set_cuda_rng_state = _set_no_cuda_rng_state


def _no_cuda_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)  # host-tensor: RNG states are host byte tensors


def _set_no_cuda_rng_state(*args: Any, **kwargs: Any) -> None:
    return None


def _to_cpu_device(fn):
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "cuda":
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    return wrapper


class _CpuTorchView(types.ModuleType):
    """``torch`` as seen by one megatron module: factories map device="cuda" to the CPU."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "empty_like")

    def __init__(self) -> None:
        super().__init__("torch")
        for name in self._FACTORIES:
            setattr(self, name, _to_cpu_device(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.transformer.utils",
    "megatron.core.rerun_state_machine",
)


def _patch_cuda_literals() -> None:
    import importlib

    for name in CUDA_LITERAL_MODULES:
        module = importlib.import_module(name)
        if not isinstance(module.torch, _CpuTorchView):
            module.torch = _CpuTorchView()


def apply_cpu_compat() -> None:
    """Apply every CPU adaptation once (call only when the runtime device is the CPU).

    Whether the host has CUDA does not matter: the patches change what this process's
    megatron-core asks of ``torch.cuda``, and a CPU run asks nothing of the GPUs.
    """
    global _APPLIED
    if _APPLIED:
        return
    _patch_cuda_device_queries()
    _patch_rng_tracker()
    _patch_cuda_literals()
    _APPLIED = True
