"""``<prefix>_meta.json``: which tokenizer and settings built a dataset.

Token ids only mean something under the tokenizer that produced them. The preprocessor records
the tokenizer's vocabulary size and fingerprint beside the data so training can refuse data built
with another tokenizer before it silently trains on garbage.
"""
from __future__ import annotations

import json
import os
from typing import Any

from mindlora.runtime.files import AtomicPath

META_FORMAT = "mindlora-indexed-data"
META_VERSION = 1


def meta_path(prefix: str | os.PathLike) -> str:
    """Path of the sidecar for an output prefix."""
    return f"{os.fspath(prefix)}_meta.json"


def stage_meta(prefix: str | os.PathLike, meta: dict[str, Any]) -> AtomicPath:
    """Write the sidecar under a temporary name; ``commit()`` it once the data files are in place
    (readers look for the sidecar, so it appears last), or ``abort()``."""
    staged = AtomicPath(meta_path(prefix))
    body = {"format": META_FORMAT, "version": META_VERSION, **meta}
    try:
        with open(staged.tmp, "w", encoding="utf-8") as f:
            json.dump(body, f, indent=2, ensure_ascii=False, sort_keys=True)
            f.write("\n")
    except BaseException:
        staged.abort()
        raise
    return staged


def write_meta(prefix: str | os.PathLike, meta: dict[str, Any]) -> str:
    """Write the sidecar atomically; returns its path."""
    return stage_meta(prefix, meta).commit()


def read_dataset_meta(prefix: str | os.PathLike, required: bool = True) -> dict[str, Any] | None:
    """The sidecar of a dataset prefix.

    Args:
        prefix: the ``--output-prefix`` the data was built with (= training's data path).
        required: raise when missing (else return None, e.g. for data made by MindSpeed-LLM).

    Raises:
        FileNotFoundError: no sidecar and ``required``.
        ValueError: the file is not a mindlora data sidecar.
    """
    path = meta_path(prefix)
    if not os.path.isfile(path):
        if required:
            raise FileNotFoundError(f"{path} not found: the dataset at '{os.fspath(prefix)}' was "
                                    "not built by tools/preprocess_data.py (or was moved without "
                                    "its sidecar)")
        return None
    with open(path, encoding="utf-8") as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise ValueError(f"{path}: not a mindlora dataset sidecar")
    return meta


def check_tokenizer(prefix: str | os.PathLike, vocab_size: int,
                    fingerprint: str | None = None, required: bool = False) -> None:
    """Refuse data built with another tokenizer.

    Args:
        prefix: dataset prefix.
        vocab_size: the training tokenizer's vocabulary size (added tokens included).
        fingerprint: its ``Tokenizer.fingerprint``; compared when given.
        required: fail when the dataset has no sidecar (default: accept such data unchecked).

    Raises:
        ValueError: vocabulary size or fingerprint differ, naming both values.
    """
    meta = read_dataset_meta(prefix, required=required)
    if meta is None:
        return
    if int(meta["vocab_size"]) != int(vocab_size):
        raise ValueError(
            f"dataset '{os.fspath(prefix)}' was built with a tokenizer of vocab size "
            f"{meta['vocab_size']} ({meta.get('tokenizer_path')}), but training uses vocab size "
            f"{vocab_size}; re-run tools/preprocess_data.py with the training tokenizer")
    if fingerprint and meta.get("tokenizer_fingerprint") not in (None, fingerprint):
        raise ValueError(
            f"dataset '{os.fspath(prefix)}' was built with another tokenizer (fingerprint "
            f"{meta['tokenizer_fingerprint'][:12]} from {meta.get('tokenizer_path')}, training "
            f"tokenizer {fingerprint[:12]}); re-run tools/preprocess_data.py")
