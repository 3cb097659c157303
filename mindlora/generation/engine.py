"""Autoregressive generation over this rank's megatron-core GPTModel chunk(s), with a KV cache.

The KV cache is megatron-core's own ``StaticInferenceContext``: every SelfAttention layer stores
its keys and values in the context's buffers and attends over all of them, so a decode step feeds
one token per sequence. Prompts of different lengths are *left*-padded to a common length; an
explicit attention mask hides the padding (and is causal during the prompt). RoPE then sees each
real token at its padded index: the offset is the same for every token of a sequence, and RoPE
attention depends only on position differences, so the result is the unpadded one (tests compare
batched with one-at-a-time generation, and with Hugging Face ``generate``).

Parallelism: every rank runs the same loop on the same token buffer. Tensor-parallel ranks gather
the vocabulary-parallel logits (``runtime_gather_output``); pipeline stages pass activations to
the next stage with ``send``/``recv`` on the pipeline group (chunks in interleaved order when a
rank holds several), and the last stage broadcasts the chosen tokens to the pipeline group. Every
rank therefore holds the same tokens and decides the same stops, with no other collective.
``mindlora.generate`` builds its model without sequence parallelism (a one-token decode step
cannot be split along the sequence; the weights, and so the results, are the same). A model that
was built *with* it (the training loop's, for ``--eval-prompts``) is run without the cache, each
step's sequence left-padded to a multiple of the tensor-parallel size.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext

from mindlora.generation.sampling import SamplingConfig, choose_tokens, make_generator


@dataclass
class Generation:
    """One prompt's result."""

    token_ids: list[int]
    """Generated ids, the stop token included when one ended the answer."""
    seconds: float
    """Wall time of the batch this prompt was generated in."""
    stopped: bool
    """True when an end-of-turn token (or sequence) ended the answer."""

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class PipelineGroup:
    """Where this rank sits in the pipeline (global ranks for send/recv/broadcast)."""

    group: Optional[dist.ProcessGroup]
    size: int
    prev_rank: int
    next_rank: int
    last_rank: int

    @classmethod
    def from_parallel_state(cls) -> "PipelineGroup":
        size = parallel_state.get_pipeline_model_parallel_world_size()
        if size == 1:
            return cls(None, 1, -1, -1, -1)
        return cls(parallel_state.get_pipeline_model_parallel_group(), size,
                   parallel_state.get_pipeline_model_parallel_prev_rank(),
                   parallel_state.get_pipeline_model_parallel_next_rank(),
                   parallel_state.get_pipeline_model_parallel_last_rank())


