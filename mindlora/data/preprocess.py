"""The preprocessing run behind ``mindlora-preprocess`` (MindSpeed-LLM's flags and names).

Flow: input files -> chunks of records -> (pool of ``--workers`` processes) handler: validate,
render, batch-tokenise -> length policy -> optional packing -> indexed writers -> rename.

Chunks come back in input order (``imap``), so 1 and N workers write the same bytes. Every output
is written under a temporary name and renamed only after all of them are complete; any error
removes the temporaries, so a failed run leaves no partial dataset behind.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np

from mindlora.config import fail_if
from mindlora.data.handlers import (HANDLERS, GeneralPretrainHandler, Handler, HandlerOptions,
                                    InstructionHandler, get_handler)
from mindlora.data.indexed import IndexedDatasetWriter
from mindlora.data.meta import stage_meta
from mindlora.data.packing import OVERLONG_POLICIES, limit_length, pack_samples
from mindlora.data.records import InvalidRecord, iter_records, parse_record
from mindlora.data.templates import THINKING_MODES, get_template
from mindlora.data.tokenizer import load_tokenizer
from mindlora.runtime.cli import json_object, option

log = logging.getLogger("mindlora.data")


@dataclass
class PreprocessConfig:
    """One preprocessing run; the fields are the CLI flags (``--output-prefix`` -> output_prefix;
    mindlora.data.cli builds the parser from them)."""

    input: str
    """A .json/.jsonl/.parquet file or a folder of them."""
    tokenizer_name_or_path: str
    """Local HF tokenizer folder, sentencepiece .model or tiktoken file."""
    output_prefix: str
    """Outputs are <prefix>_packed_<key>_document.bin/.idx (pretrain: <prefix>_<key>_document)."""
    handler_name: str = option("AlpacaStyleInstructionHandler", choices=tuple(HANDLERS))
    """How records are read and rendered (MindSpeed-LLM's handler names)."""
    prompt_type: str | None = None
    """Template name in templates.json."""
    prompt_type_path: str | None = None
    """templates.json to read (default: configs/finetune/templates.json)."""
    enable_thinking: str = option("none", type=str.lower, choices=THINKING_MODES)
    """Reasoning templates: true / false / none (the template's default)."""
    seq_length: int | None = None
    """Length limit per sample (and the packed row length with --pack)."""
    pack: bool = False
    """Pack samples into --seq-length rows."""
    overlong: str = option("drop", choices=OVERLONG_POLICIES)
    """What to do with samples longer than --seq-length."""
    map_keys: dict[str, Any] = option(default_factory=dict, type=json_object)
    """JSON object remapping field names, e.g. {"prompt": "question"}."""
    json_keys: tuple[str, ...] = ("text",)
    """Pretrain text field."""
    workers: int = 1
    """Tokenising processes."""
    log_interval: int = 1000
    """A progress line every N samples."""
    append_eod: bool = False
    """Add EOS at the end of every sample."""
    train_on_inputs: bool = False
    """Learn prompt tokens too (labels not masked)."""
    mask_history: bool = False
    """Learn only the last assistant turn of multi-turn samples."""
    skip_invalid: bool = False
    """Skip and count malformed records instead of failing."""
    chunk_size: int = option(512, cli=False)
    """Records per tokenisation batch / pool task."""

    def __post_init__(self) -> None:
        errors = []
        if self.handler_name not in HANDLERS:
            errors.append(f"--handler-name: unknown handler '{self.handler_name}' "
                          f"(choose from {', '.join(HANDLERS)})")
        pretrain = self.handler_name == GeneralPretrainHandler.name
        if self.enable_thinking not in THINKING_MODES:
            errors.append(f"--enable-thinking must be one of {THINKING_MODES}, "
                          f"got '{self.enable_thinking}'")
        if self.overlong not in OVERLONG_POLICIES:
            errors.append(f"--overlong must be one of {OVERLONG_POLICIES}, got '{self.overlong}'")
        if self.seq_length is not None and self.seq_length <= 0:
            errors.append(f"--seq-length must be positive, got {self.seq_length}")
        if self.pack and self.seq_length is None:
            errors.append("--pack needs --seq-length (the packed row length)")
        if self.pack and not issubclass(HANDLERS.get(self.handler_name, Handler),
                                        InstructionHandler):
            errors.append(f"--pack is for instruction handlers, not {self.handler_name}")
        for name in ("workers", "log_interval", "chunk_size"):
            if getattr(self, name) < 1:
                errors.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not pretrain and not self.prompt_type:
            errors.append(f"--prompt-type is required for {self.handler_name}")
        if not pretrain and self.prompt_type:
            try:
                tpl = get_template(self.prompt_type, self.prompt_type_path)
                if self.enable_thinking != "none" and tpl.thought_words is None:
                    errors.append(f"--enable-thinking {self.enable_thinking}: template "
                                  f"'{self.prompt_type}' has no thought_words (use qwen3)")
            except (ValueError, FileNotFoundError) as e:
                errors.append(str(e))
        if not isinstance(self.map_keys, dict):
            errors.append("--map-keys must be a JSON object")
        fail_if(errors, "preprocessing arguments")

    def handler_options(self) -> HandlerOptions:
        """The handler's share of the configuration."""
        pretrain = self.handler_name == GeneralPretrainHandler.name
        return HandlerOptions(
            template=None if pretrain else get_template(self.prompt_type or "",
                                                        self.prompt_type_path),
            enable_thinking=self.enable_thinking, train_on_inputs=self.train_on_inputs,
            mask_history=self.mask_history, append_eod=self.append_eod,
            map_keys=dict(self.map_keys), pretrain_key=self.json_keys[0])

    def output_names(self, handler: type[Handler]) -> list[str]:
        """Dataset prefixes written, in the handler's output order (MindSpeed's naming)."""
        if handler is GeneralPretrainHandler:
            return [f"{self.output_prefix}_{self.json_keys[0]}_document"]
        return [f"{self.output_prefix}_packed_{key}_document" for key in handler.outputs]


@dataclass
class Summary:
    """What a run did; ``samples`` counts input records, ``documents`` output rows."""

    samples: int = 0
    written: int = 0
    documents: int = 0
    tokens: int = 0
    dropped: int = 0
    truncated: int = 0
    invalid: int = 0
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)


