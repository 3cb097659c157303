"""Training-time reading of preprocessed data: datasets, blends, splits and the collate function.

``InstructionDataset(prefix, seq_length)`` reads ``<prefix>_packed_input_ids_document`` and
``<prefix>_packed_labels_document`` (memory-mapped), and for data preprocessed with ``--pack``
also ``<prefix>_packed_attention_mask_document``, whose per-token sample numbers become
``segment_ids`` (training restarts positions and blocks attention at their boundaries). Labels
are unshifted with -100 = ignore; the model's loss shifts them. ``collate`` pads a batch either
to exactly ``seq_length`` (Megatron's default) or dynamically to the batch maximum rounded up to
``pad_to_multiple_of``.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from mindlora.data.handlers import IGNORE_INDEX
from mindlora.data.indexed import IndexedDataset, bin_path, idx_path
from mindlora.data.meta import read_dataset_meta


def _open(prefixes: list[str], owner: str) -> list[IndexedDataset]:
    missing = [p for pre in prefixes for p in (bin_path(pre), idx_path(pre))
               if not os.path.isfile(p)]
    if missing:
        expected = ", ".join(p for pre in prefixes for p in (bin_path(pre), idx_path(pre)))
        raise FileNotFoundError(f"dataset '{owner}' not found: expected {expected} "
                                f"(missing: {', '.join(missing)}); build it with "
                                "tools/preprocess_data.py --output-prefix " + owner)
    sets = [IndexedDataset(p) for p in prefixes]
    for other, pre in zip(sets[1:], prefixes[1:]):
        if other.num_documents != sets[0].num_documents or not np.array_equal(
                other.sequence_lengths, sets[0].sequence_lengths):
            raise ValueError(f"{pre} does not line up with {prefixes[0]} (different document "
                             "count or lengths): the files come from different runs")
    return sets


def _long(a: np.ndarray, seq_length: int) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a[:seq_length], dtype=np.int64))


class InstructionDataset(Dataset):
    """Instruction samples (or packed rows) of one preprocessed prefix.

    Args:
        prefix: the ``--output-prefix`` given to tools/preprocess_data.py.
        seq_length: samples longer than this are truncated to it.

    ``ds[i]`` is ``{"input_ids", "labels", "loss_mask"}``: LongTensor[L], LongTensor[L]
    (unshifted, -100 = ignore) and FloatTensor[L] (1 where the label is learned), L <= seq_length.
    Packed data (the sidecar says ``"pack": true``) adds ``segment_ids``: LongTensor[L], the
    sample number (1, 2, ...) of each token in its row. Data without a sidecar is read unpacked.
    """

    def __init__(self, prefix: str, seq_length: int) -> None:
        if seq_length <= 0:
            raise ValueError(f"seq_length must be positive, got {seq_length}")
        self.prefix, self.seq_length = prefix, seq_length
        meta = read_dataset_meta(prefix, required=False)
        self.packed = bool(meta and meta.get("pack"))
        names = ["input_ids", "labels"] + (["attention_mask"] if self.packed else [])
        sets = _open([f"{prefix}_packed_{n}_document" for n in names], prefix)
        self._ids, self._labels = sets[0], sets[1]
        self._segments = sets[2] if self.packed else None

    def __len__(self) -> int:
        return self._ids.num_documents

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples in {self.prefix}")
        ids = _long(self._ids.document(i), self.seq_length)
        labels = _long(self._labels.document(i), self.seq_length)
        item = {"input_ids": ids, "labels": labels, "loss_mask": (labels != IGNORE_INDEX).float()}
        if self._segments is not None:
            item["segment_ids"] = _long(self._segments.document(i), self.seq_length)
        return item


class PairwiseDataset(Dataset):
    """Preference pairs written by the pairwise handlers: chosen_* and rejected_* tensors.

    No trainer consumes it yet (mindlora trains SFT LoRA; DPO/reward training is not built). It
    stays as the reader of ``--handler-name`` pairwise output, which preprocessing writes for
    MindSpeed-LLM users and tests/data/test_preprocess.py checks through it.
    """

    def __init__(self, prefix: str, seq_length: int) -> None:
        self.prefix, self.seq_length = prefix, seq_length
        names = [f"{prefix}_packed_{w}_{k}_document" for w in ("chosen", "rejected")
                 for k in ("input_ids", "labels")]
        c_ids, c_lab, r_ids, r_lab = _open(names[:2], prefix) + _open(names[2:], prefix)
        self._sets = {"chosen_input_ids": c_ids, "chosen_labels": c_lab,
                      "rejected_input_ids": r_ids, "rejected_labels": r_lab}

    def __len__(self) -> int:
        return self._sets["chosen_input_ids"].num_documents

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: _long(ds.document(i), self.seq_length) for k, ds in self._sets.items()}


def collate(samples: Sequence[dict[str, torch.Tensor]], pad_id: int, pad_to_multiple_of: int = 1,
            seq_length: int | None = None) -> dict[str, torch.Tensor]:
    """Stack samples into a padded batch.

    Args:
        samples: dicts with ``input_ids`` and ``labels`` (1-D LongTensors).
        pad_id: id written into padding positions of ``input_ids``.
        pad_to_multiple_of: dynamic padding rounds the batch length up to this multiple.
        seq_length: when given, every batch is padded (and truncated) to exactly this length.

    Returns:
        ``input_ids`` [B, L] long, ``labels`` [B, L] long (-100 on padding), ``loss_mask``
        [B, L] float (1 where label != -100), ``attention_mask`` [B, L] bool (True on tokens);
        when any sample is a packed row, ``segment_ids`` [B, L] long: the row's sample numbers,
        1 for every token of an unpacked sample, 0 on padding (padding is its own segment).
    """
    if not samples:
        raise ValueError("collate: empty batch")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    if seq_length is not None:
        length = seq_length
    else:
        longest = max(len(s["input_ids"]) for s in samples)
        length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(samples)
    input_ids = torch.full((batch, length), int(pad_id), dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((batch, length), dtype=torch.bool)
    packed = any("segment_ids" in s for s in samples)
    segments = torch.zeros((batch, length), dtype=torch.long) if packed else None
    for row, s in enumerate(samples):
        n = min(len(s["input_ids"]), length)
        input_ids[row, :n] = s["input_ids"][:n]
        labels[row, :n] = s["labels"][:n]
        attention[row, :n] = True
        if segments is not None:
            segments[row, :n] = s["segment_ids"][:n] if "segment_ids" in s else 1
    out = {"input_ids": input_ids, "labels": labels,
           "loss_mask": (labels != IGNORE_INDEX).float(), "attention_mask": attention}
    if segments is not None:
        out["segment_ids"] = segments
    return out


def parse_data_path(data_path: str | Sequence[str]) -> list[tuple[float, str]]:
    """``"0.7 prefixA 0.3 prefixB"`` (or one bare prefix) -> [(0.7, prefixA), (0.3, prefixB)]."""
    tokens = data_path.split() if isinstance(data_path, str) else list(data_path)
    if len(tokens) == 1:
        return [(1.0, tokens[0])]
    if not tokens or len(tokens) % 2:
        raise ValueError(f"--data-path: expected 'weight prefix [weight prefix ...]' or one "
                         f"prefix, got {' '.join(tokens)!r}")
    pairs = []
    for w, prefix in zip(tokens[::2], tokens[1::2]):
        try:
            weight = float(w)
        except ValueError:
            raise ValueError(f"--data-path: '{w}' is not a weight (before prefix {prefix})") \
                from None
        if not weight > 0:
            raise ValueError(f"--data-path: weight of {prefix} must be > 0, got {w}")
        pairs.append((weight, prefix))
    return pairs


class BlendedDataset(Dataset):
    """Weighted mixture of datasets with a deterministic, seeded sample order.

    Dataset ``d`` supplies ``round(weight_d * size)`` samples, spread evenly over the blend
    (sample j of d sits at position ~ (j + 0.5) / n_d); within each dataset samples follow a
    seeded permutation per epoch, so small datasets repeat only after all their samples were used.

    Args:
        datasets: the parts.
        weights: relative weights (normalised here).
        size: blend length (default: the parts' total length).
        seed: permutation seed; the same seed gives the same order.
        shuffle: False keeps each part's own order (0, 1, 2, ...).
    """

    def __init__(self, datasets: Sequence[Dataset], weights: Sequence[float],
                 size: int | None = None, seed: int = 1234, shuffle: bool = True) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("BlendedDataset: need one weight per dataset")
        lens = [len(d) for d in datasets]  # type: ignore[arg-type]
        if any(n == 0 for n in lens):
            raise ValueError(f"BlendedDataset: empty part (lengths {lens})")
        w = np.asarray(weights, dtype=np.float64)
        w = w / w.sum()
        size = sum(lens) if size is None else size
        quota = np.floor(w * size).astype(np.int64)
        for d in np.argsort(-(w * size - quota), kind="stable")[: size - quota.sum()]:
            quota[d] += 1  # largest remainders get the leftover samples
        parts, times = [], []
        for d, n in enumerate(quota):
            parts.append(np.full(n, d, np.int64))
            times.append((np.arange(n) + 0.5) / max(n, 1))
        ds_id = np.concatenate(parts)
        order = np.lexsort((ds_id, np.concatenate(times)))
        self.dataset_index = ds_id[order]
        self.sample_index = np.zeros(size, np.int64)
        for d, n in enumerate(quota):
            pos = np.nonzero(self.dataset_index == d)[0]
            self.sample_index[pos] = _epoch_order(lens[d], int(n), seed, d, shuffle)
        self.datasets = list(datasets)

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int):
        return self.datasets[int(self.dataset_index[i])][int(self.sample_index[i])]


def _epoch_order(length: int, count: int, seed: int, part: int, shuffle: bool) -> np.ndarray:
    epochs = -(-count // length)
    if not shuffle:
        return np.arange(count) % length
    rng = np.random.default_rng([seed, part])
    return np.concatenate([rng.permutation(length) for _ in range(epochs)])[:count]


def split_dataset(ds: Dataset, split: str = "949,50,1") -> tuple[Subset, Subset, Subset]:
    """Megatron's ``--split``: contiguous train/valid/test ranges in the given proportions."""
    try:
        parts = [float(x) for x in split.replace("/", ",").split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--split: expected numbers like '949,50,1', got {split!r}") from None
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"--split: expected 1-3 non-negative numbers, got {split!r}")
    parts += [0.0] * (3 - len(parts))
    size = len(ds)  # type: ignore[arg-type]
    bounds = [0]
    for p in parts:
        bounds.append(bounds[-1] + int(round(p / sum(parts) * size)))
    excess = bounds[-1] - size  # rounding may over/undershoot by a sample or two
    bounds = [0] + [min(max(b - excess, 0), size) for b in bounds[1:]]
    return tuple(Subset(ds, range(lo, hi)) for lo, hi in zip(bounds, bounds[1:]))  # type: ignore


def build_train_valid_test(data_path: str | Sequence[str], seq_length: int,
                           split: str = "949,50,1", seed: int = 1234,
                           ) -> tuple[Dataset, Dataset, Dataset]:
    """Datasets for ``--data-path`` and ``--split``: each prefix split, then blended per split."""
    pairs = parse_data_path(data_path)
    splits = [split_dataset(InstructionDataset(prefix, seq_length), split) for _, prefix in pairs]
    if len(pairs) == 1:
        return splits[0]
    out = []
    for k in range(3):
        parts = [(w, s[k]) for (w, _), s in zip(pairs, splits) if len(s[k])]
        out.append(BlendedDataset([p for _, p in parts], [w for w, _ in parts], seed=seed + k)
                   if parts else Subset(splits[0][k], []))
    return out[0], out[1], out[2]
