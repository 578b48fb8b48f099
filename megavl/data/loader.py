"""The loaders the trainer calls: `build_train_loader`, `build_eval_loader` (+ `build_tokenizer`).

Train: `TrainLoader` is an endless iterator of batches (collate.py) that advances epochs itself.
Its state is `(epoch, batches consumed in the epoch)` plus validation fields and skip counts; the
sample order is a pure function of (seed, epoch, rank, world_size, num_workers, batch_size), so
every rank's state after the same number of steps is identical except for its skip counts, and a
restart with the same settings continues the stream exactly. Saving rank 0's state is enough to
resume every rank (its skip counts are rank 0's, which only affects logging).

Eval: every val sample is seen once across ranks (contiguous shares); shares and hence batch
counts may differ by one sample between ranks, so gather variable-length features or run eval on
rank 0 with world_size=1 (what the trainer does by default is its choice).
"""
from __future__ import annotations

import logging
import os
import signal
from collections import Counter
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from megavl.config import DataConfig
from megavl.data.collate import Collator
from megavl.data.video import ALL_SKIP_REASONS as SKIP_REASONS
from megavl.data.plan import Segment, Source, eval_rank_range, source_quotas
from megavl.data.shards import check_shards_exist, expand_urls, shard_sizes
from megavl.data.stream import EvalPlan, EvalStream, TrainPlan, TrainStream
from megavl.data.text import build_tokenizer
from megavl.data.transforms import eval_transform, train_draft_size, train_transform

logger = logging.getLogger(__name__)

# Forked workers + the Rust tokenizer's thread pool can deadlock; our workers tokenise serially.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_STATE_CHECKED = ("world_size", "num_workers", "batch_size", "seed", "resampled", "batches_per_epoch")


