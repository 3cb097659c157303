"""``--eval-prompts``: greedy answers to fixed prompts every ``--eval-interval`` while training.

Loss curves say little about *what* a model says; these samples show it (XTuner's
``evaluation_inputs`` do the same). The prompts are rendered with the chat template the data was
preprocessed with (``--prompt-type``, else the one recorded in the first dataset's sidecar) and
the same tokenizer (``--tokenizer-name-or-path``, else the sidecar's), answered by
``mindlora.generation.Generator`` on the live model chunks (LoRA included), and written to the
log, to ``<save>/samples.jsonl`` (one line per prompt, with the iteration) and to TensorBoard
text. Every rank takes part (the generation loop is collective); only global rank 0 writes.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

import torch
import torch.distributed as dist

from mindlora.config import ModelConfig
from mindlora.data.dataset import parse_data_path
from mindlora.data.meta import read_dataset_meta
from mindlora.data.tokenizer import load_tokenizer
from mindlora.generation import ChatFormat, Generator, SamplingConfig, read_prompt_file
from mindlora.generation.engine import check_prompt_lengths

SAMPLES_FILE = "samples.jsonl"


class SampleAnswers:
    """Answers ``--eval-prompts`` with the training model (collective: every rank builds one)."""

    def __init__(self, run, chunks: list[torch.nn.Module], model: ModelConfig,
                 log: Callable[[str], None], tensorboard=None) -> None:
        t, d = run.train, run.data
        meta = read_dataset_meta(parse_data_path(d.data_path)[0][1], required=False) or {}
        tokenizer = d.tokenizer_name_or_path or meta.get("tokenizer_path")
        prompt_type = d.prompt_type or meta.get("prompt_type")
        if not tokenizer or not prompt_type:
            raise ValueError(f"--eval-prompts {t.eval_prompts} needs --tokenizer-name-or-path and "
                             f"--prompt-type (the data's sidecar records neither)")
        thinking = meta.get("enable_thinking") if prompt_type == meta.get("prompt_type") else None
        self.chat = ChatFormat(load_tokenizer(tokenizer), prompt_type, thinking or "none")
        self.records = read_prompt_file(t.eval_prompts)
        self.ids = self.chat.encode(self.records)
        check_prompt_lengths(self.ids, model.max_position_embeddings,
                             [r.where for r in self.records])
        self.generator = Generator(chunks, model.vocab_size, model.max_position_embeddings,
                                   self.chat.stop_sequences(), self.chat.tok.pad_id)
        self.sampling = SamplingConfig(max_new_tokens=t.eval_max_new_tokens)
        self.path = os.path.join(t.save, SAMPLES_FILE) if t.save else None
        self.log, self.tensorboard = log, tensorboard

    def write(self, iteration: int) -> Optional[list[dict]]:
        """Generate and record the answers of ``iteration``; rank 0 returns the rows."""
        results = self.generator.generate(self.ids, self.sampling,
                                          names=[r.where for r in self.records])
        if dist.get_rank() != 0:
            return None
        rows = [dict(iteration=iteration, **r.fields, answer=self.chat.answer_text(g.token_ids),
                     token_ids=g.token_ids) for r, g in zip(self.records, results)]
        lines = [f" sample answers at iteration {iteration}:"]
        for r, row in zip(self.records, rows):
            asked = r.fields.get("prompt") or r.fields["messages"][-1]["content"]
            lines.append(f"   {asked!r} -> {row['answer']!r}")
        self.log("\n".join(lines))
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                f.flush()
                os.fsync(f.fileno())
        if self.tensorboard is not None:
            text = "\n\n".join(f"**{i}.** {line.strip()}" for i, line in enumerate(lines[1:]))
            self.tensorboard.add_text("sample answers", text, iteration)
        return rows
