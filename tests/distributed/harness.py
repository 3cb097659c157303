"""Spawn N gloo ranks on the CPU and run one test body in each.

Process start-up costs seconds, so a test batches several checks into one spawned group.
Children are forked (they inherit the parent's imports) and use one intra-op thread each, so
N ranks on 2 cores do not oversubscribe. They hide CUDA (``CUDA_VISIBLE_DEVICES=""``) and select
the CPU, so on a GPU host the suite still runs its CPU tests as CPU runs. A failure in any rank re-raises in the test with that
rank's traceback.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), CUDA_VISIBLE_DEVICES="",
                      MINDLORA_DEVICE="cpu")
    torch.set_num_threads(1)
    from mindlora.runtime import current, destroy_parallel, init_distributed

    init_distributed(current("cpu"), rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        destroy_parallel()


def _join(ctx, fn: Callable[..., Any], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{fn.__name__} did not finish within {timeout_s:.0f} s "
                               f"(a collective some rank never reached?)")


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; raise on any failure.

    A group still running after ``timeout_s`` is killed and reported (a hang never stalls CI).
    A port picked as free can be taken by another process before rank 0 listens on it (tests run
    side by side); only that start-up failure is retried, with a new port.
    """
    for attempt in range(3):
        try:
            ctx = mp.start_processes(_entry, args=(fn, world_size, _free_port(), args),
                                     nprocs=world_size, join=False, start_method="fork")
            _join(ctx, fn, timeout_s)
            return
        except mp.ProcessRaisedException as e:
            if "EADDRINUSE" not in str(e) or attempt == 2:
                raise