def _ignore_stop_signals(worker_id: int) -> None:
    """Slurm signals every process of a job step; the trainer (not its data workers) decides to
    checkpoint and stop, and a worker killed by SIGTERM mid-fetch would fail the step before the save."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _make_loader(dataset, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=None, num_workers=num_workers,
                      worker_init_fn=_ignore_stop_signals if num_workers > 0 else None,
                      pin_memory=torch.cuda.is_available(),
                      prefetch_factor=2 if num_workers > 0 else None)


def _sum_counts(base: Counter, per_worker: dict[int, dict]) -> Counter:
    total = Counter(base)
    for counts in per_worker.values():
        total.update(counts)
    return total


class TrainLoader:
    """Endless iterator over this rank's training batches; see the module docstring."""

    def __init__(self, plan: TrainPlan, collator: Collator, num_workers: int,
                 sizing_counts: Counter | None = None):
        self.plan, self.collator, self.num_workers = plan, collator, num_workers
        self.epoch = 0
        self.batches_in_epoch = 0
        self.batches_per_epoch = plan.batches_per_worker * plan.num_workers
        # shards found truncated while counting their samples (no stats.json), counted once
        self._base_counts: Counter = Counter(sizing_counts or {})
        self._worker_counts: dict[int, dict] = {}
        self._iterator: Iterator[dict] | None = None

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            stream = TrainStream(self.plan, self.collator, self.epoch, self.batches_in_epoch)
            self._iterator = iter(_make_loader(stream, self.num_workers))
        batch = next(self._iterator)
        meta = batch.pop("_meta")
        if (meta["epoch"], meta["index"]) != (self.epoch, self.batches_in_epoch):
            raise RuntimeError(f"batch {meta['epoch']}/{meta['index']} arrived, expected "
                               f"{self.epoch}/{self.batches_in_epoch}: worker order broke")
        self._worker_counts[meta["index"] % self.plan.num_workers] = meta["counts"]
        self.batches_in_epoch += 1
        if self.batches_in_epoch == self.batches_per_epoch:
            self.epoch, self.batches_in_epoch = self.epoch + 1, 0
        return batch

    def _settings(self) -> dict:
        return {"world_size": self.plan.world_size, "num_workers": self.plan.num_workers,
                "batch_size": self.plan.batch_size, "seed": self.plan.seed,
                "resampled": self.plan.resampled, "batches_per_epoch": self.batches_per_epoch}

    def state_dict(self) -> dict:
        """Position after the last batch handed out, the settings it depends on, skip counts."""
        counts = _sum_counts(self._base_counts, self._worker_counts)
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                **self._settings(), "counts": dict(counts)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the settings that fix the order must be unchanged."""
        settings = self._settings()
        wrong = [f"{k}: saved {state.get(k)!r}, now {settings[k]!r}"
                 for k in _STATE_CHECKED if state.get(k) != settings[k]]
        if wrong:
            raise ValueError("cannot resume the data stream exactly, settings changed:\n  "
                             + "\n  ".join(wrong))
        if not 0 <= state["batches_in_epoch"] < self.batches_per_epoch:
            raise ValueError(f"batches_in_epoch {state['batches_in_epoch']} out of range")
        self.close()
        self.epoch, self.batches_in_epoch = int(state["epoch"]), int(state["batches_in_epoch"])
        self._base_counts = Counter(state.get("counts", {}))
        self._worker_counts = {}

    def skip_counts(self) -> dict[str, int]:
        """Samples skipped so far on this rank, by reason (every reason present, 0 if none)."""
        counts = _sum_counts(self._base_counts, self._worker_counts)
        return {reason: counts.get(reason, 0) for reason in SKIP_REASONS}

    def repeat_count(self) -> int:
        """Samples repeated to fill the batch slots of skipped ones (or of short shards)."""
        return _sum_counts(self._base_counts, self._worker_counts).get("repeated", 0)

    def close(self) -> None:
        """Stop the worker processes (a later `next` restarts them at the current position)."""
        if self._iterator is not None:
            self._base_counts = _sum_counts(self._base_counts, self._worker_counts)
            self._worker_counts = {}
            shutdown = getattr(self._iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            self._iterator = None


def _train_sources(cfg: DataConfig, skips: Counter) -> list[Source]:
    if not cfg.train_shards:
        raise ValueError("data.train_shards is empty")
    if cfg.train_weights and len(cfg.train_weights) != len(cfg.train_shards):
        raise ValueError(f"data.train_weights has {len(cfg.train_weights)} entries for "
                         f"{len(cfg.train_shards)} sources")
    if any(w < 0 for w in cfg.train_weights) or (cfg.train_weights and sum(cfg.train_weights) <= 0):
        raise ValueError(f"data.train_weights must be >= 0 with a positive sum: {cfg.train_weights}")
    url_lists = [expand_urls(p) for p in cfg.train_shards]
    check_shards_exist([u for urls in url_lists for u in urls])
    need_sizes = not cfg.resampled or cfg.samples_per_epoch <= 0 or not cfg.train_weights
    weights = cfg.train_weights or [0.0] * len(url_lists)
    return [Source(urls, shard_sizes(urls, skips) if need_sizes else None, w)
            for urls, w in zip(url_lists, weights)]


def build_train_loader(cfg: DataConfig, *, rank: int, world_size: int, mlm_prob: float,
                       scl_mask_prob: float, epoch_start_state: dict | None = None) -> TrainLoader:
    """This rank's endless training loader; `epoch_start_state` = a saved `state_dict()`."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if cfg.batch_size <= 0:
        raise ValueError(f"data.batch_size must be positive, got {cfg.batch_size}")
    sizing_counts: Counter = Counter()
    sources = _train_sources(cfg, sizing_counts)
    quotas = [] if cfg.resampled else source_quotas(sources, cfg.samples_per_epoch)
    epoch_size = (sum(quotas) if not cfg.resampled
                  else cfg.samples_per_epoch or sum(s.size for s in sources))
    workers = max(1, cfg.num_workers)
    batches_per_worker = epoch_size // (world_size * workers * cfg.batch_size)
    if batches_per_worker == 0:
        raise ValueError(f"an epoch of {epoch_size} samples cannot give every one of {world_size} "
                         f"ranks x {workers} workers one batch of {cfg.batch_size}")
    plan = TrainPlan(sources=sources, quotas=quotas, resampled=cfg.resampled,
                     batches_per_worker=batches_per_worker, batch_size=cfg.batch_size,
                     num_workers=workers, shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed,
                     rank=rank, world_size=world_size, caption_key=cfg.caption_key,
                     max_pixels=cfg.max_image_pixels,
                     draft_size=train_draft_size(cfg.image_size, cfg.train_crop_scale),
                     num_frames=cfg.num_frames, max_video_frames=cfg.max_video_frames)
    transform = train_transform(cfg.image_size, cfg.train_crop_scale, cfg.hflip, cfg.randaugment)
    collator = Collator(build_tokenizer(cfg.tokenizer), transform, cfg.mean, cfg.std,
                        cfg.max_text_len, mlm_prob, scl_mask_prob)
    loader = TrainLoader(plan, collator, cfg.num_workers, sizing_counts)
    logger.info("train data: %d samples/epoch, rank %d/%d gets %d batches of %d per epoch",
                epoch_size, rank, world_size, loader.batches_per_epoch, cfg.batch_size)
    if epoch_start_state:
        loader.load_state_dict(epoch_start_state)
    return loader


