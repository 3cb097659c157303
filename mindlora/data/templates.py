"""Chat templates from ``configs/finetune/templates.json`` (MindSpeed-LLM / LLaMA-Factory schema).

A template turns a conversation into text *segments*, each marked learned or not; the handler
tokenises them and sets labels of unlearned tokens to -100. Slots are lists whose items are:
a string with ``{{content}}`` / ``{{idx}}`` placeholders, ``{"token": "<x>"}`` (a special token
written as text), or ``["bos_token"]`` / ``["eos_token"]`` (the tokenizer's BOS/EOS; EOS is
``stop_words[0]`` when ``replace_eos`` is set).

Reasoning templates (``thought_words``, e.g. qwen3) reproduce Qwen3's own Jinja chat template:
thoughts are kept only in assistant turns after the last user query, the final turn always shows
a ``<think>`` block (empty when the data has none), and ``enable_thinking`` decides:
``"true"``: the block is learned even when it is empty (all data is "slow thinking");
``"false"``: thoughts are removed and the empty block sits in the prompt, unlearned;
``"none"``: data as it is: a block present in the data is learned, an added empty one is not.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_TEMPLATES = Path(__file__).resolve().parents[2] / "configs" / "finetune" / "templates.json"
THINKING_MODES = ("true", "false", "none")
_FORMAT_KEYS = ("format_user", "format_assistant", "format_system", "format_function",
                "format_observation", "format_separator", "format_prefix", "format_tools")
_OTHER_KEYS = ("name", "default_system", "stop_words", "efficient_eos", "replace_eos",
               "force_system", "thought_words", "template_class")
_DEFAULT_THOUGHT = ("<think>\n", "\n</think>\n\n")
PROMPT_ROLES = ("user", "observation")
RESPONSE_ROLES = ("assistant", "function")


@dataclass(frozen=True)
class Message:
    """One turn. role is user/observation (prompt side) or assistant/function (response side)."""

    role: str
    content: str


@dataclass(frozen=True)
class Conversation:
    """Turns alternating prompt, response, ...; always ending with a response."""

    messages: tuple[Message, ...]
    system: str | None = None


@dataclass(frozen=True)
class Template:
    """A parsed template entry; field names follow templates.json."""

    name: str
    format_user: tuple
    format_assistant: tuple
    format_system: tuple
    format_function: tuple
    format_observation: tuple
    format_separator: tuple = ()
    format_prefix: tuple = ()
    default_system: str = ""
    stop_words: tuple[str, ...] = ()
    efficient_eos: bool = False
    replace_eos: bool = False
    thought_words: tuple[str, str] | None = None
    system_in_user: bool = False  # Llama-2 style: the system text opens the first user turn
    extra: dict = field(default_factory=dict, compare=False)

    def eos_text(self, tokenizer_eos: str | None) -> str:
        """The end-of-turn string this template writes for ``["eos_token"]``."""
        if self.replace_eos and self.stop_words:
            return self.stop_words[0]
        if tokenizer_eos is None:
            raise ValueError(f"template '{self.name}' needs an EOS token but the tokenizer has none")
        return tokenizer_eos

    def render(self, conv: Conversation, *, bos: str | None, eos: str | None,
               enable_thinking: str = "none", train_on_inputs: bool = False,
               mask_history: bool = False) -> list[tuple[str, bool]]:
        """Segments ``(text, learned)`` of a conversation; joined, they are the model's input.

        Args:
            conv: the conversation.
            bos / eos: the tokenizer's BOS / EOS strings.
            enable_thinking: ``"true"``, ``"false"`` or ``"none"`` (see module docstring).
            train_on_inputs: learn prompt tokens too.
            mask_history: learn only the last response.
        """
        specials = {"bos_token": bos, "eos_token": self.eos_text(eos) if eos or self.replace_eos
                    else None}
        msgs = conv.messages
        system = conv.system if conv.system is not None else self.default_system
        thoughts = self._thoughts(msgs, enable_thinking) if self.thought_words else None
        segs: list[tuple[str, bool]] = []
        for t in range(0, len(msgs), 2):
            prompt, reply = msgs[t], msgs[t + 1]
            text = ""
            content = prompt.content
            if t == 0:
                text += _fill(self.format_prefix, specials, self.name)
                if system and self.system_in_user:
                    content = _fill(self.format_system, specials, self.name, system) + content
                elif system:
                    text += _fill(self.format_system, specials, self.name, system)
            else:
                text += _fill(self.format_separator, specials, self.name)
            fmt = self.format_user if prompt.role == "user" else self.format_observation
            text += _fill(fmt, specials, self.name, content, idx=t // 2 + 1)
            answer = reply.content
            learn = not mask_history or t + 2 == len(msgs)
            if thoughts is not None:
                block, answer, block_learned = thoughts[t + 1]
                if block and not block_learned:
                    text += block
                elif block:
                    answer = block + answer
            segs.append((text, train_on_inputs))
            fmt = self.format_assistant if reply.role == "assistant" else self.format_function
            segs.append((_fill(fmt, specials, self.name, answer), learn))
        if self.efficient_eos:
            segs.append((specials["eos_token"] or "", True))
        return [(s, learned) for s, learned in segs if s]

    def _thoughts(self, msgs: tuple[Message, ...], mode: str) -> dict[int, tuple[str, str, bool]]:
        """Per response index: (think block, answer text, block learned), as Qwen3's Jinja does."""
        assert self.thought_words is not None
        open_w, close_w = self.thought_words
        open_tag, close_tag = open_w.strip(), close_w.strip()
        last_query = max((i for i, m in enumerate(msgs) if m.role == "user"), default=-1)
        out = {}
        for i in range(1, len(msgs), 2):
            content = msgs[i].content
            has_tags = close_tag in content
            reasoning, answer = "", content
            if has_tags:
                reasoning = content.split(close_tag)[0].rstrip("\n").split(open_tag)[-1].lstrip("\n")
                answer = content.split(close_tag)[-1].lstrip("\n")
            if mode == "false":
                reasoning, has_tags = "", False
            is_last = i == len(msgs) - 1
            if i > last_query and (is_last or reasoning):
                block = open_w + reasoning.strip("\n") + close_w
                out[i] = (block, answer.lstrip("\n"), mode == "true" or has_tags)
            else:
                out[i] = ("", answer, False)
        return out


