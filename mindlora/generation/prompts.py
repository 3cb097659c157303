"""Prompts in, text out: reading prompt files, rendering them with a chat template, decoding.

A prompt is ``{"prompt": text}`` (one user turn) or ``{"messages": [...]}`` (a whole conversation,
system turn included, ending with a user turn). It is rendered with the same template code that
preprocessing uses (``mindlora.data.templates``), so the model sees at generation time exactly the
prompt layout it was trained on; the *generation prompt* is everything the template writes before
the assistant's answer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

from mindlora.data.templates import (PROMPT_ROLES, RESPONSE_ROLES, THINKING_MODES, Conversation,
                                     Message, Template, get_template)
from mindlora.data.tokenizer import Tokenizer

_MARK = "\x00mindlora-answer\x00"


@dataclass(frozen=True)
class PromptRecord:
    """One input line: its fields (echoed in the output) and where it came from."""

    fields: dict[str, Any]
    where: str
    """``file:line`` (or ``interactive``), used in every error about this prompt."""


def read_prompt_file(path: str, jsonl: bool | None = None) -> list[PromptRecord]:
    """Records of a prompt file; blank lines are skipped.

    Args:
        jsonl: True: every line is a JSON object; False: every line is a plain prompt; None:
            decided by the extension (``.jsonl`` / ``.json`` are JSON lines).
    """
    if jsonl is None:
        jsonl = path.endswith((".jsonl", ".json"))
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: prompt file not found") from None
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        if not jsonl:
            records.append(PromptRecord({"prompt": line}, where))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object with \"prompt\" or \"messages\"")
        to_conversation(PromptRecord(obj, where))  # validate now: fail before any generation
        records.append(PromptRecord(obj, where))
    if not records:
        raise ValueError(f"{path}: no prompts in the file")
    return records


def to_conversation(record: PromptRecord) -> tuple[str | None, list[Message]]:
    """(system, turns) of a record; turns alternate prompt/response and end with a prompt."""
    obj, where = record.fields, record.where
    if ("prompt" in obj) == ("messages" in obj):
        raise ValueError(f"{where}: give exactly one of \"prompt\" (text) or \"messages\" (list)")
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise ValueError(f"{where}: \"prompt\" must be a non-empty string")
        return None, [Message("user", obj["prompt"])]
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"{where}: \"messages\" must be a non-empty list")
    system, turns = None, []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: messages[{k}] must be {{\"role\": str, \"content\": str}}")
        role = {"tool": "observation"}.get(m["role"], m["role"])
        if role == "system" and k == 0:
            system = m["content"]
            continue
        want = PROMPT_ROLES if len(turns) % 2 == 0 else RESPONSE_ROLES
        if role not in want:
            raise ValueError(f"{where}: messages[{k}] has role '{m['role']}' but a turn of "
                             f"{'/'.join(want)} is expected here (system first, then user and "
                             f"assistant alternating)")
        turns.append(Message(role, m["content"]))
    if len(turns) % 2 == 0:
        raise ValueError(f"{where}: the conversation must end with a user turn to answer")
    return system, turns


class ChatFormat:
    """Template + tokenizer: prompt ids of a conversation, stop sequences, answer text.

    Args:
        tokenizer: a ``mindlora.data.tokenizer`` tokenizer.
        prompt_type: the template name (``--prompt-type``).
        enable_thinking: ``true`` / ``false`` / ``none``, as in preprocessing.
        templates_path: another templates.json (``--prompt-type-path``).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_type: str, enable_thinking: str = "none",
                 templates_path: str | None = None) -> None:
        self.tok = tokenizer
        self.template: Template = get_template(prompt_type, templates_path)
        if enable_thinking not in THINKING_MODES:
            raise ValueError(f"--enable-thinking must be one of {THINKING_MODES}, "
                             f"got '{enable_thinking}'")
        if enable_thinking != "none" and self.template.thought_words is None:
            raise ValueError(f"--enable-thinking {enable_thinking}: template '{prompt_type}' has "
                             f"no thought_words (use qwen3)")
        self.enable_thinking = enable_thinking

    def prompt_text(self, record: PromptRecord) -> str:
        """The rendered generation prompt of a record."""
        system, turns = to_conversation(record)
        conv = Conversation(tuple(turns) + (Message("assistant", _MARK),), system)
        segs = self.template.render(conv, bos=self.tok.bos_token, eos=self.tok.eos_token,
                                    enable_thinking=self.enable_thinking)
        answer = next(i for i, (text, _) in enumerate(segs) if _MARK in text)
        return "".join(text for text, _ in segs[:answer])

    def encode(self, records: Sequence[PromptRecord]) -> list[list[int]]:
        return self.tok.encode_batch([self.prompt_text(r) for r in records])

    def stop_sequences(self) -> list[list[int]]:
        """Id sequences that end an answer: the template's stop words and the tokenizer's EOS."""
        stops = [self.tok.encode(w) for w in self.template.stop_words]
        if self.tok.eos_id is not None:
            stops.append([self.tok.eos_id])
        unique = []
        for s in stops:
            if s and s not in unique:
                unique.append(s)
        return unique

    def answer_text(self, ids: Sequence[int]) -> str:
        """Decoded answer without the stop sequence and without special tokens."""
        ids = list(ids)
        for s in self.stop_sequences():
            if len(s) <= len(ids) and ids[-len(s):] == s:
                ids = ids[:-len(s)]
                break
        if self.tok.hf is not None:
            return self.tok.hf.decode(ids, skip_special_tokens=True)
        specials = {self.tok.bos_id, self.tok.eos_id}
        return self.tok.decode([t for t in ids if t not in specials])
