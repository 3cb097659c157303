"""The one place where megatron-core 0.16.1 is adapted to Ascend NPUs (torch_npu, HCCL).

Applied by :func:`mindlora.runtime.init_distributed` only when the runtime device is ``npu``
(which needs ``torch_npu``); on CUDA and on the CPU nothing here runs. Two adaptations:

1. ``torch_npu.contrib.transfer_to_npu``, Ascend's own adapter for CUDA code: it maps the
   ``torch.cuda.*`` API (``current_device``, ``set_device``, ``synchronize``, RNG, memory
   queries, ``Tensor.cuda``) and ``device="cuda"`` arguments of tensor factories to the NPU, and
   the ``nccl`` backend name to ``hccl``. That covers megatron-core's ~175
   ``torch.cuda.current_device()`` call sites and the ``device="cuda"`` literals of the pipeline
   schedules, the causal mask and the rerun state machine (MindSpeed does the same).
2. megatron-core's RNG helpers ``_get_cuda_rng_state``/``_set_cuda_rng_state`` reach into
   ``torch.cuda.default_generators`` and ``torch._C._cuda_setRNGState``, which (1) does not map;
   they are pointed at the NPU generator, so the model-parallel tracker forks per-TP-rank
   dropout streams on the NPU and activation recomputation replays them.

Adaptation 2 is recorded and :func:`undo_npu_compat` puts megatron-core's helpers back (the same
shape as ``compat.py``). Adaptation 1 is Ascend's own process-wide adapter and cannot be taken
back once imported; it is meant for the whole NPU process, which runs nothing on CUDA.

Nothing in this module has run on an Ascend NPU yet: ``tests/runtime/test_npu_compat.py`` checks
it on the CPU against a stand-in ``torch_npu``. megatron-core's files are never edited.
"""
from __future__ import annotations

import importlib.util
from typing import Any

import torch

# (owner, attribute, value before the patch); empty when the RNG helpers are megatron's own.
_UNDO: list[tuple[Any, str, Any]] = []


def _npu_get_rng_state(device: Any = "npu", clone: bool = False,
                       graph_safe: bool = False) -> torch.Tensor:
    """megatron's ``_get_cuda_rng_state`` on the NPU (no graph-safe states there)."""
    return torch.npu.get_rng_state()  # type: ignore[attr-defined]


def _npu_set_rng_state(new_state: torch.Tensor, device: Any = -1,
                       graph_safe: bool = False) -> None:
    """megatron's ``_set_cuda_rng_state`` on the NPU."""
    torch.npu.set_rng_state(new_state)  # type: ignore[attr-defined]


def apply_npu_compat() -> None:
    """Apply the Ascend adaptations once (call only when the runtime device is the NPU)."""
    if _UNDO:
        return
    if importlib.util.find_spec("torch_npu") is None:
        raise RuntimeError("the runtime device is an Ascend NPU but torch_npu is not installed "
                           "(pip install torch-npu matching your torch and CANN versions)")
    import torch_npu  # noqa: F401  (registers torch.npu)
    from torch_npu.contrib import transfer_to_npu  # noqa: F401  (adaptation 1, on import)
    from megatron.core.tensor_parallel import random as mp_random

    for name, value in (("_get_cuda_rng_state", _npu_get_rng_state),
                        ("_set_cuda_rng_state", _npu_set_rng_state)):
        _UNDO.append((mp_random, name, getattr(mp_random, name)))
        setattr(mp_random, name, value)


def undo_npu_compat() -> None:
    """Give megatron-core its own RNG helpers back (``transfer_to_npu`` stays, see above)."""
    while _UNDO:
        owner, name, value = _UNDO.pop()
        setattr(owner, name, value)
