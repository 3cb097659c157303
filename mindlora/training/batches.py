"""Global batches -> this rank's micro-batches, in an order that does not depend on the layout.

Every run walks one seeded permutation of the training samples, global batch after global batch.
Data-parallel rank ``r`` takes the ``r``-th contiguous slice of each global batch and cuts it into
micro-batches. Because the loss is normalised by the global count of labelled tokens, any TP x PP x
DP layout then sees the same samples per step as one process would, and a resumed run continues
from ``consumed_samples`` exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch


@dataclass
class BatchPlan:
    """How one global batch is split over data parallel and micro-batches."""

    global_batch_size: int
    micro_batch_size: int
    dp_size: int
    dp_rank: int

    def __post_init__(self) -> None:
        per_step = self.micro_batch_size * self.dp_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"--global-batch-size ({self.global_batch_size}) must be a multiple of "
                f"--micro-batch-size ({self.micro_batch_size}) x data-parallel size "
                f"({self.dp_size})")

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)


class SampleOrder:
    """A reproducible endless order over ``n`` samples: one seeded permutation per epoch."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        if n < 1:
            raise ValueError("the training split has no samples (check --data-path and --split)")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._epoch, self._perm = -1, None

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch != self._epoch:
            self._epoch = epoch
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._perm = torch.randperm(self.n, generator=g).tolist()
            else:
                self._perm = list(range(self.n))
        return self._perm[offset]


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets of each position: ``labels[:, t+1]``; the last position predicts nothing."""
    shifted = torch.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def micro_batches(dataset, order: SampleOrder, plan: BatchPlan, consumed_samples: int, collate,
                  ) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches of the global batch that starts at ``consumed_samples``."""
    per_rank = plan.global_batch_size // plan.dp_size
    start = consumed_samples + plan.dp_rank * per_rank
    for m in range(plan.num_microbatches):
        first = start + m * plan.micro_batch_size
        samples = [dataset[order[first + i]] for i in range(plan.micro_batch_size)]
        batch = collate(samples)
        labels = shift_labels(batch["labels"])
        seq = batch["input_ids"].shape[1]
        yield {
            "tokens": batch["input_ids"],
            "labels": labels,
            "loss_mask": (labels != -100).float(),
            # host-tensor: batches are built on the host; runtime.device.to_device moves them
            "position_ids": torch.arange(seq).unsqueeze(0).expand_as(batch["input_ids"]),
        }


def pad_to_common_length(batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Right-pad every micro-batch of a step to the step's longest one.

    Pipeline stages exchange activations of one fixed shape per step (megatron-core's interleaved
    schedule supports no per-micro-batch shapes). Padding sits after the real tokens, carries no
    label and, attention being causal, changes no real token's output.
    """
    length = max(b["tokens"].shape[1] for b in batches)
    out = []
    for b in batches:
        extra = length - b["tokens"].shape[1]
        if extra == 0:
            out.append(b)
            continue
        rows = b["tokens"].shape[0]
        out.append({
            "tokens": torch.cat([b["tokens"], b["tokens"].new_zeros(rows, extra)], dim=1),
            "labels": torch.cat([b["labels"], b["labels"].new_full((rows, extra), -100)], dim=1),
            "loss_mask": torch.cat([b["loss_mask"], b["loss_mask"].new_zeros(rows, extra)], dim=1),
            # host-tensor: batches are built on the host; runtime.device.to_device moves them
            "position_ids": torch.arange(length).unsqueeze(0).expand(rows, length),
        })
    return out


def replicate(batches: Sequence[dict], copies: int) -> list[Iterator[dict]]:
    """One iterator per virtual pipeline chunk over the same micro-batches."""
    return [iter(list(batches)) for _ in range(copies)]
