"""Global batches -> this rank's micro-batches, in an order that does not depend on the layout.

Every run walks one seeded permutation of the training samples, global batch after global batch.
Data-parallel rank ``r`` takes the ``r``-th contiguous slice of each global batch and cuts it into
micro-batches. Because the loss is normalised by the global count of labelled tokens, any TP x PP x
DP layout then sees the same samples per step as one process would, and a resumed run continues
from ``consumed_samples`` exactly.

Packed rows (data preprocessed with ``--pack``) carry ``segment_ids``; their positions restart at
every sample, and the model turns the ids into a block-diagonal causal mask (docs/training.md,
"Packed sequences"), so a packed row trains on exactly the objective of its samples unpacked.
Every pipeline stage draws the same micro-batches, so the positions and ids reach every stage.
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


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token within its segment: 0 at every change of segment id.

    ``[[1, 1, 1, 2, 2, 0]] -> [[0, 1, 2, 0, 1, 0]]`` (a run of padding, id 0, is a segment too).
    """
    seq = segment_ids.shape[1]
    index = torch.arange(seq, device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def _positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if "segment_ids" in batch:
        return segment_positions(batch["segment_ids"])
    tokens = batch["tokens"]
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def to_model_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A collated batch -> the model's inputs: shifted labels, loss mask, positions and, for
    packed rows, the ``segment_ids`` the attention mask is built from."""
    labels = shift_labels(batch["labels"])
    out = {"tokens": batch["input_ids"], "labels": labels, "loss_mask": (labels != -100).float()}
    if "segment_ids" in batch:
        out["segment_ids"] = batch["segment_ids"]
    out["position_ids"] = _positions(out)
    return out


def micro_batches(dataset, order: SampleOrder, plan: BatchPlan, consumed_samples: int, collate,
                  ) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches of the global batch that starts at ``consumed_samples``."""
    per_rank = plan.global_batch_size // plan.dp_size
    start = consumed_samples + plan.dp_rank * per_rank
    for m in range(plan.num_microbatches):
        first = start + m * plan.micro_batch_size
        samples = [dataset[order[first + i]] for i in range(plan.micro_batch_size)]
        yield to_model_batch(collate(samples))


def pad_to_common_length(batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Right-pad every micro-batch of a step to the step's longest one.

    Pipeline stages exchange activations of one fixed shape per step (megatron-core's interleaved
    schedule supports no per-micro-batch shapes). Padding sits after the real tokens, carries no
    label and, attention being causal, changes no real token's output; in packed rows it is
    segment 0, which no real token attends to.
    """
    length = max(b["tokens"].shape[1] for b in batches)
    out = []
    for b in batches:
        extra = length - b["tokens"].shape[1]
        if extra == 0:
            out.append(b)
            continue
        rows = b["tokens"].shape[0]
        padded = {
            "tokens": torch.cat([b["tokens"], b["tokens"].new_zeros(rows, extra)], dim=1),
            "labels": torch.cat([b["labels"], b["labels"].new_full((rows, extra), -100)], dim=1),
            "loss_mask": torch.cat([b["loss_mask"], b["loss_mask"].new_zeros(rows, extra)], dim=1),
        }
        if "segment_ids" in b:
            padded["segment_ids"] = torch.cat(
                [b["segment_ids"], b["segment_ids"].new_zeros(rows, extra)], dim=1)
        padded["position_ids"] = _positions(padded)
        out.append(padded)
    return out


def replicate(batches: Sequence[dict], copies: int) -> list[Iterator[dict]]:
    """One iterator per virtual pipeline chunk over the same micro-batches."""
    return [iter(list(batches)) for _ in range(copies)]