class Generator:
    """Generate token ids for prompts with this rank's model chunks (collective call).

    Args:
        chunks: this rank's GPTModel chunk(s), in virtual-stage order (``build_model`` output).
        vocab_size: the real (unpadded) vocabulary; padded logits are never chosen.
        max_positions: the model's position limit; a prompt must be shorter, and an answer stops
            when prompt + answer reach it.
        stop_sequences: id sequences that end an answer (end-of-turn token(s), EOS).
        pad_id: id written into padding (never attended to).
        max_batch_size: prompts generated together.
        use_cache: False recomputes the whole sequence every step (the reference for tests).
        pipeline: the pipeline group; default: megatron-core's parallel state.
    """

    def __init__(self, chunks: Sequence[torch.nn.Module], vocab_size: int, max_positions: int,
                 stop_sequences: Sequence[Sequence[int]], pad_id: int, max_batch_size: int = 8,
                 use_cache: bool = True, pipeline: Optional[PipelineGroup] = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"--micro-batch-size ({max_batch_size}) must be >= 1")
        self.chunks = list(chunks)
        self.vocab_size, self.max_positions = vocab_size, max_positions
        self.stops = [tuple(s) for s in stop_sequences if len(s)]
        self.pad_id, self.max_batch_size, self.use_cache = pad_id, max_batch_size, use_cache
        self.pipeline = pipeline or PipelineGroup.from_parallel_state()
        first = self.chunks[0]
        self.device = next(first.parameters()).device
        self.hidden_size = first.config.hidden_size
        self.act_dtype = first.config.pipeline_dtype or first.config.params_dtype
        self.is_last_stage = any(c.post_process for c in self.chunks)
        # Sequence-parallel chunks split every activation along the sequence over TP ranks.
        self.seq_multiple = (first.config.tensor_model_parallel_size
                             if first.config.sequence_parallel else 1)
        if self.seq_multiple > 1:
            self.use_cache = False

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                 names: Optional[Sequence[str]] = None,
                 stream: Optional[Callable[[int, int], None]] = None) -> list[Generation]:
        """Answers for ``prompts`` (lists of ids), in order.

        Args:
            names: how errors name each prompt (e.g. ``file.jsonl:3``); default ``prompt <i>``.
            stream: called as ``stream(prompt_index, token_id)`` for every generated token.
        """
        check_prompt_lengths(prompts, self.max_positions, names)
        for c in self.chunks:
            c.eval()
        generator = make_generator(sampling, self.device)
        out: list[Generation] = []
        for s in range(0, len(prompts), self.max_batch_size):
            batch = [list(p) for p in prompts[s:s + self.max_batch_size]]
            hook = (lambda i, t, s=s: stream(s + i, t)) if stream else None
            with torch.no_grad():
                out.extend(self._generate_batch(batch, sampling, generator, hook))
        return out

    def _generate_batch(self, prompts: list[list[int]], sampling: SamplingConfig,
                        generator: Optional[torch.Generator],
                        stream: Optional[Callable[[int, int], None]]) -> list[Generation]:
        b, lens = len(prompts), [len(p) for p in prompts]
        lmax = max(lens)
        limits = [min(sampling.max_new_tokens, self.max_positions - n) for n in lens]
        total = lmax + max(limits)
        tokens = torch.full((b, total), self.pad_id, dtype=torch.long, device=self.device)
        valid = torch.zeros((b, total), dtype=torch.bool, device=self.device)
        for i, p in enumerate(prompts):
            tokens[i, lmax - len(p):lmax] = torch.tensor(p, dtype=torch.long, device=self.device)
            valid[i, lmax - len(p):lmax] = True
        contexts = ([StaticInferenceContext(b, total) for _ in self.chunks] if self.use_cache
                    else None)
        answers: list[list[int]] = [[] for _ in range(b)]
        done, stopped = [False] * b, [False] * b
        start, cur = 0, lmax
        t0 = time.perf_counter()
        while not all(done):
            logits = self._forward(tokens, valid, start, cur, contexts)
            chosen = self._choose(logits, b, sampling, generator)
            for i, t in enumerate(chosen.tolist()):
                if done[i]:
                    continue
                answers[i].append(t)
                valid[i, cur] = True
                if stream:
                    stream(i, t)
                stopped[i] = any(tuple(answers[i][-len(s):]) == s for s in self.stops)
                done[i] = stopped[i] or len(answers[i]) >= limits[i]
            tokens[:, cur] = torch.where(valid[:, cur], chosen, self.pad_id)
            start, cur = (cur if self.use_cache else 0), cur + 1
        seconds = time.perf_counter() - t0
        return [Generation(a, seconds, s) for a, s in zip(answers, stopped)]

    def _choose(self, logits: Optional[torch.Tensor], b: int, sampling: SamplingConfig,
                generator: Optional[torch.Generator]) -> torch.Tensor:
        """The next token per sequence, chosen on the last stage and broadcast to the others."""
        if self.is_last_stage:
            chosen = choose_tokens(logits[:, -1, :self.vocab_size].float(), sampling, generator)
        else:
            chosen = torch.empty(b, dtype=torch.long, device=self.device)
        if self.pipeline.size > 1:
            dist.broadcast(chosen, src=self.pipeline.last_rank, group=self.pipeline.group)
        return chosen

    def _forward(self, tokens: torch.Tensor, valid: torch.Tensor, start: int, end: int,
                 contexts: Optional[list[StaticInferenceContext]]) -> Optional[torch.Tensor]:
        """Run positions ``[start, end)`` through every chunk; logits on the last stage."""
        extra = (-(end - start)) % self.seq_multiple
        if extra:  # only without a cache (start == 0): more left padding, masked like the rest
            b = tokens.shape[0]
            tokens = torch.cat([torch.full((b, extra), self.pad_id, dtype=torch.long,
                                           device=self.device), tokens], 1)
            valid = torch.cat([torch.zeros((b, extra), dtype=torch.bool, device=self.device),
                               valid], 1)
            end += extra
        ids = tokens[:, start:end]
        positions = (valid[:, :end].long().cumsum(-1) - 1).clamp(min=0)[:, start:end]
        mask = _attention_mask(valid[:, :end], start)
        b, s = ids.shape
        s //= self.seq_multiple  # the activations each rank passes between pipeline stages
        logits = None
        for v, chunk in enumerate(self.chunks):
            ctx = None
            if contexts is not None:
                ctx = contexts[v]
                ctx.sequence_len_offset = start
                if start > 0:
                    ctx.enable_decode_mode()
                else:
                    ctx.enable_prefill_mode()
            if not chunk.pre_process:
                hidden = torch.empty((s, b, self.hidden_size), dtype=self.act_dtype,
                                     device=self.device)
                dist.recv(hidden, src=self.pipeline.prev_rank, group=self.pipeline.group)
                chunk.set_input_tensor(hidden)
            out = chunk(ids if chunk.pre_process else None,
                        positions if chunk.pre_process else None, mask,
                        inference_context=ctx, runtime_gather_output=True)
            if chunk.post_process:
                logits = out
            else:
                dist.send(out.contiguous(), dst=self.pipeline.next_rank,
                          group=self.pipeline.group)
        return logits


def check_prompt_lengths(prompts: Sequence[Sequence[int]], max_positions: int,
                         names: Optional[Sequence[str]] = None) -> None:
    """Refuse an empty prompt, or one that leaves no position for an answer, naming it."""
    names = list(names) if names is not None else [f"prompt {i}" for i in range(len(prompts))]
    for name, p in zip(names, prompts):
        if len(p) == 0:
            raise ValueError(f"{name}: the prompt is empty")
        if len(p) >= max_positions:
            raise ValueError(f"{name}: the prompt has {len(p)} tokens, but the model has only "
                             f"{max_positions} positions (max_position_embeddings); shorten it")


def _attention_mask(valid: torch.Tensor, start: int) -> torch.Tensor:
    """Megatron mask (True = may NOT attend) ``[b, 1, end-start, end]`` for queries start..end-1.

    A query sees the valid keys at or before it. A padding query also sees itself, so its row
    never becomes all-masked (which would give NaN keys/values that poison later steps).
    """
    b, end = valid.shape
    q = torch.arange(start, end, device=valid.device).view(-1, 1)
    k = torch.arange(end, device=valid.device).view(1, -1)
    allowed = (k <= q).unsqueeze(0) & valid.unsqueeze(1)
    allowed |= (k == q).unsqueeze(0)
    return ~allowed.unsqueeze(1)
