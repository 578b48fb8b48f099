"""Stop requests from the scheduler: SIGTERM or SIGUSR1 (Slurm's warning before the time limit).

The handler only sets a flag; the trainer reads it once per step and all ranks agree on it with an
all-reduce, so a signal that reached one rank stops every rank at the same step, after a checkpoint.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    def __init__(self) -> None:
        self.requested = False
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        """True on every rank if any rank was signalled (a collective: all ranks call it each step)."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
