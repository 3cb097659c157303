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
