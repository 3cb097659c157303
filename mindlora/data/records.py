"""Raw records: reading input files with locations, and validating their fields.

Every record travels with a location string (``file:line`` for JSON / JSON lines, ``file:row N``
for parquet) so any error can say exactly where the bad data is. Field names follow
LLaMA-Factory's dataset attributes and can be remapped with ``--map-keys``, e.g.
``'{"prompt": "question", "response": "answer"}'`` or, for ShareGPT,
``'{"messages": "dialog", "tags": {"role_tag": "role", "content_tag": "text"}}'``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mindlora.data.templates import Conversation, Message

INPUT_SUFFIXES = (".json", ".jsonl", ".parquet")
_SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                  "assistant_tag": "gpt", "observation_tag": "observation",
                  "function_tag": "function_call", "system_tag": "system"}
_OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                "assistant_tag": "assistant", "observation_tag": "tool",
                "function_tag": "function", "system_tag": "system"}
_DEFAULT_KEYS = {"prompt": "instruction", "query": "input", "response": "output",
                 "system": "system", "history": "history", "chosen": "chosen",
                 "rejected": "rejected", "messages": "conversations", "tools": "tools",
                 "text": "text"}


class InvalidRecord(ValueError):
    """A record that cannot be turned into a sample; the message starts with its location."""


def _invalid(msg: str) -> InvalidRecord:
    return InvalidRecord(msg)


class RawJSON(str):
    """A JSON line not parsed yet, so the parsing happens in the worker process that encodes it."""


def parse_record(loc: str, rec: Any) -> Any:
    """Parse a ``RawJSON`` line; a malformed one becomes an InvalidRecord naming file and line."""
    if not isinstance(rec, RawJSON):
        return rec
    try:
        return json.loads(rec)
    except json.JSONDecodeError as e:
        return _invalid(f"{loc}: malformed JSON ({e.msg}, column {e.colno})")


@dataclass(frozen=True)
class KeyMap:
    """Record field names, LLaMA-Factory defaults overridden by ``--map-keys``."""

    keys: dict[str, str]
    tags: dict[str, str] | None = None  # None: detect from/value vs role/content per record
    explicit: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_json(cls, style: str, map_keys: dict[str, Any] | None) -> "KeyMap":
        """Validate ``--map-keys`` (already parsed) and merge it over the defaults."""
        map_keys = dict(map_keys or {})
        tags = map_keys.pop("tags", None)
        unknown = sorted(set(map_keys) - set(_DEFAULT_KEYS))
        if unknown:
            raise ValueError(f"--map-keys: unknown key(s) {unknown} (known: "
                             f"{sorted(_DEFAULT_KEYS) + ['tags']})")
        if any(not isinstance(v, str) for v in map_keys.values()):
            raise ValueError("--map-keys: every value must be a field name (string)")
        if tags is not None:
            if not isinstance(tags, dict) or set(tags) - set(_SHAREGPT_TAGS):
                raise ValueError(f"--map-keys: 'tags' must be an object with keys from "
                                 f"{sorted(_SHAREGPT_TAGS)}")
            base = _OPENAI_TAGS if tags.get("role_tag") == "role" else _SHAREGPT_TAGS
            tags = {**base, **tags}
        return cls({**_DEFAULT_KEYS, **map_keys}, tags, frozenset(map_keys))


def _field(rec: dict, key: str, loc: str, *, required: bool = True,
           allow_empty: bool = False) -> str | None:
    if key not in rec or rec[key] is None:
        if required:
            raise _invalid(f"{loc}: missing field '{key}'")
        return None
    value = rec[key]
    if not isinstance(value, str):
        raise _invalid(f"{loc}: field '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        what = "empty response" if key in ("output", "chosen", "rejected") else "empty text"
        raise _invalid(f"{loc}: field '{key}' is empty ({what})")
    return value


class RecordReader:
    """Turns raw records of one style (alpaca, sharegpt, pretrain) into conversations or text."""

    def __init__(self, style: str, keymap: KeyMap) -> None:
        self.style = style
        self.km = keymap

    def _no_tools(self, loc: str, rec: dict) -> None:
        tools = rec.get(self.km.keys["tools"])
        if tools not in (None, "", [], "[]"):
            raise _invalid(f"{loc}: field '{self.km.keys['tools']}': tool definitions are not "
                           "supported by the templates yet")

    def conversation(self, loc: str, rec: Any) -> Conversation:
        """The whole dialogue of an instruction record (ends with an assistant turn)."""
        prompt, system = self._prompt(loc, rec, want_reply=True)
        return Conversation(tuple(prompt), system)

    def pair(self, loc: str, rec: Any) -> tuple[Conversation, Conversation]:
        """(chosen, rejected) dialogues sharing the prompt of a pairwise record."""
        prompt, system = self._prompt(loc, rec, want_reply=False)
        k = self.km.keys
        if self.style == "alpaca" and k["chosen"] not in rec and isinstance(
                rec.get(k["response"]), list):
            pair = rec[k["response"]]  # LLaMA-Factory's older form: "output": [chosen, rejected]
            if len(pair) != 2:
                raise _invalid(f"{loc}: field '{k['response']}' must hold [chosen, rejected]")
            rec = {**rec, k["chosen"]: pair[0], k["rejected"]: pair[1]}
        out = []
        for which in ("chosen", "rejected"):
            out.append(Conversation(tuple(prompt) + (self._reply(loc, rec, k[which]),), system))
        return out[0], out[1]

    def text(self, loc: str, rec: Any, key: str) -> str:
        """The document text of a pre-training record."""
        if not isinstance(rec, dict):
            raise _invalid(f"{loc}: expected a JSON object, got {type(rec).__name__}")
        return _field(rec, key, loc) or ""

    # -- internals ------------------------------------------------------------------------
    def _prompt(self, loc: str, rec: Any, want_reply: bool):
        if not isinstance(rec, dict):
            raise _invalid(f"{loc}: expected a JSON object, got {type(rec).__name__}")
        self._no_tools(loc, rec)
        if self.style == "alpaca":
            return self._alpaca(loc, rec, want_reply)
        return self._sharegpt(loc, rec, want_reply)

    def _alpaca(self, loc: str, rec: dict, want_reply: bool):
        k = self.km.keys
        prompt = _field(rec, k["prompt"], loc, allow_empty=True) or ""
        query = _field(rec, k["query"], loc, required=False, allow_empty=True)
        content = "\n".join([prompt, query]) if query else prompt
        if not content.strip():
            raise _invalid(f"{loc}: fields '{k['prompt']}'/'{k['query']}' are both empty")
        msgs: list[Message] = []
        history = rec.get(k["history"])
        if history:
            if not isinstance(history, list):
                raise _invalid(f"{loc}: field '{k['history']}' must be a list of [query, answer]")
            for n, turn in enumerate(history):
                if (not isinstance(turn, (list, tuple)) or len(turn) != 2
                        or not all(isinstance(x, str) for x in turn)):
                    raise _invalid(f"{loc}: field '{k['history']}'[{n}] must be [query, answer] "
                                   "strings")
                if not turn[1].strip():
                    raise _invalid(f"{loc}: field '{k['history']}'[{n}] has an empty response")
                msgs += [Message("user", turn[0]), Message("assistant", turn[1])]
        msgs.append(Message("user", content))
        if want_reply:
            msgs.append(Message("assistant", _field(rec, k["response"], loc) or ""))
        system = _field(rec, k["system"], loc, required=False, allow_empty=True)
        return msgs, system

    def _tags(self, loc: str, turns: list) -> dict[str, str]:
        if self.km.tags is not None:
            return self.km.tags
        first = turns[0]
        if isinstance(first, dict) and "role" in first and "from" not in first:
            return _OPENAI_TAGS
        return _SHAREGPT_TAGS

    def _sharegpt(self, loc: str, rec: dict, want_reply: bool):
        key = self.km.keys["messages"]
        if key not in rec and "messages" in rec and "messages" not in self.km.explicit:
            key = "messages"  # OpenAI-style files name the list "messages"
        turns = rec.get(key)
        if turns is None:
            raise _invalid(f"{loc}: missing field '{key}'")
        if not isinstance(turns, list) or not turns:
            raise _invalid(f"{loc}: field '{key}' must be a non-empty list of messages")
        tags = self._tags(loc, turns)
        system = _field(rec, self.km.keys["system"], loc, required=False, allow_empty=True)
        role_of = {tags["user_tag"]: "user", tags["observation_tag"]: "observation",
                   tags["assistant_tag"]: "assistant", tags["function_tag"]: "function"}
        msgs: list[Message] = []
        for n, turn in enumerate(turns):
            where = f"{loc}: {key}[{n}]"
            if not isinstance(turn, dict):
                raise _invalid(f"{where}: expected an object, got {type(turn).__name__}")
            role = turn.get(tags["role_tag"])
            content = _field(turn, tags["content_tag"], where, allow_empty=True)
            if n == 0 and role == tags["system_tag"]:
                system = content
                continue
            if role not in role_of:
                raise _invalid(f"{where}: unknown role '{role}' in field '{tags['role_tag']}' "
                               f"(expected one of {sorted(role_of)})")
            want_prompt = len(msgs) % 2 == 0
            if (role_of[role] in ("user", "observation")) != want_prompt:
                raise _invalid(f"{where}: role '{role}' out of order (turns must alternate "
                               "user/observation and assistant/function)")
            if not want_prompt and not (content or "").strip():
                raise _invalid(f"{where}: empty response")
            msgs.append(Message(role_of[role], content or ""))
        if not msgs:
            raise _invalid(f"{loc}: field '{key}' holds no user turn")
        if want_reply and len(msgs) % 2:
            raise _invalid(f"{loc}: field '{key}' must end with an assistant turn")
        if not want_reply and len(msgs) % 2 == 0:
            raise _invalid(f"{loc}: field '{key}' must end with a user turn for pairwise data")
        return msgs, system

    def _reply(self, loc: str, rec: dict, key: str) -> Message:
        value = rec.get(key)
        if isinstance(value, dict) and self.style == "sharegpt":
            tags = self.km.tags or (_OPENAI_TAGS if "role" in value else _SHAREGPT_TAGS)
            content = _field(value, tags["content_tag"], f"{loc}: {key}")
            role = "function" if value.get(tags["role_tag"]) == tags["function_tag"] else \
                "assistant"
            return Message(role, content or "")
        return Message("assistant", _field(rec, key, loc) or "")


def input_files(path: str | Path) -> list[Path]:
    """The data files behind ``--input``: the file itself or the folder's data files, sorted."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--input: {p} does not exist")
    if p.is_file():
        return [p]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in INPUT_SUFFIXES)
    if not files:
        raise ValueError(f"--input: folder {p} holds no {'/'.join(INPUT_SUFFIXES)} files")
    return files


