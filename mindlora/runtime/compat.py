"""The one place where megatron-core 0.16.1 is adapted to run on CPU with gloo: scoped, undoable.

megatron-core assumes CUDA in three ways. Each adaptation below changes what *named megatron-core
modules* see, never ``torch`` itself: no ``torch.cuda`` function and no ``Tensor`` method is
replaced for the process. Every change is recorded, so :func:`undo_cpu_compat` (or leaving the
:func:`cpu_compat` context) puts megatron-core back exactly as it was; tests use that so nothing
leaks into the rest of a pytest session. Applied only when the runtime device is the CPU
(``init_distributed`` applies it, ``destroy_parallel`` undoes it; Ascend has ``npu_compat.py``).
A CPU run on a host that also has GPUs is still a CPU run, so it applies there too.

1. ``torch.cuda.current_device()`` (a ``device=`` argument in ~175 places: buffers, RoPE, p2p
   shape exchange), ``torch.cuda.synchronize()`` (after p2p batches) and ``device="cuda"``
   literals (pipeline token counts, the default causal mask, the rerun state machine). Each
   module in :data:`CUDA_MODULES` gets a view of ``torch`` in its own namespace: tensor factories
   map a CUDA device to the CPU, ``torch.cuda.current_device()`` answers the CPU device and
   ``torch.cuda.synchronize()`` does nothing; every other attribute is torch's own.
2. ``Tensor.cuda()`` copies the tied output weight on the last pipeline stage
   (``LanguageModule.setup_embeddings_and_output_layer``). A method cannot be given a per-module
   view, so that one function is wrapped: ``.cuda()`` keeps the tensor where it is *while it
   runs* (single-threaded set-up), and is torch's own again when it returns.
3. The model-parallel RNG tracker (``tensor_parallel.random``) keeps CUDA generator states. A
   tracker with the same interface keeps CPU generator states, so dropout inside tensor-parallel
   regions still forks a per-TP-rank stream; activation recomputation's "CUDA RNG state" helpers
   return an empty state and restore nothing (megatron-core saves the CPU state itself).

megatron-core's files are never edited; applying twice is a no-op.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import types
from typing import Any, Iterator

import torch

# Every megatron-core module on mindlora's paths (train, generate, convert, PP/TP/DP, MoE) whose
# source calls torch.cuda.current_device / synchronize or writes device="cuda";
# tests/runtime/test_compat.py fails if a module loaded by a run does so and is missing here.
CUDA_MODULES = (
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.models.common.embeddings.rope_utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.optimizer",
    "megatron.core.parallel_state",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.rerun_state_machine",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.timers",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.module",
    "megatron.core.transformer.moe.experts",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.multi_token_prediction",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.utils",
    "megatron.core.utils",
)

# (owner, attribute, value before the patch), newest last; empty when nothing is applied.
_UNDO: list[tuple[Any, str, Any]] = []


def _set(owner: Any, name: str, value: Any) -> None:
    _UNDO.append((owner, name, getattr(owner, name)))
    setattr(owner, name, value)


def _to_cpu_device(fn):
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "cuda":
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    return wrapper


class _CpuCudaView(types.ModuleType):
    """``torch.cuda`` as seen by one megatron module: the current device is the CPU."""

    def __init__(self) -> None:
        super().__init__("torch.cuda")

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(device: Any = None) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _CpuTorchView(types.ModuleType):
    """``torch`` as seen by one megatron module: CUDA devices in factories and queries are the CPU."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "empty_like")

    def __init__(self) -> None:
        super().__init__("torch")
        for name in self._FACTORIES:
            setattr(self, name, _to_cpu_device(getattr(torch, name)))
        self.cuda = _CpuCudaView()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _view_cuda_modules() -> None:
    view = _CpuTorchView()
    for name in CUDA_MODULES:
        module = importlib.import_module(name)
        if module.torch is not torch:
            raise RuntimeError(f"{name}.torch is not torch; megatron-core changed under mindlora")
        _set(module, "torch", view)


@contextlib.contextmanager
def _tensor_cuda_stays() -> Iterator[None]:
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[assignment]


def _scope_tied_embedding_copy() -> None:
    from megatron.core.models.common.language_module.language_module import LanguageModule

    setup = LanguageModule.setup_embeddings_and_output_layer

    @functools.wraps(setup)
    def setup_on_cpu(self, *args: Any, **kwargs: Any):
        with _tensor_cuda_stays():
            return setup(self, *args, **kwargs)

    _set(LanguageModule, "setup_embeddings_and_output_layer", setup_on_cpu)


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


def _no_cuda_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)  # host-tensor: RNG states are host byte tensors


def _set_no_cuda_rng_state(*args: Any, **kwargs: Any) -> None:
    return None


def _cpu_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    _set(mp_random, "_CUDA_RNG_STATE_TRACKER", CpuRNGStatesTracker())
    _set(mp_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)
    # model_parallel_cuda_manual_seed(force_reset_rng=True) would rebuild a CUDA tracker.
    _set(mp_random, "CudaRNGStatesTracker", CpuRNGStatesTracker)
    _set(mp_random, "_get_cuda_rng_state", _no_cuda_rng_state)
    _set(mp_random, "_set_cuda_rng_state", _set_no_cuda_rng_state)


def is_applied() -> bool:
    return bool(_UNDO)


def apply_cpu_compat() -> None:
    """Apply every CPU adaptation (call only when the runtime device is the CPU); idempotent.

    Whether the host has CUDA does not matter: the adaptations change what this process's
    megatron-core asks of ``torch.cuda``, and a CPU run asks nothing of the GPUs.
    """
    if _UNDO:
        return
    try:
        _view_cuda_modules()
        _scope_tied_embedding_copy()
        _cpu_rng_tracker()
    except BaseException:
        undo_cpu_compat()
        raise


def undo_cpu_compat() -> None:
    """Put every patched megatron-core attribute back (newest first); a no-op when not applied."""
    while _UNDO:
        owner, name, value = _UNDO.pop()
        setattr(owner, name, value)


@contextlib.contextmanager
def cpu_compat() -> Iterator[None]:
    """The CPU adaptations for a ``with`` block; undone on exit unless they were on before."""
    was_applied = is_applied()
    apply_cpu_compat()
    try:
        yield
    finally:
        if not was_applied:
            undo_cpu_compat()