class EvalLoader:
    """Iterable (re-iterable) over this rank's share of the val set; see the module docstring."""

    def __init__(self, plan: EvalPlan, collator: Collator, num_workers: int,
                 sizing_counts: Counter | None = None):
        self.plan, self.collator, self.num_workers = plan, collator, num_workers
        self.num_samples = plan.end - plan.begin  # before skips
        self._sizing_counts = Counter(sizing_counts or {})
        self._counts: Counter = Counter()

    def __iter__(self) -> Iterator[dict]:
        per_worker: dict[int, dict] = {}
        try:
            for batch in _make_loader(EvalStream(self.plan, self.collator), self.num_workers):
                meta = batch.pop("_meta")
                per_worker[meta["worker"]] = meta["counts"]
                yield batch
        finally:
            self._counts = _sum_counts(self._sizing_counts, per_worker)

    def skip_counts(self) -> dict[str, int]:
        """Samples skipped in the last pass over the val set (+ truncation found while sizing)."""
        return {reason: self._counts.get(reason, 0) for reason in SKIP_REASONS}


def build_eval_loader(cfg: DataConfig, *, rank: int, world_size: int, mlm_prob: float = 0.15,
                      scl_mask_prob: float = 0.4) -> EvalLoader:
    """Deterministic loader over `cfg.val_shards` (eval transform, file order, fixed masks)."""
    if not cfg.val_shards:
        raise ValueError("data.val_shards is empty")
    urls = [u for pattern in cfg.val_shards for u in expand_urls(pattern)]
    check_shards_exist(urls)
    sizing_counts: Counter = Counter()
    segments = [Segment(u, 0, n) for u, n in zip(urls, shard_sizes(urls, sizing_counts)) if n > 0]
    total = sum(s.stop for s in segments)
    begin, end = eval_rank_range(total, rank, world_size)
    plan = EvalPlan(segments=segments, begin=begin, end=end, batch_size=cfg.batch_size,
                    num_workers=max(1, cfg.num_workers), seed=cfg.seed, rank=rank,
                    caption_key=cfg.caption_key, max_pixels=cfg.max_image_pixels,
                    draft_size=cfg.image_size, num_frames=cfg.num_frames,
                    max_video_frames=cfg.max_video_frames)
    collator = Collator(build_tokenizer(cfg.tokenizer), eval_transform(cfg.image_size), cfg.mean,
                        cfg.std, cfg.max_text_len, mlm_prob, scl_mask_prob)
    return EvalLoader(plan, collator, cfg.num_workers, sizing_counts)