# -- worker side ----------------------------------------------------------------------------
_WORKER: Handler | None = None


def _init_worker(cfg: PreprocessConfig) -> None:
    global _WORKER
    # One process per core already; keep the Rust tokenizer from spawning threads on top.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = get_handler(cfg.handler_name)(load_tokenizer(cfg.tokenizer_name_or_path),
                                            cfg.handler_options())


def _encode_chunk(chunk: list[tuple[str, Any]]) -> list[Any]:
    assert _WORKER is not None, "worker not initialised"
    return _encode_with(_WORKER, chunk)


def _encode_with(handler: Handler, chunk: list[tuple[str, Any]]) -> list[Any]:
    chunk = [(loc, parse_record(loc, rec)) for loc, rec in chunk]
    good = [(loc, rec) for loc, rec in chunk if not isinstance(rec, InvalidRecord)]
    encoded = iter(handler.encode(good))
    return [rec if isinstance(rec, InvalidRecord) else next(encoded) for _, rec in chunk]


def _chunks(cfg: PreprocessConfig) -> Iterator[list[tuple[str, Any]]]:
    chunk: list[tuple[str, Any]] = []
    for item in iter_records(cfg.input):
        chunk.append(item)
        if len(chunk) >= cfg.chunk_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# -- main side ------------------------------------------------------------------------------