def iter_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, record)``; JSON lines come as ``RawJSON`` (see ``parse_record``)."""
    for f in input_files(path):
        if f.suffix == ".parquet":
            yield from _iter_parquet(f)
        elif f.suffix == ".jsonl":
            yield from _iter_jsonl(f)
        elif f.suffix == ".json":
            yield from _iter_json(f)
        else:
            raise ValueError(f"--input: {f}: unsupported file type (use .json, .jsonl, .parquet)")


def _iter_jsonl(f: Path, text: str | None = None) -> Iterator[tuple[str, Any]]:
    lines = text.splitlines() if text is not None else open(f, encoding="utf-8")
    for n, line in enumerate(lines, 1):
        if line.strip():
            yield f"{f}:{n}", RawJSON(line)


def _iter_json(f: Path) -> Iterator[tuple[str, Any]]:
    """A JSON list, walked element by element so each record knows its line."""
    text = f.read_text(encoding="utf-8")
    start = len(text) - len(text.lstrip())
    if not text[start:start + 1] == "[":
        try:  # one pretty-printed object is one record
            obj = json.loads(text)
        except json.JSONDecodeError:
            yield from _iter_jsonl(f, text)  # many ".json" files are really JSON lines
            return
        yield f"{f}:{text.count(chr(10), 0, start) + 1}", obj
        return
    dec = json.JSONDecoder()
    pos, line, counted = start + 1, 1, 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise ValueError(f"{f}: unterminated JSON list (missing ']')")
        if text[pos] == "]":
            return
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}:{line}: malformed JSON in the list element starting here "
                             f"({e.msg} at line {e.lineno}, column {e.colno}); a broken element "
                             "of a JSON list cannot be skipped") from None
        yield f"{f}:{line}", obj


def _iter_parquet(f: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
        raise ValueError(f"--input: {f}: cannot read parquet ({e})") from e
    row = 0
    for batch in pf.iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            row += 1
            yield f"{f}:row {row}", rec
