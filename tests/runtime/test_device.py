"""Device and collective-backend selection (``mindlora.runtime.device``).

Detection is exercised by faking what the machine offers (CUDA, an importable ``torch_npu``), so
each test can fail only if ``current`` decides wrongly; the CPU memory figure is checked against
the kernel's own record of the peak resident set.
"""
from __future__ import annotations

import importlib.util
import types

import pytest
import torch

from mindlora.runtime import current
from mindlora.runtime.device import Device


def _forget_detection() -> None:
    """Drop whatever detection result the runtime cached (and any device it was told to use)."""
    from mindlora.runtime import device as dev

    for fn in (getattr(dev, "_detect", None), dev.current):
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()
    if hasattr(dev, "select"):
        dev.select(None)


@pytest.fixture
def fresh_detection(monkeypatch):
    """Detection is cached; start and end a test that fakes the machine with none cached."""
    monkeypatch.delenv("MINDLORA_DEVICE", raising=False)
    _forget_detection()
    yield
    _forget_detection()


@pytest.mark.parametrize("cuda, npu_installed, npu_available, expected", [
    (True, True, True, ("cuda", "nccl")),     # CUDA wins even with torch_npu installed
    (False, True, True, ("npu", "hccl")),
    (False, True, False, ("cpu", "gloo")),    # torch_npu installed, no NPU present
    (False, False, False, ("cpu", "gloo")),
])
def test_detection_follows_what_the_machine_offers(monkeypatch, fresh_detection, cuda,
                                                   npu_installed, npu_available, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if npu_installed else None)
                        if name == "torch_npu" else real_find_spec(name, *a))
    monkeypatch.setitem(__import__("sys").modules, "torch_npu", types.ModuleType("torch_npu"))
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(is_available=lambda: npu_available),
                        raising=False)
    device = current()
    assert (device.kind, device.backend) == expected


def test_forced_kind_and_unknown_kind(fresh_detection) -> None:
    assert current("npu") == Device("npu", "hccl") and current("cpu") == Device("cpu", "gloo")
    with pytest.raises(ValueError, match=r"unknown device kind 'tpu'; expected cuda, npu or cpu"):
        current("tpu")


def test_set_local_binds_the_accelerator_only(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("cuda", i)))
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(set_device=lambda i: calls.append(
        ("npu", i))), raising=False)
    Device("cuda", "nccl").set_local(3)
    Device("npu", "hccl").set_local(2)
    Device("cpu", "gloo").set_local(1)
    assert calls == [("cuda", 3), ("npu", 2)]
    assert Device("cpu", "gloo").torch_device(3) == torch.device("cpu")  # local rank ignored
    assert Device("cuda", "nccl").torch_device(3) == torch.device("cuda", 3)


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
def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"),
                    reason="needs Linux /proc to know the peak resident set independently")
def test_cpu_peak_memory_is_the_peak_rss_in_bytes() -> None:
    """On the CPU the figure logged as peak memory is the process's peak RSS, in bytes (not the
    kilobytes getrusage reports on Linux). The kernel updates getrusage's figure lazily, so it may
    trail VmHWM by a few pages: within 10%, where a unit slip would be off by 1024x."""
    before = _vm_hwm_bytes()
    peak = Device("cpu", "gloo").max_memory_allocated()
    after = _vm_hwm_bytes()
    assert 0.9 * before <= peak <= 1.1 * after, (before, peak, after)