def run_preprocess(cfg: PreprocessConfig) -> Summary:
    """Run one preprocessing job; returns its summary (also logged).

    Raises:
        ValueError / FileNotFoundError: bad input, naming the file and line; nothing is left
            at the output prefix.
    """
    handler_cls = get_handler(cfg.handler_name)
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path)
    names = cfg.output_names(handler_cls)
    group = 1 if handler_cls is GeneralPretrainHandler else 3
    summary, start = Summary(outputs=names), time.time()
    writers = [IndexedDatasetWriter(n) for n in names]
    staged_meta = None
    pool = None
    try:
        if cfg.workers > 1:
            pool = mp.get_context("fork").Pool(cfg.workers, _init_worker, (cfg,))
            results = pool.imap(_encode_chunk, _chunks(cfg))
        else:
            handler = handler_cls(tokenizer, cfg.handler_options())
            results = (_encode_with(handler, c) for c in _chunks(cfg))
        kept: list = []  # samples of this chunk (of the whole input when packing)
        for chunk in results:
            for item in chunk:
                _consume(item, cfg, summary, kept, group)
                if summary.samples % cfg.log_interval == 0:
                    _progress(summary, start)
            if not cfg.pack:
                _write(writers, kept)
                kept = []
        if cfg.pack:
            _write(writers, pack_samples(kept, cfg.seq_length or 0))
        summary.documents = len(writers[0])
        for w in writers:
            w.finalize()
        summary.seconds = time.time() - start
        staged_meta = stage_meta(cfg.output_prefix, _meta(cfg, tokenizer, summary))
        for w in writers:
            w.commit()
        staged_meta.commit()
    except BaseException:
        for w in writers:
            w.abort()
        if staged_meta is not None:
            staged_meta.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    _report(summary)
    return summary


def _write(writers: list[IndexedDatasetWriter], samples: list) -> None:
    """One write per output for a whole batch of one-sequence documents."""
    if not samples:
        return
    for k, w in enumerate(writers):
        arrays = [s[k] for s in samples]
        w.add_documents(np.concatenate(arrays), [len(a) for a in arrays])


def _consume(item: Any, cfg: PreprocessConfig, summary: Summary, kept: list,
             group: int) -> None:
    summary.samples += 1
    if isinstance(item, InvalidRecord):
        if not cfg.skip_invalid:
            raise ValueError(f"{item} (use --skip-invalid to skip and count such records)")
        summary.invalid += 1
        if summary.invalid <= 10:
            log.warning("skipped invalid record: %s", item)
        return
    # Pre-training documents are cut into seq_length windows at training time, never dropped.
    limit = cfg.seq_length if group > 1 else None
    sample, status = limit_length(item, limit, cfg.overlong, group)
    if status == "dropped":
        summary.dropped += 1
        return
    summary.truncated += status == "truncated"
    summary.written += 1
    summary.tokens += sum(len(a) for a in sample[::group])
    kept.append(sample)


def _progress(s: Summary, start: float) -> None:
    dt = max(time.time() - start, 1e-9)
    log.info("processed %d samples (%.1f samples/s, %.1f tokens/s)", s.samples, s.samples / dt,
             s.tokens / dt)


def _report(s: Summary) -> None:
    log.info("done in %.2fs: %d samples read, %d written as %d documents, %d tokens, "
             "%d dropped (too long), %d truncated, %d invalid skipped; %.1f samples/s, "
             "%.1f tokens/s", s.seconds, s.samples, s.written, s.documents, s.tokens, s.dropped,
             s.truncated, s.invalid, s.samples / max(s.seconds, 1e-9),
             s.tokens / max(s.seconds, 1e-9))
    for name in s.outputs:
        log.info("wrote %s.bin / .idx", name)


def _meta(cfg: PreprocessConfig, tokenizer, summary: Summary) -> dict[str, Any]:
    return {
        "tokenizer_path": os.path.abspath(cfg.tokenizer_name_or_path),
        "tokenizer_kind": tokenizer.kind, "tokenizer_fingerprint": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id, "handler_name": cfg.handler_name,
        "prompt_type": cfg.prompt_type, "enable_thinking": cfg.enable_thinking,
        "seq_length": cfg.seq_length, "pack": cfg.pack,
        "train_on_inputs": cfg.train_on_inputs, "mask_history": cfg.mask_history,
        "append_eod": cfg.append_eod, "outputs": [os.path.basename(n) for n in summary.outputs],
        "summary": {k: v for k, v in asdict(summary).items() if k != "outputs"},
    }
