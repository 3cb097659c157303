"""Megatron's early exits: ``--exit-interval``, ``--exit-duration-in-mins``, ``--exit-signal-handler``.

Each is checked after an iteration; the run then saves (with ``--save``) and returns normally, so
``mindlora.train`` exits 0, which is what a preempted cluster job (SIGTERM, then SIGKILL after a
grace period) needs to be restarted from its last step. A signal or the clock can reach ranks at
different moments, so those two are agreed on with one all-reduce (MAX) over all ranks: every
rank stops after the same iteration, or none does.
"""
from __future__ import annotations

import signal
import time
from typing import Optional

import torch
import torch.distributed as dist


class ExitConditions:
    """Installed for the length of a run (``close`` restores the previous SIGTERM handler)."""

    def __init__(self, exit_interval: Optional[int], exit_duration_in_mins: Optional[float],
                 exit_signal_handler: bool, start_time: float, device: torch.device) -> None:
        self.exit_interval = exit_interval
        self.exit_duration_in_mins = exit_duration_in_mins
        self.start_time, self.device = start_time, device
        self.received_signal = False
        self.handler = exit_signal_handler
        if exit_signal_handler:
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.received_signal = True

    def check(self, iteration: int) -> Optional[str]:
        """Why the run stops after ``iteration`` (Megatron's message), or None (collective)."""
        if self.handler or self.exit_duration_in_mins:
            minutes = (time.time() - self.start_time) / 60.0
            over = bool(self.exit_duration_in_mins and minutes > self.exit_duration_in_mins)
            flags = torch.tensor([float(self.received_signal), float(over)], device=self.device)
            if dist.is_initialized():
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            if flags[0].item():
                return "exiting program after receiving SIGTERM."
            if flags[1].item():
                return f"exiting program after {minutes:.2f} minutes"
        if self.exit_interval and iteration % self.exit_interval == 0:
            return f"exiting program at iteration {iteration}"
        return None

    def close(self) -> None:
        if self.handler:
            signal.signal(signal.SIGTERM, self._previous)
            self.handler = False
