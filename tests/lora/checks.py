"""Helpers for the tensor-parallel parity tests: gather a sharded tensor, compare with a reference.

Tolerance: float32 throughout, ``rtol=1e-5``. TP changes only the *order* of float32 sums (partial
matmuls joined by an all-reduce, sequence slices joined by a reduce-scatter), which moves a result
by a few ulps of the largest term summed, not of the result. An entry that cancels to ~0 therefore
has no meaningful relative error, so ``atol`` is 1e-6 times the tensor's own scale (max |ref|,
at least 1): about 8 float32 ulps at unit scale, and still 10x tighter than the rtol.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from mindlora.parallel.layout import Split, gather, shard, split_rule

RTOL = 1e-5
ATOL_SCALE = 1e-6
SEQ = Split(0)
"""Sequence-parallel activations are split along the sequence (dim 0 of ``[s, b, h]``)."""


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Assert ``actual`` equals ``expected`` to 1e-5 relative (see the module doc for atol)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    atol = ATOL_SCALE * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def gather_tp(t: torch.Tensor, rule: Split, group) -> torch.Tensor:
    """All-gather a TP-sharded tensor to every rank and re-join it with ``sharding.gather``.

    A replicated tensor (``rule.dim is None``) must be bit-identical on every TP rank: that is how
    a missing gradient reduction of a replicated LoRA factor shows up.
    """
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    if rule.dim is None:
        for i, p in enumerate(parts[1:], start=1):
            assert torch.equal(p, parts[0]), f"replicated tensor differs on TP rank {i}"
    return gather(parts, rule)


def compare_all(pairs: Sequence[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
    """``assert_matches`` over ``(what, actual, expected)`` triples."""
    for what, actual, expected in pairs:
        assert_matches(actual, expected, what)


def load_sharded(model: torch.nn.Module, full: dict[str, torch.Tensor], tp: int,
                 rank: int) -> None:
    """Load this rank's shard of a FULL megatron-layout state dict, cut by the sharding table.

    Strict about real keys: the model's keys (less ``_extra_state``) must equal ``full``'s, and
    every shard must have the model's shape.
    """
    expected = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    assert expected == set(full), f"state-dict keys differ: {sorted(expected ^ set(full))}"
    local = {k: shard(full[k], split_rule(k), tp, rank) for k in expected}
    missing, unexpected = model.load_state_dict(local, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing,
                                                                                unexpected)
