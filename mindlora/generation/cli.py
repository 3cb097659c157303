"""The ``mindlora.generate`` run: prompts file -> answers JSONL, or an interactive chat.

Rank 0 reads and renders the prompts and broadcasts their ids (the file need only exist there);
every rank then runs the same generation loop; only rank 0 writes. A bad prompt line fails on
every rank with the same message, before the model is loaded.
"""
from __future__ import annotations

import json
import sys
from typing import Callable, Optional, TextIO

import torch.distributed as dist
from megatron.core import parallel_state

from mindlora.data.tokenizer import load_tokenizer
from mindlora.generation.args import GenerateConfig
from mindlora.generation.engine import Generation, Generator, check_prompt_lengths
from mindlora.generation.loading import load_for_generation, read_model_config
from mindlora.generation.prompts import ChatFormat, PromptRecord, read_prompt_file
from mindlora.runtime import init_distributed
from mindlora.runtime.files import atomic_path


def _from_rank0(fn: Callable[[], object]) -> object:
    """``fn()`` evaluated on rank 0 and broadcast; an exception there is raised on every rank."""
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except (ValueError, FileNotFoundError) as e:
            box[0] = ("error", f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        kind, _, msg = value.partition(": ")
        raise (FileNotFoundError if kind == "FileNotFoundError" else ValueError)(msg)
    return value


def run(cfg: GenerateConfig, log: Callable[[str], None] = print,
        stdout: Optional[TextIO] = None) -> Optional[list[dict]]:
    """Run generation as configured (collective); rank 0 returns the output rows."""
    init_distributed()
    tok = load_tokenizer(cfg.tokenizer)
    chat = ChatFormat(tok, cfg.prompt_type, cfg.enable_thinking, cfg.prompt_type_path)
    max_positions = read_model_config(cfg.load, cfg.tokenizer).max_position_embeddings
    encoded = None
    if not cfg.interactive:
        def read() -> tuple[list[PromptRecord], list[list[int]]]:
            records = read_prompt_file(cfg.prompts, jsonl=True)
            ids = chat.encode(records)
            check_prompt_lengths(ids, max_positions, [r.where for r in records])
            return records, ids
        encoded = _from_rank0(read)
    if cfg.parallel.sequence_parallel:
        log("> --sequence-parallel: generation runs the tensor-parallel layers without sequence "
            "parallelism (a one-token decode step cannot be split along the sequence); the "
            "weights and the answers are the same")
    loaded = load_for_generation(cfg.load, cfg.lora_load, cfg.parallel, cfg.dtype,
                                 cfg.lora_fusion, cfg.sampling.seed, hf_config_dir=cfg.tokenizer)
    if tok.vocab_size > loaded.model.vocab_size:
        raise ValueError(f"--tokenizer-name-or-path {cfg.tokenizer} has {tok.vocab_size} ids but "
                         f"the model in --load {cfg.load} only {loaded.model.vocab_size}: "
                         f"another model's tokenizer?")
    log(f"> loaded {cfg.load}" + (f" + adapter {cfg.lora_load}" if cfg.lora_load else
                                  " (base model, no adapter)"))
    gen = Generator(loaded.chunks, loaded.model.vocab_size, loaded.model.max_position_embeddings,
                    chat.stop_sequences(), tok.pad_id, cfg.micro_batch_size)
    if cfg.interactive:
        interactive(gen, chat, cfg, stdout or sys.stdout)
        return None
    records, ids = encoded
    results = generate_data_parallel(gen, ids, cfg, [r.where for r in records])
    if dist.get_rank() != 0:
        return None
    rows = [dict(r.fields, answer=chat.answer_text(g.token_ids), token_ids=g.token_ids,
                 tokens_per_s=round(g.tokens_per_s, 2)) for r, g in zip(records, results)]
    write_jsonl(rows, cfg.output, stdout or sys.stdout)
    return rows


def generate_data_parallel(gen: Generator, ids: list[list[int]], cfg: GenerateConfig,
                           names: list[str]) -> list[Generation]:
    """Prompts dealt round-robin over the data-parallel replicas, answers gathered in order.

    With world size = TP x PP (one replica) this is ``gen.generate``. Every rank of a replica
    generates the same answers; the all-gather collects them (duplicates are identical). With
    expert parallelism the data-parallel ranks of one expert group dispatch tokens to each other
    in every MoE layer, so they must run the same batches in lockstep: every rank then generates
    every prompt (no round-robin).
    """
    dp = parallel_state.get_data_parallel_world_size()
    if dp == 1 or parallel_state.get_expert_model_parallel_world_size() > 1:
        return gen.generate(ids, cfg.sampling, names=names)
    mine = list(range(parallel_state.get_data_parallel_rank(), len(ids), dp))
    results = gen.generate([ids[i] for i in mine], cfg.sampling, names=[names[i] for i in mine])
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(zip(mine, results)))
    by_index = {i: g for part in gathered for i, g in part}
    return [by_index[i] for i in range(len(ids))]


def write_jsonl(rows: list[dict], path: Optional[str], stdout: TextIO) -> None:
    """One JSON object a line to ``path`` (atomically: temp file, fsync, rename) or stdout."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if path is None:
        stdout.write(text)
        stdout.flush()
        return
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def interactive(gen: Generator, chat: ChatFormat, cfg: GenerateConfig, out: TextIO) -> None:
    """Chat in the terminal: answers stream as they are generated; the conversation is kept.

    ``/clear`` starts a new conversation; ``exit``, ``quit`` or end of input stops.
    """
    rank0 = dist.get_rank() == 0
    if rank0:
        out.write("Type a message (/clear: new conversation, exit: quit)\n")
    history: list[dict] = []
    while True:
        def ask() -> Optional[str]:
            try:
                line = input(">>> ")
            except EOFError:
                return None
            return None if line.strip() in ("exit", "quit") else line
        text = _from_rank0(ask)
        if text is None:
            break
        if not text.strip():
            continue
        if text.strip() == "/clear":
            history = []
            continue
        record = PromptRecord({"messages": history + [{"role": "user", "content": text}]},
                              "interactive")
        ids = chat.encode([record])
        try:  # every rank sees the same ids, so every rank takes the same branch
            check_prompt_lengths(ids, gen.max_positions, ["interactive"])
        except ValueError as e:
            if rank0:
                out.write(f"{e} (/clear starts a new conversation)\n")
            continue
        shown: list[str] = [""]
        answer: list[int] = []

        def stream(_: int, token: int) -> None:
            answer.append(token)
            text_now = chat.answer_text(answer)
            if rank0 and not text_now.endswith("\ufffd"):  # wait for a whole UTF-8 character
                out.write(text_now[len(shown[0]):])
                out.flush()
                shown[0] = text_now

        result = gen.generate(ids, cfg.sampling, names=["interactive"], stream=stream)[0]
        reply = chat.answer_text(result.token_ids)
        if rank0:
            out.write(reply[len(shown[0]):] + f"\n[{result.tokens_per_s:.1f} tokens/s]\n")
            out.flush()
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
