"""Device and collective-backend selection (``mindlora.runtime.device``)."""
from __future__ import annotations

import pytest
import torch

from mindlora.runtime import current


@pytest.mark.parametrize("kind, backend", [("cpu", "gloo"), ("cuda", "nccl"), ("npu", "hccl")])
def test_backend_follows_device(kind: str, backend: str) -> None:
    device = current(kind)
    assert (device.kind, device.backend) == (kind, backend)
    assert device.is_cpu == (kind == "cpu")


def test_unknown_kind_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"unknown device kind 'tpu'; expected cuda, npu or cpu"):
        current("tpu")


def test_cpu_device_helpers() -> None:
    cpu = current("cpu")
    assert cpu.torch_device(3) == torch.device("cpu")  # local rank is ignored on the CPU
    cpu.set_local(1)      # no-op on the CPU
    cpu.synchronize()     # no-op on the CPU
    assert cpu.max_memory_allocated() > 0  # peak RSS stands in for accelerator memory


@pytest.mark.skipif(torch.cuda.is_available(), reason="detection on a CPU-only machine")
def test_detection_picks_cpu_without_accelerators() -> None:
    assert current().kind == "cpu" and current().backend == "gloo"
