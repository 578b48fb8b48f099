"""Shared pieces of the benchmark harness: the result row, interleaved timing, synthetic batches, machine line.

Every figure is one `Row`: megavl's number, the reference it is compared with (measured in the same
run), their ratio and the goal the ratio must meet. Timings interleave the two sides rep by rep so
that a neighbour's load on a shared machine hits both alike, and report the median.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from megavl.config import Config

REPO = Path(__file__).resolve().parent.parent
RECIPES = {"tiny": REPO / "configs/tiny.yaml", "4m": REPO / "configs/pretrain_4m.yaml"}
DS_CONFIGS = {stage: REPO / f"ds_configs/zero{stage}.json" for stage in (0, 2, 3)}


@dataclass
class Row:
    """One line of the table. ratio = megavl / reference; goal like "<= 0.35x" or "within 5%"."""

    bench: str
    case: str
    metric: str
    megavl: float | None
    reference: float | None
    reference_name: str
    goal: str
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.megavl is None or not self.reference:
            return None
        return self.megavl / self.reference

    @property
    def met(self) -> bool | None:
        """Whether the ratio meets the goal; None when there is no goal or no ratio."""
        ratio = self.ratio
        if ratio is None or not self.goal:
            return None
        kind, _, value = self.goal.partition(" ")
        if kind == "<=":
            return ratio <= float(value.rstrip("x"))
        if kind == ">=":
            return ratio >= float(value.rstrip("x"))
        if kind == "within":
            return abs(ratio - 1.0) <= float(value.rstrip("%")) / 100
        raise ValueError(f"unknown goal {self.goal!r}")

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio, "met": self.met}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_median(sides: dict[str, Callable[[], object]], device: torch.device, reps: int,
                       warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each side, the sides called in turn within every repetition."""
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(reps):
        for name, fn in sides.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def synthetic_batch(cfg: Config, batch_size: int, text_len: int, device: torch.device,
                    dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """A data-loader-shaped batch: captions padded to text_len (lengths spread over [L/2, L]),
    15% of the real tokens MLM-masked (at least one per caption). Keys as megavl.data.batch.PretrainBatch."""
    gen = torch.Generator().manual_seed(seed)
    vocab = cfg.model.text.vocab_size
    size = cfg.model.vision.img_size
    ids = torch.randint(1000, min(vocab, 20000), (batch_size, text_len), generator=gen)
    ids[:, 0] = 101  # [CLS]
    lengths = torch.randint(max(2, text_len // 2), text_len + 1, (batch_size,), generator=gen)
    lengths[0] = text_len
    mask = (torch.arange(text_len)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    pick = (torch.rand(batch_size, text_len, generator=gen) < 0.15) & mask.bool()
    pick[:, 0] = False
    pick[torch.arange(batch_size), 1] = True
    labels = torch.where(pick, ids, torch.full_like(ids, -100))
    batch = {"images": torch.randn(batch_size, 3, size, size, generator=gen), "input_ids": ids,
             "attention_mask": mask, "mlm_input_ids": ids.masked_fill(pick, 103), "mlm_labels": labels,
             "image_ids": torch.arange(batch_size)}
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(device: torch.device) -> str:
    """CPU model, cores and torch threads, torch version, and the GPU when there is one."""
    parts = [f"CPU {cpu_model()} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})",
             f"torch {torch.__version__}"]
    if device.type == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})")
    else:
        parts.append("no GPU: CPU timings")
    try:
        import deepspeed
        parts.append(f"deepspeed {deepspeed.__version__}")
    except ImportError:
        pass
    return "; ".join(parts)
