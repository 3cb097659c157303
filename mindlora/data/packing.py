"""Sequence-length policy and greedy packing of instruction samples.

Without ``--pack`` a sample longer than ``--seq-length`` is dropped (MindSpeed-LLM's behaviour)
or, with ``--overlong truncate``, cut to ``seq_length`` tokens; a truncated sample with no
learned token left is dropped. With ``--pack`` samples are packed greedily (largest that still
fits first) into rows of at most ``seq_length`` tokens.

In a packed row the first label of every sample is -100, so no sample learns to predict the next
one's first token; ``attention_mask`` holds the sample number (1, 2, ...) of each token, the
segment information MindSpeed calls neat packing. Training reads them back as ``segment_ids``
(the sidecar's ``"pack": true`` says to): positions restart at every sample and attention is
block-diagonal causal, so a packed row trains on exactly its samples' unpacked objective.
"""
from __future__ import annotations

import bisect
from typing import Sequence

import numpy as np

from mindlora.data.handlers import IGNORE_INDEX

OVERLONG_POLICIES = ("drop", "truncate")


def limit_length(sample: tuple[np.ndarray, ...], seq_length: int | None, policy: str,
                 group: int) -> tuple[tuple[np.ndarray, ...] | None, str]:
    """Apply the over-length policy to one sample.

    Args:
        sample: arrays in output order; every ``group`` consecutive arrays form one sequence
            (3 for input_ids/attention_mask/labels, so a pairwise sample has two groups).
        seq_length: limit, or None for no limit.
        policy: ``"drop"`` or ``"truncate"``.
        group: arrays per sequence; the last of each group holds labels (when group > 1).

    Returns:
        ``(sample or None, status)`` with status ``"ok"``, ``"truncated"`` or ``"dropped"``.
    """
    if seq_length is None or all(len(a) <= seq_length for a in sample):
        return sample, "ok"
    if policy == "drop":
        return None, "dropped"
    cut = tuple(a[:seq_length] for a in sample)
    if group > 1:
        for labels in cut[group - 1::group]:
            if not (labels != IGNORE_INDEX).any():
                return None, "dropped"
    return cut, "truncated"


def greedy_pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group sample indices into bins of total length <= capacity.

    Each bin is filled by repeatedly taking the longest remaining sample that still fits
    (ties: the later index), which is deterministic and keeps bins nearly full.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    keys = [lengths[i] for i in order]
    if keys and keys[-1] > capacity:
        raise ValueError(f"a sample of {keys[-1]} tokens cannot be packed into {capacity}")
    bins: list[list[int]] = []
    while order:
        room, current = capacity, []
        while order:
            k = bisect.bisect_right(keys, room) - 1
            if k < 0:
                break
            room -= keys.pop(k)
            current.append(order.pop(k))
        bins.append(current)
    return bins


def pack_samples(samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                 seq_length: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Pack (input_ids, attention_mask, labels) samples into rows of <= seq_length tokens."""
    rows = []
    for members in greedy_pack([len(s[0]) for s in samples], seq_length):
        ids = np.concatenate([samples[i][0] for i in members])
        labels = np.concatenate([samples[i][2] for i in members]).astype(np.int32)
        seg = np.concatenate([np.full(len(samples[i][0]), n + 1, np.int32)
                              for n, i in enumerate(members)])
        starts = np.cumsum([0] + [len(samples[i][0]) for i in members[:-1]])
        labels[starts] = IGNORE_INDEX  # never learn a neighbour's first token
        rows.append((ids.astype(np.int32), seg, labels))
    return rows
