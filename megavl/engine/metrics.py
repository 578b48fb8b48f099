"""What the run reports: TensorBoard scalars and images on rank 0, and a console progress bar.

Tag names are a public interface (users build dashboards on them): loss/total, loss/<objective>,
train/lr, train/grad_norm, train/itc_temperature, train/teacher_momentum, curriculum/mode,
perf/samples_per_sec, perf/tflops, perf/mfu, perf/data_wait, mem/peak_gb, data/skipped/<reason>,
eval/i2t_r{1,5,10}, eval/t2i_r{1,5,10}.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch


class Monitor:
    """Writes only on rank 0; other ranks get a Monitor that does nothing, so callers never branch."""

    def __init__(self, output_dir: str | Path, enabled: bool, max_steps: int, start_step: int) -> None:
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm import tqdm

            self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tb"))
            self.bar = tqdm(total=max_steps, initial=start_step, desc="pretrain", unit="step", dynamic_ncols=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, float(value), step)

    def image(self, step: int, tag: str, image_CHW: torch.Tensor) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image_CHW.clamp(0, 1), step)

    def progress(self, step: int, postfix: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in postfix.items()}, refresh=True)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


class StepTimer:
    """Splits step wall time into waiting for data and the rest, per logging window. Time between
    steps (evaluation, image logs, checkpoints) is not counted."""

    def __init__(self) -> None:
        self.reset()
        self.start_step()

    def reset(self) -> None:
        self.data_s = 0.0
        self.total_s = 0.0
        self.steps = 0

    def start_step(self) -> None:
        self._start = time.perf_counter()

    def next_batch(self, iterator):
        """next(iterator), its wait counted as data time."""
        before = time.perf_counter()
        batch = next(iterator)
        self.data_s += time.perf_counter() - before
        return batch

    def step_done(self) -> None:
        self.total_s += time.perf_counter() - self._start
        self.steps += 1

    @property
    def seconds_per_step(self) -> float:
        return self.total_s / max(1, self.steps)

    @property
    def data_wait(self) -> float:
        return self.data_s / self.total_s if self.total_s > 0 else 0.0


def peak_memory_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30
