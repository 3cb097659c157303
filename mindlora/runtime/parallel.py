"""Process-group set-up: torch.distributed from torchrun's env, then megatron-core parallel state.

Launch with ``torchrun`` (env:// rendezvous); tests spawn processes themselves and call
:func:`init_distributed` with explicit rank and world size.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from mindlora.config import ParallelConfig
from mindlora.runtime.device import Device, current, select


def init_distributed(device: Optional[Device] = None, rank: Optional[int] = None,
                     world_size: Optional[int] = None, timeout_s: int = 1800) -> Device:
    """Initialise torch.distributed once (env:// from torchrun unless rank/world_size given).

    A single process started without torchrun gets a world of one, so ``python -m mindlora.train``
    works on a laptop without a launcher.
    """
    device = device or current()
    select(device)
    apply_compat(device)
    if dist.is_initialized():
        return device
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if world_size > 1:
            raise ValueError("MASTER_PORT is not set: launch with torchrun (or set MASTER_ADDR "
                             "and MASTER_PORT) for more than one process")
        os.environ["MASTER_PORT"] = str(_free_port())
    device.set_local(device.torch_device().index or 0)
    dist.init_process_group(backend=device.backend, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    return device


def apply_compat(device: Device) -> None:
    """Adapt megatron-core to ``device``: the CPU module on CPU, the Ascend module on NPU.

    Scoped and reversible (see ``compat.py``): :func:`destroy_parallel` undoes it.
    """
    if device.kind == "cpu":
        from mindlora.runtime.compat import apply_cpu_compat

        apply_cpu_compat()
    elif device.kind == "npu":
        from mindlora.runtime.npu_compat import apply_npu_compat

        apply_npu_compat()


def undo_compat() -> None:
    """Take back what :func:`apply_compat` did to megatron-core (``destroy_parallel`` calls it)."""
    from mindlora.runtime.compat import undo_cpu_compat
    from mindlora.runtime.npu_compat import undo_npu_compat

    undo_cpu_compat()
    undo_npu_compat()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel(parallel: ParallelConfig, seed: int = 1234) -> None:
    """Build megatron-core's TP/PP/DP groups and seed the RNGs (torch.distributed must be up).

    Seeds the data-parallel default generator with ``seed`` and the tensor-parallel tracker with
    megatron-core's per-TP-rank offset, exactly as Megatron does on GPUs.
    """
    from megatron.core import parallel_state, tensor_parallel

    apply_compat(current())
    world = dist.get_world_size()
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if world % (tp * pp):
        raise ValueError(f"world size ({world}) must be a multiple of "
                         f"--tensor-model-parallel-size ({tp}) x "
                         f"--pipeline-model-parallel-size ({pp})")
    ep = parallel.expert_model_parallel_size
    if world % (tp * pp * ep):
        raise ValueError(f"world size ({world}) must be a multiple of "
                         f"--tensor-model-parallel-size ({tp}) x --pipeline-model-parallel-size "
                         f"({pp}) x --expert-model-parallel-size ({ep}) (experts are "
                         f"tensor-parallel like the dense layers)")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Tear down megatron-core state, the process group and the device adaptations."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    undo_compat()
