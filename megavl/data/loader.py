"""The loaders the trainer calls: `build_train_loader`, `build_eval_loader` (+ `build_tokenizer`).

Train: `TrainLoader` is an endless iterator of this rank's batches (collate.py) that advances epochs
itself. The sample stream is a function of (seed, epoch, ONE global position) only (order.py): the
micro-step's global batch k is positions [k*G, (k+1)*G), G = batch_size * world_size, rank r takes
the contiguous rows [r*B, (r+1)*B). The epoch is cut to a multiple of the optimizer-step global
batch (`global_batch_size`), so its length and every rank's batch count are the same at any world.

State (`state_dict`), identical on every rank except the skip counts:
  epoch, position   global samples consumed in the epoch (a multiple of the micro global batch)
  seed, samples_per_epoch, global_batch_size, shuffle_buffer, resampled, order_digest
                    what fixes the order: must match on resume, else a clear error
  world_size, batch_size, num_workers
                    informative only: a resume may change them (the same global batch kept)
  counts            skip counts of the saving rank (logging only; restored on rank 0 only, so
                    the all-rank sum the trainer logs is not multiplied by the world; a saver
                    may store the all-rank sum here instead)
A resumed run on any world / micro-batch / workers continues at the same global position and reads
exactly the samples the uninterrupted run would have, in the same order, with the same crops/masks.

Image AND video sources: `MixedTrainLoader` (mixed.py), one TrainLoader as above per modality and a
per-optimizer-step modality schedule (modality.py); its state holds each stream's state.

Eval: every val sample is seen once across ranks (contiguous shares); shares and hence batch
counts may differ by one sample between ranks, so gather variable-length features or run eval on
rank 0 with world_size=1 (what the trainer does by default is its choice).
"""
from __future__ import annotations

import hashlib
import logging
import os
import signal
from collections import Counter
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from megavl.config import DataConfig
from megavl.data.collate import Collator
from megavl.data.mixed import MixedTrainLoader
from megavl.data.modality import (MODALITIES, SKIP_REASONS, ModalitySchedule, default_video_share,
                                  source_modality)
from megavl.data.plan import Segment, Source, eval_rank_range, source_quotas
from megavl.data.shards import check_shards_exist, expand_urls, shard_sizes
from megavl.data.stream import EvalPlan, EvalStream, TrainPlan, TrainStream
from megavl.data.text import build_tokenizer
from megavl.data.transforms import eval_transform, train_draft_size, train_transform

logger = logging.getLogger(__name__)

