"""Stop requests from the scheduler: SIGTERM or SIGUSR1 (Slurm's warning before the time limit).

The handler only sets a flag. Every `every` steps (run.stop_check_every) all ranks agree on it with
one all-reduce, so a signal that reached one rank stops every rank at the same step, after a
checkpoint, at most `every` steps after the signal. In the steps between, nothing is communicated and
the host never waits for the device (the all-reduce result is read with `.item()`, a sync on CUDA).
Slurm's --signal lead time must cover `every` steps plus the checkpoint.
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
        """True on every rank if any rank was signalled (a collective: all ranks call it together)."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def agreed_at(self, step: int, every: int, device: torch.device) -> bool:
        """`agreed` at steps that are multiples of `every`, False (and no collective) at the others.
        The step is the same on every rank, so all ranks take part in the same all-reduces."""
        if every <= 0:
            raise ValueError(f"every must be > 0; got {every}")
        return step % every == 0 and self.agreed(device)
