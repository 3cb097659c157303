"""Record -> conversation -> token ids and labels, for each ``--handler-name``.

A handler reads one raw record (Alpaca, ShareGPT / OpenAI messages, pairwise, or plain text),
validates it, renders it with the chat template, and tokenises whole batches at once. Records
that are malformed come back as ``InvalidRecord`` naming the record's location and the field.

Labels are the input ids with every token not learned set to -100 (``IGNORE_INDEX``); they are
*not* shifted. With a fast tokenizer the whole rendered text is encoded in one piece, exactly as
``apply_chat_template`` + ``encode`` would, and a token is learned when its last character lies
in a learned segment. Other tokenizers encode segment by segment (LLaMA-Factory's way).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from mindlora.data.records import InvalidRecord, KeyMap, RecordReader
from mindlora.data.templates import Conversation, Template
from mindlora.data.tokenizer import Tokenizer

IGNORE_INDEX = -100
Segments = list[tuple[str, bool]]

INSTRUCTION_OUTPUTS = ("input_ids", "attention_mask", "labels")
PAIRWISE_OUTPUTS = ("chosen_input_ids", "chosen_attention_mask", "chosen_labels",
                    "rejected_input_ids", "rejected_attention_mask", "rejected_labels")
PRETRAIN_OUTPUTS = ("text",)


@dataclass
class HandlerOptions:
    """What a handler needs besides the tokenizer; every field mirrors a CLI flag."""

    template: Template | None
    enable_thinking: str = "none"      # --enable-thinking
    train_on_inputs: bool = False      # --train-on-inputs
    mask_history: bool = False         # --mask-history
    append_eod: bool = False           # --append-eod
    map_keys: dict[str, Any] = field(default_factory=dict)  # --map-keys
    pretrain_key: str = "text"         # --json-keys (pretrain)


class Handler:
    """Base class: ``encode(records)`` -> per record a tuple of int32 arrays, or an error."""

    name = "Handler"
    outputs: tuple[str, ...] = ()
    style = "alpaca"

    def __init__(self, tokenizer: Tokenizer, options: HandlerOptions) -> None:
        self.tok = tokenizer
        self.opt = options
        self.reader = RecordReader(self.style, KeyMap.from_json(self.style, options.map_keys))

    def encode(self, records: Sequence[tuple[str, dict]]
               ) -> list[tuple[np.ndarray, ...] | InvalidRecord]:
        """Encode a batch of ``(location, record)``; invalid ones come back as InvalidRecord."""
        raise NotImplementedError

    # -- shared helpers -------------------------------------------------------------------
    def _render(self, conv: Conversation) -> Segments:
        assert self.opt.template is not None
        segs = self.opt.template.render(
            conv, bos=self.tok.bos_token, eos=self.tok.eos_token,
            enable_thinking=self.opt.enable_thinking, train_on_inputs=self.opt.train_on_inputs,
            mask_history=self.opt.mask_history)
        if self.opt.append_eod:
            segs.append((self._eod_text(), True))
        return segs

    def _eod_text(self) -> str:
        if self.tok.eos_token is None:
            raise ValueError("--append-eod: the tokenizer has no EOS token")
        return self.tok.eos_token

    def _encode_segments(self, batch: list[Segments]) -> list[tuple[np.ndarray, np.ndarray]]:
        if self.tok.supports_offsets:
            return _encode_by_offsets(self.tok, batch)
        return _encode_by_segments(self.tok, batch)


def _encode_by_offsets(tok: Tokenizer, batch: list[Segments]):
    texts = ["".join(s for s, _ in segs) for segs in batch]
    out = []
    for segs, enc in zip(batch, tok.encode_batch_with_offsets(texts)):
        ids = np.asarray(enc.ids, dtype=np.int32)
        labels = np.full(ids.shape, IGNORE_INDEX, dtype=np.int32)
        pos = 0
        for s, learn in segs:
            if learn and s:
                lo, hi = _token_range(enc, pos, pos + len(s))
                labels[lo:hi] = ids[lo:hi]
            pos += len(s)
        out.append((ids, labels))
    return out


def _token_range(enc: Any, start: int, end: int) -> tuple[int, int]:
    """Tokens whose last character lies in ``[start, end)`` (offsets grow monotonically).

    A token straddling a boundary thus belongs to the later segment: "assistant\n" followed by
    a reply opening with "\n" may encode as one "\n\n" token, which is then learned.
    """
    first, last = enc.char_to_token(start), enc.char_to_token(end - 1)
    if first is None or last is None:  # a character without a token (normaliser dropped it)
        offs = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        inside = np.flatnonzero((offs[:, 1] - 1 >= start) & (offs[:, 1] - 1 < end))
        return (int(inside[0]), int(inside[-1]) + 1) if len(inside) else (0, 0)
    if enc.token_to_chars(last)[1] > end:  # straddles the end: it belongs to the next segment
        last -= 1
    return first, last + 1


def _encode_by_segments(tok: Tokenizer, batch: list[Segments]):
    flat = [s for segs in batch for s, _ in segs]
    encoded = iter(tok.encode_batch(flat) if flat else [])
    out = []
    for segs in batch:
        ids_parts, lab_parts = [], []
        for _, learn in segs:
            part = np.asarray(next(encoded), dtype=np.int32)
            ids_parts.append(part)
            lab_parts.append(part if learn else np.full(part.shape, IGNORE_INDEX, np.int32))
        ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int32)
        labels = np.concatenate(lab_parts) if lab_parts else np.zeros(0, np.int32)
        out.append((ids, labels))
    return out


class InstructionHandler(Handler):
    """Single- or multi-turn SFT samples: (input_ids, attention_mask, labels)."""

    outputs = INSTRUCTION_OUTPUTS

    def encode(self, records):
        results: list[Any] = []
        batch, where = [], []
        for loc, rec in records:
            try:
                batch.append(self._render(self.reader.conversation(loc, rec)))
                where.append(len(results))
                results.append(None)
            except InvalidRecord as e:
                results.append(e)
        for k, (ids, labels) in zip(where, self._encode_segments(batch)):
            if not (labels != IGNORE_INDEX).any():
                loc = records[k][0]
                results[k] = InvalidRecord(f"{loc}: no token left to learn after templating")
                continue
            results[k] = (ids, np.ones_like(ids), labels)
        return results


class AlpacaStyleInstructionHandler(InstructionHandler):
    """Alpaca fields instruction / input / output (+ system, history)."""

    name = "AlpacaStyleInstructionHandler"
    style = "alpaca"


class SharegptStyleInstructionHandler(InstructionHandler):
    """ShareGPT ``conversations`` (from/value) or OpenAI ``messages`` (role/content)."""

    name = "SharegptStyleInstructionHandler"
    style = "sharegpt"


class PairwiseHandler(Handler):
    """Preference pairs: the same prompt with a chosen and a rejected response."""

    outputs = PAIRWISE_OUTPUTS

    def encode(self, records):
        results: list[Any] = []
        batch, where = [], []
        for loc, rec in records:
            try:
                chosen, rejected = self.reader.pair(loc, rec)
                batch += [self._render(chosen), self._render(rejected)]
                where.append(len(results))
                results.append(None)
            except InvalidRecord as e:
                results.append(e)
        enc = self._encode_segments(batch)
        for j, k in enumerate(where):
            (c_ids, c_lab), (r_ids, r_lab) = enc[2 * j], enc[2 * j + 1]
            results[k] = (c_ids, np.ones_like(c_ids), c_lab, r_ids, np.ones_like(r_ids), r_lab)
        return results


class AlpacaStylePairwiseHandler(PairwiseHandler):
    """Alpaca prompt fields with ``chosen`` / ``rejected`` strings."""

    name = "AlpacaStylePairwiseHandler"
    style = "alpaca"


class SharegptStylePairwiseHandler(PairwiseHandler):
    """ShareGPT conversation ending on a user turn, with ``chosen`` / ``rejected`` replies."""

    name = "SharegptStylePairwiseHandler"
    style = "sharegpt"


class GeneralPretrainHandler(Handler):
    """Plain text documents (``text`` field) for continued pre-training; no template."""

    name = "GeneralPretrainHandler"
    outputs = PRETRAIN_OUTPUTS
    style = "pretrain"

    def encode(self, records):
        texts, where, results = [], [], []
        key = self.opt.map_keys.get("text", self.opt.pretrain_key)
        eod = [self.tok.eos_id] if self.opt.append_eod else []
        if self.opt.append_eod and self.tok.eos_id is None:
            raise ValueError("--append-eod: the tokenizer has no EOS token")
        for loc, rec in records:
            try:
                texts.append(self.reader.text(loc, rec, key))
                where.append(len(results))
                results.append(None)
            except InvalidRecord as e:
                results.append(e)
        for k, ids in zip(where, self.tok.encode_batch(texts) if texts else []):
            results[k] = (np.asarray(list(ids) + eod, dtype=np.int32),)
        return results


HANDLERS: dict[str, type[Handler]] = {h.name: h for h in (
    AlpacaStyleInstructionHandler, SharegptStyleInstructionHandler, AlpacaStylePairwiseHandler,
    SharegptStylePairwiseHandler, GeneralPretrainHandler)}


def get_handler(name: str) -> type[Handler]:
    """Handler class for ``--handler-name``; a ValueError lists the choices otherwise."""
    if name not in HANDLERS:
        raise ValueError(f"--handler-name: unknown handler '{name}' "
                         f"(choose from {', '.join(HANDLERS)})")
    return HANDLERS[name]
