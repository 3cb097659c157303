"""Every random-number stream a run draws from, captured and restored as one state.

An exact resume needs the same dropout masks after the restart as without it. The masks come
from the CPU default generator, the accelerator generators (CUDA: one per visible device; Ascend
NPU: the same) and megatron-core's model-parallel RNG tracker, whose named streams give each
tensor-parallel rank its own dropout inside TP regions. All of them are saved here, so a
checkpoint written on a GPU or an NPU resumes as exactly as one written on the CPU.

Accelerator states are taken for the runtime device's kind only: a CPU run on a GPU host never
initialises CUDA for its checkpoints. Checkpoints written before this module held ``cuda`` as a
single tensor (the current device's state); they still restore.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any, Optional

import torch

from mindlora.runtime.device import Device, current


def _accelerator(kind: str) -> Optional[ModuleType]:
    """``torch.cuda`` or ``torch.npu`` for an accelerator kind, ``None`` for the CPU."""
    if kind == "cuda":
        return torch.cuda
    if kind == "npu":
        return getattr(torch, "npu", None)
    return None


def _all_states(mod: ModuleType) -> list[torch.Tensor]:
    if hasattr(mod, "get_rng_state_all"):
        return list(mod.get_rng_state_all())
    return [mod.get_rng_state(i) for i in range(mod.device_count())]


def capture_rng_state(device: Optional[Device] = None) -> dict[str, Any]:
    """CPU, accelerator (every device of the runtime kind) and model-parallel tracker states."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    device = device or current()
    state: dict[str, Any] = {"cpu": torch.get_rng_state(),
                             "tracker": get_cuda_rng_tracker().get_states()}
    mod = _accelerator(device.kind)
    if mod is not None:
        state[device.kind] = _all_states(mod)
    return state


def restore_rng_state(state: dict[str, Any], device: Optional[Device] = None) -> None:
    """Put back what :func:`capture_rng_state` captured.

    Accelerator states restore per device index, for the devices both runs have; a state saved
    on another kind of device (a GPU checkpoint resumed on the CPU) leaves that kind alone.
    """
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    device = device or current()
    torch.set_rng_state(state["cpu"])
    get_cuda_rng_tracker().set_states(dict(state["tracker"]))
    mod = _accelerator(device.kind)
    saved = state.get(device.kind)
    if mod is None or saved is None:
        return
    if isinstance(saved, torch.Tensor):  # older checkpoints: the current device only
        mod.set_rng_state(saved)
        return
    for index, s in enumerate(saved[:mod.device_count()]):
        mod.set_rng_state(s, index)