# Forked workers + the Rust tokenizer's thread pool can deadlock; our workers tokenise serially.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_STATE_CHECKED = ("seed", "samples_per_epoch", "global_batch_size", "shuffle_buffer", "resampled",
                  "order_digest")


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

    def __init__(self, plan: TrainPlan, collator: Collator, num_workers: int, global_batch_size: int,
                 order_digest: str, sizing_counts: Counter | None = None):
        self.plan, self.collator, self.num_workers = plan, collator, num_workers
        self.global_batch_size, self.order_digest = global_batch_size, order_digest
        self.epoch = 0
        self.batches_in_epoch = 0
        self.batches_per_epoch = plan.batches_per_epoch  # the same on every rank
        # shards found truncated while counting their samples (no stats.json), counted once
        self._base_counts: Counter = Counter(sizing_counts or {})
        self._worker_counts: dict[int, dict] = {}
        self._iterator: Iterator[dict] | None = None

    @property
    def position(self) -> int:
        """Global samples of the epoch consumed (by all ranks together) before the next batch."""
        return self.batches_in_epoch * self.plan.micro_global_batch

    @property
    def modalities(self) -> tuple[str, ...]:
        """What the run's batches hold: this loader's one modality."""
        return (self.plan.modality,)

    def modality_at(self, step: int) -> str:
        """What optimizer step `step` reads: this loader's one modality."""
        return self.plan.modality

    def samples_consumed(self) -> dict[str, int]:
        """Global samples (all ranks, all epochs) handed out so far, by modality."""
        return {self.plan.modality: self.epoch * self.plan.epoch_length + self.position}

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> dict:
        expected = self.epoch * self.batches_per_epoch + self.batches_in_epoch
        if self._iterator is None:
            stream = TrainStream(self.plan, self.collator, expected)
            self._iterator = iter(_make_loader(stream, self.num_workers))
        batch = next(self._iterator)
        meta = batch.pop("_meta")
        if meta["batch"] != expected:
            raise RuntimeError(f"rank batch {meta['batch']} arrived, expected {expected}: "
                               f"worker order broke")
        self._worker_counts[meta["worker"]] = meta["counts"]
        self.batches_in_epoch += 1
        if self.batches_in_epoch == self.batches_per_epoch:
            self.epoch, self.batches_in_epoch = self.epoch + 1, 0
        return batch

    def _settings(self) -> dict:
        return {"seed": self.plan.seed, "samples_per_epoch": self.plan.epoch_length,
                "global_batch_size": self.global_batch_size,
                "shuffle_buffer": self.plan.shuffle_buffer, "resampled": self.plan.resampled,
                "order_digest": self.order_digest}

    def state_dict(self) -> dict:
        """Global position after the last batch handed out, what fixes the order, skip counts."""
        counts = _sum_counts(self._base_counts, self._worker_counts)
        return {"epoch": self.epoch, "position": self.position, **self._settings(),
                "world_size": self.plan.world_size, "batch_size": self.plan.batch_size,
                "num_workers": self.num_workers, "counts": dict(counts)}

    def load_state_dict(self, state: dict) -> None:
        """Continue at a saved global position. What fixes the order must be unchanged; the world
        size, micro-batch and workers may differ."""
        if "streams" in state:
            raise ValueError("the data state was saved by a mixed image+video run (one position per "
                             "modality), but the train sources are now of one modality: the sample "
                             "order cannot be continued exactly")
        if "position" not in state:
            raise ValueError("the data state has no global 'position' (a round-1 checkpoint, whose "
                             "order depended on the world size): it cannot be continued exactly; "
                             "start a fresh run or resume without the data state")
        settings = self._settings()
        wrong = [f"{k}: saved {state.get(k)!r}, now {settings[k]!r}"
                 for k in _STATE_CHECKED if state.get(k) != settings[k]]
        if wrong:
            raise ValueError("cannot resume the data stream exactly, what fixes the sample order "
                             "changed (seed, shards or their sizes, weights, epoch size, global "
                             "batch, shuffle buffer):\n  " + "\n  ".join(wrong))
        position, micro = int(state["position"]), self.plan.micro_global_batch
        if not 0 <= position < self.plan.epoch_length or position % micro:
            raise ValueError(f"data position {position} is not a multiple of the micro-step global "
                             f"batch {micro} (batch_size x world) inside the epoch's "
                             f"{self.plan.epoch_length}: keep run.global_batch_size and resume at "
                             f"an optimizer step")
        self.close()
        self.epoch, self.batches_in_epoch = int(state["epoch"]), position // micro
        # counts are logged as the sum over ranks: carry them on one rank only, so a resume does not
        # multiply them by the world (the saver may store the all-rank sum in state["counts"])
        self._base_counts = Counter(state.get("counts", {}) if self.plan.rank == 0 else {})
        self._worker_counts = {}

    def skip_counts(self) -> dict[str, int]:
        """Samples skipped so far on this rank, by reason (every reason present, 0 if none)."""
        counts = _sum_counts(self._base_counts, self._worker_counts)
        return {reason: counts.get(reason, 0) for reason in SKIP_REASONS}

    def repeat_count(self) -> int:
        """Slots filled with a repeat of a good sample of the same share (bad or missing ones)."""
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
    check_shards_exist([u for urls in url_lists for u in urls], "data.train_shards")
    weights = cfg.train_weights or [0.0] * len(url_lists)
    # sizes always: the global order maps positions to (shard, index), resampled mode included
    return [Source(urls, shard_sizes(urls, skips), w) for urls, w in zip(url_lists, weights)]


def _order_digest(sources: list[Source], quotas: list[int]) -> str:
    """Digest of the shard lists, their sizes, weights and quotas (anything that moves samples)."""
    parts = [(s.urls, s.sizes, s.weight) for s in sources] + [quotas]
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).hexdigest()


