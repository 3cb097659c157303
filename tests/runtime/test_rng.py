"""One capture/restore pair for every RNG stream (``mindlora.runtime.rng``).

The CPU stream and megatron's tracker are checked for real; the accelerator branches run against
a stand-in ``torch.cuda`` (a GPU resume is checked on a GPU by tests/gpu/test_cuda_training.py).
"""
from __future__ import annotations

import types

import pytest
import torch
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from mindlora.runtime import compat, current, rng


@pytest.fixture(autouse=True)
def _cpu_tracker():
    with compat.cpu_compat():  # undone afterwards: nothing leaks into later tests
        tracker = get_cuda_rng_tracker()
        tracker.reset()
        tracker.add("model-parallel-rng", 77)
        yield


def _draws() -> torch.Tensor:
    with get_cuda_rng_tracker().fork():
        tp = torch.rand(3)
    return torch.cat([torch.rand(3), tp])


def test_cpu_and_tracker_round_trip() -> None:
    state = rng.capture_rng_state(current("cpu"))
    assert set(state) == {"cpu", "tracker"}  # no accelerator state on a CPU run
    first = _draws()
    assert not torch.equal(first, _draws())
    rng.restore_rng_state(state, current("cpu"))
    assert torch.equal(first, _draws())


class _FakeAccelerator(types.SimpleNamespace):
    def __init__(self, n: int) -> None:
        super().__init__(states=[torch.full((4,), i, dtype=torch.uint8) for i in range(n)],
                         set_calls=[])

    def device_count(self) -> int:
        return len(self.states)

    def get_rng_state_all(self) -> list[torch.Tensor]:
        return [s.clone() for s in self.states]

    def set_rng_state(self, state: torch.Tensor, device: int = -1) -> None:
        self.set_calls.append((device, int(state[0])))


def test_every_accelerator_device_is_saved_and_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    saved_on = _FakeAccelerator(4)
    monkeypatch.setattr(rng, "_accelerator", lambda kind: saved_on if kind == "cuda" else None)
    state = rng.capture_rng_state(current("cuda"))
    assert [int(s[0]) for s in state["cuda"]] == [0, 1, 2, 3]

    resumed_on = _FakeAccelerator(2)  # fewer visible devices: restore the ones both runs have
    monkeypatch.setattr(rng, "_accelerator", lambda kind: resumed_on if kind == "cuda" else None)
    rng.restore_rng_state(state, current("cuda"))
    assert resumed_on.set_calls == [(0, 0), (1, 1)]

    legacy = dict(state, cuda=torch.full((4,), 9, dtype=torch.uint8))  # pre-rng.py checkpoints
    resumed_on.set_calls.clear()
    rng.restore_rng_state(legacy, current("cuda"))
    assert resumed_on.set_calls == [(-1, 9)]

    resumed_on.set_calls.clear()  # a GPU checkpoint resumed on the CPU leaves CUDA alone
    rng.restore_rng_state(state, current("cpu"))
    assert resumed_on.set_calls == []


def test_checkpointing_delegates_here() -> None:
    from mindlora.training import checkpointing

    state = checkpointing._rng_state()
    first = _draws()
    checkpointing._set_rng_state(state)
    assert torch.equal(first, _draws())
