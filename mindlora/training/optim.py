"""Optimizer step over LoRA parameters only: gradient reduction, clipping, loss scaling, LR.

The base is frozen, so the only gradients in the model are the LoRA factors' (a few MB). Instead
of megatron-core's DDP buffers and distributed optimizer, which are built for full-model training,
one function (:func:`finalize_grads`, plugged into the schedules as ``finalize_model_grads_func``)
sums them over data-parallel ranks and divides by the global count of labelled tokens, which makes
any layout compute the same gradient as one process over the global batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from mindlora.parallel.layout import split_rule
from mindlora.runtime.device import current


def lora_parameters(chunks: Iterable[torch.nn.Module]) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) for every trainable parameter, in a stable order."""
    return [(f"{i}.{n}", p) for i, c in enumerate(chunks) for n, p in c.named_parameters()
            if p.requires_grad]


def finalize_grads(chunks: list[torch.nn.Module], num_tokens: Optional[torch.Tensor],
                   **_: object) -> None:
    """Sum LoRA gradients over data parallel, then divide by the global labelled-token count.

    ``num_tokens`` is the last pipeline stage's count for this rank's micro-batches; it is sent to
    every stage and summed over data parallel, as megatron-core's ``finalize_model_grads`` does.
    """
    named = [(n, p.grad) for c in chunks for n, p in c.named_parameters()
             if p.requires_grad and p.grad is not None]
    grads = [g for _, g in named]
    # A routed expert already saw the tokens of its whole expert-parallel group (the dispatcher
    # gathered them), so its gradient is summed over the expert-data-parallel group only.
    expert = [g for n, g in named if _EXPERT in n]
    _sum_over([g for n, g in named if _EXPERT not in n],
              parallel_state.get_data_parallel_group())
    if expert:
        _sum_over(expert, parallel_state.get_expert_data_parallel_group())
    if num_tokens is None:
        return
    total = global_token_count(num_tokens)
    scale = 1.0 / max(float(total), 1.0)
    for g in grads:
        g.mul_(scale)


_EXPERT = ".local_experts."


def _sum_over(grads: list[torch.Tensor], group) -> None:
    if dist.get_world_size(group) > 1 and grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def global_token_count(num_tokens: torch.Tensor) -> torch.Tensor:
    """Broadcast the last stage's token count over PP and sum it over DP (in place)."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        dist.broadcast(num_tokens, src=last,
                       group=parallel_state.get_pipeline_model_parallel_group())
    dist.all_reduce(num_tokens, group=parallel_state.get_data_parallel_group())
    return num_tokens


def grad_norm_sq_and_finite(params: list[tuple[str, torch.nn.Parameter]]) -> tuple[float, bool]:
    """Global squared gradient norm over TP x PP, counting TP-replicated factors once."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    # [shared, routed experts], on the gradients' device: the model-parallel group is NCCL/HCCL
    # on accelerators
    total = torch.zeros(2, dtype=torch.float64, device=current().torch_device())
    for name, p in params:
        if p.grad is None:
            continue
        if split_rule(name).dim is None and tp_rank != 0:
            continue
        total[int(_EXPERT in name)] += p.grad.double().pow(2).sum()
    dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    if parallel_state.get_expert_model_parallel_world_size() > 1:
        # each EP rank holds other experts; the shared part is the same on all of them
        expert = total[1:].clone()
        dist.all_reduce(expert, group=parallel_state.get_expert_model_parallel_group())
        total[1] = expert[0]
    value = float(total.sum().item())
    return value, math.isfinite(value)


def clip_grads(params: list[tuple[str, torch.nn.Parameter]], max_norm: float) -> tuple[float, bool]:
    """Clip to ``max_norm`` (0 = off); return (grad norm, all finite)."""
    sq, finite = grad_norm_sq_and_finite(params)
    norm = math.sqrt(sq) if finite else float("nan")
    if finite and max_norm > 0 and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for _, p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm, finite


@dataclass
class LRSchedule:
    """Megatron's schedule: linear warm-up, then cosine/linear/constant decay to ``min_lr``."""

    max_lr: float
    min_lr: float
    warmup_iters: int
    decay_iters: int
    style: str = "cosine"

    def __call__(self, iteration: int) -> float:
        """Learning rate for step ``iteration`` (1-based, as Megatron logs it)."""
        if self.warmup_iters > 0 and iteration <= self.warmup_iters:
            return self.max_lr * iteration / self.warmup_iters
        if self.style == "constant":
            return self.max_lr
        span = max(1, self.decay_iters - self.warmup_iters)
        ratio = min(1.0, (iteration - self.warmup_iters) / span)
        if self.style == "linear":
            coeff = 1.0 - ratio
        else:
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)


class LossScaler:
    """Dynamic loss scale for fp16 (Megatron's defaults); a constant 1.0 otherwise."""

    def __init__(self, enabled: bool, initial: float = 2.0 ** 16, growth_interval: int = 1000,
                 hysteresis: int = 2, min_scale: float = 1.0) -> None:
        self.enabled = enabled
        self.scale = initial if enabled else 1.0
        self.growth_interval, self.hysteresis, self.min_scale = growth_interval, hysteresis, min_scale
        self._good_steps, self._bad_left = 0, hysteresis

    def update(self, found_inf: bool) -> None:
        if not self.enabled:
            return
        if found_inf:
            self._good_steps = 0
            self._bad_left -= 1
            if self._bad_left <= 0:
                self.scale = max(self.min_scale, self.scale / 2.0)
                self._bad_left = self.hysteresis
            return
        self._good_steps += 1
        if self._good_steps % self.growth_interval == 0:
            self.scale *= 2.0
            self._bad_left = self.hysteresis

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good": self._good_steps, "bad_left": self._bad_left}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self._good_steps, self._bad_left = state["scale"], state["good"], state["bad_left"]


def make_optimizer(params: list[tuple[str, torch.nn.Parameter]], lr: float, weight_decay: float,
                   betas: tuple[float, float], eps: float) -> torch.optim.AdamW:
    """AdamW over the LoRA factors (float32), foreach kernels: one launch per step, not per tensor."""
    return torch.optim.AdamW([p for _, p in params], lr=lr, betas=betas, eps=eps,
                             weight_decay=weight_decay, foreach=True)
