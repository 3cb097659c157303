"""The training run's view of the preprocessed data: splits, padding and up-front checks.

Checks happen before any model work: a missing prefix names the expected files, data built with
a tokenizer larger than the model's vocabulary (or, when ``--tokenizer-name-or-path`` is given,
with another tokenizer) is refused, and so is a ``--prompt-type`` other than the template the
data was preprocessed with (training never re-templates: the template is in the token ids).
"""
from __future__ import annotations

from functools import partial

from mindlora.config import ModelConfig
from mindlora.data.dataset import build_train_valid_test, collate, parse_data_path
from mindlora.data.indexed import require_dataset
from mindlora.data.meta import check_tokenizer, meta_path, read_dataset_meta
from mindlora.data.templates import get_template


class TrainingData:
    """Train/valid splits of ``--data-path`` and the batch collate function."""

    def __init__(self, data_cfg, train_cfg, model: ModelConfig, tp_size: int,
                 sequence_parallel: bool) -> None:
        pairs = parse_data_path(data_cfg.data_path)
        pad_id = 0
        if data_cfg.prompt_type:
            get_template(data_cfg.prompt_type)  # an unknown name fails, listing the known ones
        for _, prefix in pairs:
            require_dataset(f"{prefix}_packed_input_ids_document")
            meta = read_dataset_meta(prefix, required=False)
            if meta is not None and data_cfg.prompt_type and \
                    meta.get("prompt_type") != data_cfg.prompt_type:
                raise ValueError(
                    f"--prompt-type {data_cfg.prompt_type} but --data-path {prefix} was "
                    f"preprocessed with --prompt-type {meta.get('prompt_type')} "
                    f"({meta_path(prefix)}): the chat template is baked into the token ids, so "
                    f"preprocess again or pass the template the data was built with")
            if meta is not None:
                if int(meta["vocab_size"]) > model.vocab_size:
                    raise ValueError(
                        f"--data-path {prefix} was tokenised with a vocabulary of "
                        f"{meta['vocab_size']} ids ({meta.get('tokenizer_path')}), larger than "
                        f"the model's {model.vocab_size}: it was built with another tokenizer")
                pad_id = int(meta.get("pad_id") or 0)
            if data_cfg.tokenizer_name_or_path:
                from mindlora.data.tokenizer import load_tokenizer

                tok = load_tokenizer(data_cfg.tokenizer_name_or_path)
                check_tokenizer(prefix, tok.vocab_size, tok.fingerprint)
        self.train, self.valid, self.test = build_train_valid_test(
            data_cfg.data_path, train_cfg.seq_length, data_cfg.split, train_cfg.seed)
        multiple = data_cfg.pad_to_multiple_of
        if sequence_parallel and multiple % tp_size:
            multiple *= tp_size  # sequence parallel splits the sequence over TP ranks
        if sequence_parallel and data_cfg.pad_to_seq_lengths and train_cfg.seq_length % tp_size:
            raise ValueError(f"--seq-length ({train_cfg.seq_length}) must be a multiple of "
                             f"--tensor-model-parallel-size ({tp_size}) with --sequence-parallel")
        self.collate = partial(collate, pad_id=pad_id, pad_to_multiple_of=multiple,
                               seq_length=train_cfg.seq_length if data_cfg.pad_to_seq_lengths
                               else None)
