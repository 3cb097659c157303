"""A tiny byte-level BPE tokenizer with Qwen-style special tokens and chat templates.

Nothing can be downloaded in tests, benches or quick starts, yet the data pipeline must be checked
against a real ``transformers`` tokenizer and a real Jinja chat template. ``build_toy_tokenizer``
trains one in well under a second and saves it as a normal tokenizer folder.

The Jinja templates below are written in the style of the official Qwen3 / Qwen2 / ChatML
templates (same rendering rules for system, user, assistant, tool turns and ``<think>`` blocks)
so ``apply_chat_template`` is an independent reference for ``templates.json``.
"""
from __future__ import annotations

import os
from typing import Iterable

QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
              r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>",
                "</tool_response>"]

CHATML_JINJA = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

QWEN2_JINJA = (
    "{%- for message in messages %}"
    "{%- if loop.first and messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

QWEN3_JINJA = """
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or messages[loop.index0 - 1].role != "tool" %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != "tool" %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
""".strip()

CHAT_TEMPLATES = {"qwen3": QWEN3_JINJA, "qwen": QWEN2_JINJA, "chatml": CHATML_JINJA}

_CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.\n\nNew paragraph here!",
    "The quick brown fox jumps over the lazy dog 12345 times.\n",
    "Give three tips for staying healthy.\n1. Eat well.\n2. Sleep.\n3. Move.",
    "user\nassistant\nsystem\nYou are a helpful assistant.\n\n",
    "What is the capital of France? The capital of France is Paris.",
    "Translate to English: 你好，世界。 Hello, world.",
    "  indented  text\twith tabs\r\nand windows newlines\n\n\n",
    "def add(a, b):\n    return a + b\n",
]


def build_toy_tokenizer(out_dir: str | os.PathLike, chat_template: str = "qwen3",
                        vocab_size: int = 600, corpus: Iterable[str] | None = None) -> str:
    """Train a small byte-level BPE and save it as a ``transformers`` tokenizer folder.

    Args:
        out_dir: folder to write (``tokenizer.json``, ``tokenizer_config.json``, template).
        chat_template: key of ``CHAT_TEMPLATES`` or a Jinja string.
        vocab_size: BPE vocabulary size before the special tokens.
        corpus: training texts (a built-in mixed English/Chinese/code corpus by default).

    Returns:
        ``out_dir`` as a string.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(corpus or _CORPUS) * 20, trainer)
    tok.add_tokens(ADDED_TOKENS)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATES.get(chat_template, chat_template))
    hf.save_pretrained(os.fspath(out_dir))
    return os.fspath(out_dir)


def addition_records(n: int, seed: int = 0, high: int = 99) -> list[dict]:
    """``n`` Alpaca records asking to add two numbers: learnable in seconds by a small adapter,
    used by the quickstart, tests and benches (no data set is downloaded)."""
    import random

    rng = random.Random(seed)
    records = []
    for _ in range(n):
        a, b = rng.randint(0, high), rng.randint(0, high)
        records.append({"instruction": "Add the two numbers.", "input": f"{a} + {b}",
                        "output": f"{a} + {b} = {a + b}"})
    return records