def _fill(slots: tuple, specials: dict[str, str | None], name: str, content: str = "",
          idx: int = 1) -> str:
    parts = []
    for slot in slots:
        if isinstance(slot, str):
            parts.append(slot.replace("{{content}}", content).replace("{{idx}}", str(idx)))
        elif isinstance(slot, dict) and set(slot) == {"token"}:
            parts.append(slot["token"])
        elif isinstance(slot, (list, tuple)) and len(slot) == 1 and slot[0] in specials:
            tok = specials[slot[0]]
            if tok is None:
                raise ValueError(f"template '{name}' uses {slot[0]} but the tokenizer has none")
            parts.append(tok)
        else:
            raise ValueError(f"template '{name}': unsupported slot {slot!r}")
    return "".join(parts)


def _slots(entry: dict, key: str, name: str) -> tuple | None:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("slots", [])
    if not isinstance(value, list):
        raise ValueError(f"template '{name}': {key} must be a list of slots or {{'slots': [...]}}")
    return tuple(tuple(v) if isinstance(v, list) else v for v in value)


def parse_template(entry: dict[str, Any]) -> Template:
    """Build a Template from one templates.json entry, filling LLaMA-Factory's defaults."""
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"template entry without a 'name': {entry!r}")
    unknown = sorted(set(entry) - set(_FORMAT_KEYS) - set(_OTHER_KEYS))
    if unknown:
        raise ValueError(f"template '{name}': unknown keys {unknown}")
    user = _slots(entry, "format_user", name)
    if user is None:
        raise ValueError(f"template '{name}': format_user is required")
    efficient_eos = bool(entry.get("efficient_eos", False))
    assistant = _slots(entry, "format_assistant", name)
    if assistant is None:
        assistant = ("{{content}}",) if efficient_eos else ("{{content}}", ("eos_token",))
    thought = entry.get("thought_words")
    if thought is None and entry.get("template_class") == "ReasoningTemplate":
        thought = _DEFAULT_THOUGHT
    if thought is not None and (not isinstance(thought, (list, tuple)) or len(thought) != 2):
        raise ValueError(f"template '{name}': thought_words must be [open, close]")
    stop = entry.get("stop_words", [])
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"template '{name}': stop_words must be a list of strings")
    return Template(
        name=name, format_user=user, format_assistant=assistant,
        format_system=_slots(entry, "format_system", name) or ("{{content}}",),
        format_function=_slots(entry, "format_function", name) or assistant,
        format_observation=_slots(entry, "format_observation", name) or user,
        format_separator=_slots(entry, "format_separator", name) or (),
        format_prefix=_slots(entry, "format_prefix", name) or (),
        default_system=entry.get("default_system", "") or "",
        stop_words=tuple(stop), efficient_eos=efficient_eos,
        replace_eos=bool(entry.get("replace_eos", False)),
        thought_words=tuple(thought) if thought is not None else None,
        system_in_user=entry.get("template_class") == "Llama2Template",
        extra={k: entry[k] for k in ("format_tools", "force_system") if k in entry})


def load_templates(path: str | Path | None = None) -> dict[str, Template]:
    """All templates of a templates.json (default: the one shipped in configs/finetune)."""
    path = Path(path) if path else DEFAULT_TEMPLATES
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"--prompt-type-path: templates file {path} not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of templates")
    return {t.name: t for t in map(parse_template, entries)}


def get_template(name: str, path: str | Path | None = None) -> Template:
    """The template called ``name``; a ValueError lists the known names otherwise."""
    templates = load_templates(path)
    if name not in templates:
        raise ValueError(f"--prompt-type: unknown template '{name}' (known in "
                         f"{path or DEFAULT_TEMPLATES}: {', '.join(sorted(templates))})")
    return templates[name]