def build_train_loader(cfg: DataConfig, *, rank: int, world_size: int, mlm_prob: float,
                       scl_mask_prob: float, global_batch_size: int = 0,
                       epoch_start_state: dict | None = None) -> TrainLoader | MixedTrainLoader:
    """This rank's endless training loader; `epoch_start_state` = a saved `state_dict()`.

    `global_batch_size`: samples per OPTIMIZER step (`run.global_batch_size`, = batch_size x world
    x grad_accum); the epoch is cut to a multiple of it, so its length does not depend on the world
    size. 0 = batch_size x world_size (then the epoch length does depend on the world).

    Sources of one modality give a TrainLoader; image AND video sources give a MixedTrainLoader: one
    stream per modality (each its own global order and position) and a per-step modality schedule."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if cfg.batch_size <= 0:
        raise ValueError(f"data.batch_size must be positive, got {cfg.batch_size}")
    micro_global = cfg.batch_size * world_size
    global_batch_size = global_batch_size or micro_global
    if global_batch_size % micro_global:
        raise ValueError(f"global batch {global_batch_size} is not a multiple of data.batch_size "
                         f"({cfg.batch_size}) x world_size ({world_size})")
    sizing_counts: Counter = Counter()
    sources = _train_sources(cfg, sizing_counts)
    quotas = [] if cfg.resampled else source_quotas(sources, cfg.samples_per_epoch)
    virtual_size = (sum(quotas) if not cfg.resampled
                    else cfg.samples_per_epoch or sum(s.size for s in sources))
    modalities = [source_modality(s) for s in sources]
    transform = train_transform(cfg.image_size, cfg.train_crop_scale, cfg.hflip, cfg.randaugment)
    collator = Collator(build_tokenizer(cfg.tokenizer), transform, cfg.mean, cfg.std,
                        cfg.max_text_len, mlm_prob, scl_mask_prob)
    stream_args = dict(rank=rank, world_size=world_size, global_batch_size=global_batch_size,
                       collator=collator)
    kinds = sorted(set(modalities), key=MODALITIES.index)
    if len(kinds) == 1:
        if cfg.video_share >= 0 and cfg.video_share != (1.0 if kinds[0] == "video" else 0.0):
            raise ValueError(f"data.video_share={cfg.video_share} but every train source holds "
                             f"{kinds[0]}s: leave it at -1 (auto) or add sources of the other kind")
        loader = _stream_loader(cfg, sources, list(range(len(sources))), quotas, virtual_size,
                                kinds[0], sizing_counts, **stream_args)
    else:
        share = cfg.video_share if cfg.video_share >= 0 else default_video_share(sources, modalities)
        if not 0.0 < share < 1.0:
            raise ValueError(f"data.video_share={share}: image and video sources need a share in "
                             f"(0, 1) (or drop the sources of the modality that gets no steps)")
        # resampled mode: the epoch's samples split between the modalities as quotas would split them
        split = [] if not cfg.resampled else source_quotas(sources, virtual_size)
        streams = {}
        for kind in kinds:
            ids = [i for i, m in enumerate(modalities) if m == kind]
            kind_quotas = [quotas[i] for i in ids] if quotas else []
            kind_size = sum(kind_quotas) if quotas else sum(split[i] for i in ids)
            streams[kind] = _stream_loader(cfg, [sources[i] for i in ids], ids, kind_quotas, kind_size,
                                           kind, sizing_counts if kind == kinds[0] else Counter(),
                                           **stream_args)
        loader = MixedTrainLoader(streams, ModalitySchedule(share, cfg.modality_block, cfg.seed,
                                                            cfg.modality_order),
                                  global_batch_size)
        logger.info("mixed train data: %.3f of the steps read video (blocks of %d steps)", share,
                    cfg.modality_block)
    if epoch_start_state:
        loader.load_state_dict(epoch_start_state)
    return loader


def _stream_loader(cfg: DataConfig, sources: list[Source], source_indices: list[int],
                   quotas: list[int], virtual_size: int, modality: str, sizing_counts: Counter, *,
                   rank: int, world_size: int, global_batch_size: int,
                   collator: Collator) -> TrainLoader:
    """The loader of one modality's sources (all of a single-modality run); `source_indices`: their
    places in data.train_shards (the image-id namespaces, decode.namespaced_id)."""
    epoch_length = virtual_size // global_batch_size * global_batch_size
    if epoch_length == 0:
        raise ValueError(f"an epoch of {virtual_size} {modality} samples cannot give one global batch "
                         f"of {global_batch_size} (batch_size {cfg.batch_size} x {world_size} ranks "
                         f"x grad_accum)")
    plan = TrainPlan(sources=sources, quotas=quotas, resampled=cfg.resampled,
                     virtual_size=virtual_size, epoch_length=epoch_length,
                     shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, batch_size=cfg.batch_size,
                     rank=rank, world_size=world_size, caption_key=cfg.caption_key,
                     max_pixels=cfg.max_image_pixels,
                     draft_size=train_draft_size(cfg.image_size, cfg.train_crop_scale),
                     num_frames=cfg.num_frames, max_video_frames=cfg.max_video_frames,
                     modality=modality, source_indices=source_indices)
    loader = TrainLoader(plan, collator, cfg.num_workers, global_batch_size,
                         _order_digest(sources, quotas), sizing_counts)
    logger.info("train data (%s): %d samples/epoch (of %d), rank %d/%d gets %d batches of %d per "
                "epoch", modality, epoch_length, virtual_size, rank, world_size,
                loader.batches_per_epoch, cfg.batch_size)
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
    url_lists = [expand_urls(pattern) for pattern in cfg.val_shards]
    urls = [u for pattern_urls in url_lists for u in pattern_urls]
    check_shards_exist(urls, "data.val_shards")
    sizing_counts: Counter = Counter()
    sizes = shard_sizes(urls, sizing_counts)
    segments = [Segment(u, 0, n) for u, n in zip(urls, sizes) if n > 0]
    # one look per val_shards pattern (a source is one dataset of one kind), not per shard: this
    # runs at every evaluation, on every rank
    kinds, first = set(), 0
    for pattern_urls in url_lists:
        pattern_sizes = sizes[first:first + len(pattern_urls)]
        first += len(pattern_urls)
        if any(n > 0 for n in pattern_sizes):
            kinds.add(source_modality(Source(pattern_urls, pattern_sizes, 0.0)))
    if len(kinds) > 1:  # an eval batch is one modality, and the val shards are read in file order
        raise ValueError(f"data.val_shards mix images and videos ({urls}): evaluate one modality per "
                         f"run (e.g. the image val shards during mixed pre-training)")
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
