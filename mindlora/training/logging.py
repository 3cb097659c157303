"""Megatron-style progress lines (the format people's log parsers already read) + TensorBoard.

One line every ``--log-interval`` iterations, printed by global rank 0 (all values are global:
the schedule broadcasts the loss from the last pipeline stage and sums it over data parallel)::

     iteration       10/     200 | consumed samples: 640 | elapsed time per iteration (ms): 812.3 |
     learning rate: 1.000000E-04 | global batch size:    64 | lm loss: 1.234567E+00 |
     loss scale: 1.0 | grad norm: 0.532 | number of skipped iterations:   0 |
     number of nan iterations:   0 | tokens/s: 1234.5 | peak memory (MB): 812.0 |
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from mindlora.runtime.device import current


def format_line(iteration: int, train_iters: int, consumed: int, ms_per_iter: float, lr: float,
                global_batch: int, loss: float, loss_scale: float, grad_norm: float,
                skipped: int, nan: int, tokens_per_s: float, peak_mb: float,
                aux: Optional[dict[str, float]] = None) -> str:
    """The Megatron log line (plus tokens/s and peak memory at the end); ``aux``: MoE losses
    such as ``load_balancing_loss``, after the lm loss as Megatron prints them."""
    extra = "".join(f" {k}: {v:.6E} |" for k, v in sorted((aux or {}).items()))
    return (f" iteration {iteration:8d}/{train_iters:8d} | consumed samples: {consumed} |"
            f" elapsed time per iteration (ms): {ms_per_iter:.1f} | learning rate: {lr:.6E} |"
            f" global batch size: {global_batch:5d} | lm loss: {loss:.6E} |{extra}"
            f" loss scale: {loss_scale:.1f} | grad norm: {grad_norm:.3f} |"
            f" number of skipped iterations: {skipped:3d} | number of nan iterations: {nan:3d} |"
            f" tokens/s: {tokens_per_s:.1f} | peak memory (MB): {peak_mb:.1f} |")


class MetricsLogger:
    """Accumulates per-iteration figures and prints/writes them at the log interval."""

    def __init__(self, train_cfg, log: Callable[[str], None]) -> None:
        self.cfg, self.log = train_cfg, log
        self.is_writer = dist.get_rank() == 0
        self._last = time.perf_counter()
        self._iters, self._tokens = 0, 0
        self._aux: dict[str, float] = {}
        self.writer = None
        if train_cfg.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError(f"--tensorboard-dir needs the tensorboard package "
                                 f"(pip install tensorboard): {e}") from None
            if self.is_writer:
                self.writer = SummaryWriter(log_dir=train_cfg.tensorboard_dir)

    def count_tokens(self, batches) -> None:
        """Add this step's input tokens (padding included), summed over data parallel.

        The count travels on the runtime device: a NCCL/HCCL group has no CPU tensors.
        """
        t = torch.tensor([sum(int(b["tokens"].numel()) for b in batches)], dtype=torch.int64,
                         device=current().torch_device())
        dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
        self._tokens += int(t.item())

    def step(self, state, lr: float, loss: float, grad_norm: float, loss_scale: float,
             global_batch: int, aux: Optional[dict[str, float]] = None) -> None:
        self._iters += 1
        it = state.iteration
        for k, v in (aux or {}).items():
            self._aux[k] = self._aux.get(k, 0.0) + v
            if self.writer is not None:
                self.writer.add_scalar(k, v, it)
        if self.writer is not None:
            for name, value in (("lm loss", loss), ("learning-rate", lr), ("grad-norm", grad_norm),
                                ("loss-scale", loss_scale)):
                if math.isfinite(value):
                    self.writer.add_scalar(name, value, it)
        if it % self.cfg.log_interval and it != self.cfg.train_iters:
            return
        now = time.perf_counter()
        elapsed = now - self._last
        ms = 1000.0 * elapsed / max(self._iters, 1)
        tps = self._tokens / max(elapsed, 1e-9)
        peak = current().max_memory_allocated() / 2 ** 20
        if self.is_writer:
            self.log(format_line(it, self.cfg.train_iters, state.consumed_samples, ms, lr,
                                 global_batch, loss, loss_scale, grad_norm,
                                 state.skipped_iterations, state.nan_iterations, tps, peak,
                                 {k: v / max(self._iters, 1) for k, v in self._aux.items()}))
            if self.writer is not None:
                self.writer.add_scalar("tokens-per-second", tps, it)
        self._last, self._iters, self._tokens = now, 0, 0
        self._aux = {}

    def validation(self, iteration: int, loss: float) -> None:
        if not self.is_writer:
            return
        ppl = math.exp(min(20.0, loss)) if math.isfinite(loss) else float("nan")
        bar = "-" * 100
        self.log(f"{bar}\n validation loss at iteration {iteration} | lm loss value: {loss:.6E} |"
                 f" lm loss PPL: {ppl:.6E} |\n{bar}")
        if self.writer is not None:
            self.writer.add_scalar("validation lm loss", loss, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
