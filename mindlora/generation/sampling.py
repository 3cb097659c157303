"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling.

Sampling draws from a ``torch.Generator`` seeded once per call of ``Generator.generate``, on the
logits' own device, so a given ``--seed`` reproduces the same tokens. Every tensor-parallel rank of
the last pipeline stage holds the same gathered logits and the same generator state, so they all
choose the same token without a collective.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mindlora.config import fail_if


@dataclass
class SamplingConfig:
    """How tokens are chosen and when a sequence stops growing."""

    max_new_tokens: int = 128
    """Upper bound on generated tokens per prompt (``--max-new-tokens``)."""
    temperature: float = 0.0
    """0 = greedy (argmax); > 0 divides the logits before sampling (``--temperature``)."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 = off (``--top-k``)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p; 1.0 = off (``--top-p``)."""
    seed: int = 1234
    """Seed of the sampling generator (``--seed``); unused when greedy."""

    def __post_init__(self) -> None:
        errors = []
        if self.max_new_tokens < 1:
            errors.append(f"--max-new-tokens ({self.max_new_tokens}) must be >= 1")
        if self.temperature < 0:
            errors.append(f"--temperature ({self.temperature}) must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            errors.append(f"--top-k ({self.top_k}) must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            errors.append(f"--top-p ({self.top_p}) must be in (0, 1] (1 = off)")
        fail_if(errors, "sampling flags")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def choose_tokens(logits: torch.Tensor, cfg: SamplingConfig,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row of ``logits`` ``[batch, vocab]`` (float32), as int64 ``[batch]``."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach p; the most likely one always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(cfg: SamplingConfig, device: torch.device) -> torch.Generator | None:
    """A generator on ``device`` seeded with ``cfg.seed`` (None when greedy)."""
    if cfg.greedy:
        return None
    return torch.Generator(device=device).manual_seed(cfg.seed)
