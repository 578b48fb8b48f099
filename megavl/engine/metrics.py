"""What the run reports: TensorBoard scalars and images on rank 0, and a console progress bar.

Tag names are a public interface (users build dashboards on them): loss/total, loss/<objective>,
train/lr, train/grad_norm, perf/samples_per_sec, perf/data_wait, mem/peak_gb, data/skipped/<reason>
for every task; pre-training's train/itc_temperature, train/teacher_momentum, curriculum/mode,
data/modality, perf/tflops, perf/mfu, perf/mfu_peak_tflops, perf/mfu_peak_probed, eval/i2t_r{1,5,10}, eval/t2i_r{1,5,10}, eval/r_mean; the
fine-tuning tasks' val/<metric>, test/<metric> (retrieval with a queue: train/teacher_momentum,
train/itc_distill_alpha). Also the device peak (datasheet table, else a matmul probe) and MFU.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path

import torch

from .peak_probe import probed_peak

logger = logging.getLogger(__name__)

# bf16 dense tensor-core peak per GPU, matched as a substring of torch.cuda.get_device_name, first
# match wins (so specific names come before the family). Source: NVIDIA datasheets.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),          # SXM
    ("H200", 989e12),
    ("A100", 312e12),
)


class Monitor:
    """Writes only on rank 0; other ranks get a Monitor that does nothing, so callers never branch."""

    def __init__(self, output_dir: str | Path, enabled: bool, max_steps: int, start_step: int,
                 name: str = "train") -> None:
        """name: the progress bar's label (the task's name)."""
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm import tqdm

            self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tb"))
            self.bar = tqdm(total=max_steps, initial=start_step, desc=name, unit="step", dynamic_ncols=True)

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
    steps (evaluation, image logs, checkpoints) is not counted.

    On CUDA the step time is taken on the DEVICE: a CUDA event is recorded at the start and the end
    of every step and the window's time is the sum of the event pairs' elapsed times, read (with one
    synchronize on the last event) only when `seconds_per_step` is asked for, at log steps. Host
    time would stop the clock when the host has queued a step, not when the GPU has run it, and
    overstate samples/s, TFLOP/s and MFU. On CPU the host time is the step time.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.on_device = device is not None and torch.device(device).type == "cuda"
        self.reset()
        self.start_step()

    def reset(self) -> None:
        self.data_s = 0.0
        self.total_s = 0.0  # host time
        self.steps = 0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def _event(self):
        if not self.on_device:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start_step(self) -> None:
        self._start = time.perf_counter()
        self._start_event = self._event()

    def next_batch(self, iterator):
        """next(iterator), its wait counted as data time."""
        before = time.perf_counter()
        batch = next(iterator)
        self.data_s += time.perf_counter() - before
        return batch

    def step_done(self) -> None:
        self.total_s += time.perf_counter() - self._start
        self.steps += 1
        if self.on_device:
            self._events.append((self._start_event, self._event()))

    @property
    def step_seconds(self) -> float:
        """Time of the window's steps: device time on CUDA (waits for the last step), else host time."""
        if not self._events:
            return self.total_s
        self._events[-1][1].synchronize()
        return sum(start.elapsed_time(end) for start, end in self._events) / 1e3

    @property
    def seconds_per_step(self) -> float:
        return self.step_seconds / max(1, self.steps)

    @property
    def data_wait(self) -> float:
        """Fraction of the host's step time spent waiting for the next batch."""
        return self.data_s / self.total_s if self.total_s > 0 else 0.0


def peak_memory_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


@functools.lru_cache(maxsize=None)
def _log_no_peak_once(what: str) -> None:
    logger.info("no datasheet peak FLOPs for %s; MFU is measured against a matmul probe", what)


def peak_flops(device: torch.device | str) -> float | None:
    """bf16 dense peak FLOP/s of one `device` from PEAK_BF16_FLOPS; None on CPU or an unknown GPU
    (logged once per device name)."""
    device = torch.device(device)
    if device.type != "cuda":
        _log_no_peak_once(device.type)
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_FLOPS:
        if key in name:
            return peak
    _log_no_peak_once(name)
    return None


@dataclasses.dataclass(frozen=True)
class DevicePeak:
    """The per-device FLOP/s that perf/mfu divides by, and where it comes from."""
    flops: float
    probed: bool  # True: measured by the matmul probe in the run's dtype; False: PEAK_BF16_FLOPS
    detail: str   # for the log line: the datasheet entry or the probe's key


def device_peak(device: torch.device | str, dtype: torch.dtype, cache_path: Path | None = None) -> DevicePeak:
    """The datasheet bf16 peak of a known GPU, else the matmul probe's figure for this device, dtype
    and thread count (measured once per machine, `peak_probe.probed_peak`): MFU exists on every device."""
    device = torch.device(device)
    table = peak_flops(device)
    if table is not None:
        return DevicePeak(table, False, f"the bf16 datasheet peak of {torch.cuda.get_device_name(device)}")
    flops, key = probed_peak(device, dtype, cache_path)
    return DevicePeak(flops, True, f"a matmul probe ({key})")


def mfu(flops_per_step: float, step_seconds: float, world_size: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation = flops_per_step / (step_seconds * world_size * peak).

    flops_per_step: FLOPs of one optimizer step summed over ALL world_size ranks (e.g.
    `step_flops(..., batch_size=global batch).total`); peak: per-device FLOP/s (`device_peak`).
    None when the peak is unknown.
    """
    if peak is None:
        return None
    if step_seconds <= 0 or world_size < 1 or peak <= 0:
        raise ValueError(f"need step_seconds > 0, world_size >= 1, peak > 0; got {step_seconds}, "
                         f"{world_size}, {peak}")
    return flops_per_step / (step_seconds * world_size * peak)
