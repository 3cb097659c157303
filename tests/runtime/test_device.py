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
def test_detection_picks_cpu_without_accelerators(monkeypatch: pytest.MonkeyPatch) -> None:
    from mindlora.runtime import device as dev

    monkeypatch.delenv("MINDLORA_DEVICE", raising=False)  # tests/conftest.py sets it
    dev._detect.cache_clear()
    try:
        assert current().kind == "cpu" and current().backend == "gloo"
    finally:
        dev._detect.cache_clear()


def test_selected_device_wins_over_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU run on a GPU host stays on the CPU once init_distributed has selected it."""
    from mindlora.runtime import device as dev

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("MINDLORA_DEVICE", raising=False)
    dev._detect.cache_clear()
    try:
        assert current().kind == "cuda"  # detection alone would pick the GPU
        dev.select(current("cpu"))
        assert current() == current("cpu")
        monkeypatch.setenv("MINDLORA_DEVICE", "cpu")
        dev.select(None)
        dev._detect.cache_clear()
        assert current().kind == "cpu"  # MINDLORA_DEVICE overrides detection
    finally:
        dev.select(None)
        dev._detect.cache_clear()


def test_accelerator_index_is_the_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rank of a node binds its own accelerator (the Ascend path used to pin npu:0)."""
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert current("cuda").torch_device() == torch.device("cuda", 3)
    assert current("cuda").torch_device(1) == torch.device("cuda", 1)
    assert current("cpu").torch_device() == torch.device("cpu")


def test_to_device_leaves_cpu_batches_alone() -> None:
    from mindlora.runtime.device import to_device

    batch = {"tokens": torch.ones(2, 3, dtype=torch.long), "meta": [1, 2]}
    assert to_device(batch, torch.device("cpu")) is batch


def test_compat_follows_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """init_distributed adapts megatron-core for the CPU or the NPU, and for CUDA not at all."""
    from mindlora.runtime import compat, npu_compat, parallel

    calls = []
    monkeypatch.setattr(compat, "apply_cpu_compat", lambda: calls.append("cpu"))
    monkeypatch.setattr(npu_compat, "apply_npu_compat", lambda: calls.append("npu"))
    for kind in ("cpu", "cuda", "npu"):
        parallel.apply_compat(current(kind))
    assert calls == ["cpu", "npu"]
