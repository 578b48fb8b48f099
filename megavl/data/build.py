"""The data layer's factories: what the engine and the tasks call to get their batches.

  build_train_loader   pre-training: data.train_shards -> this rank's endless TrainLoader
                       (one modality) or MixedTrainLoader (image and video sources)
  size_val_shards      pre-training: data.val_shards -> their sizes, once per run
  build_eval_loader    pre-training: data.val_shards -> this rank's EvalLoader
  build_task_collators fine-tuning: the (train, eval) TaskCollators of the data config
  build_task_loader    fine-tuning: annotation items -> this rank's TaskLoader

Training images are JPEG-drafted (decoded at a reduced DCT scale) only as far as the smallest
RandomResizedCrop of data.train_crop_scale still finds image_size pixels per side
(transforms.train_draft_size); evaluation resizes the whole image, so image_size is enough.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from transformers import PreTrainedTokenizerFast

from megavl.config import DataConfig
from megavl.data.collate import Collator
from megavl.data.loader import EvalLoader, TrainLoader
from megavl.data.mixed import MixedTrainLoader
from megavl.data.mixing import warn_if_unmixed
from megavl.data.modality import MODALITIES, ModalitySchedule, default_video_share, source_modality
from megavl.data.shards import check_shards_exist, expand_urls, shard_sizes
from megavl.data.sources import Segment, Source, eval_rank_range, source_quotas
from megavl.data.stream import EvalPlan, TrainPlan
from megavl.data.task_data import TaskCollator, TaskDataset, TaskLoader, VideoTaskDataset
from megavl.data.text import build_tokenizer
from megavl.data.transforms import eval_transform, train_draft_size, train_transform

logger = logging.getLogger(__name__)


def _train_sources(cfg: DataConfig, skips: Counter, world_size: int) -> list[Source]:
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
    # one sizing pass for all sources: rank 0 reads the stats (or counts) and shares the sizes
    flat = shard_sizes([u for urls in url_lists for u in urls], skips, world_size=world_size)
    sources, first = [], 0
    for urls, w in zip(url_lists, weights):
        sources.append(Source(urls, flat[first:first + len(urls)], w))
        first += len(urls)
    return sources


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
    sources = _train_sources(cfg, sizing_counts, world_size)
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
    places in data.train_shards (the image-id namespaces, decode_image.namespaced_id)."""
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
    if rank == 0:
        warn_if_unmixed(plan, global_batch_size)
    loader = TrainLoader(plan, collator, cfg.num_workers, global_batch_size, sizing_counts)
    logger.info("train data (%s): %d samples/epoch (of %d), rank %d/%d gets %d batches of %d per "
                "epoch", modality, epoch_length, virtual_size, rank, world_size,
                loader.batches_per_epoch, cfg.batch_size)
    return loader


@dataclass
class ValShards:
    """The val set as sized once per run (`size_val_shards`): its whole-shard segments in file
    order, and the skips found while sizing it (a truncated shard)."""

    segments: list[Segment]
    sizing_counts: Counter


def size_val_shards(cfg: DataConfig, *, world_size: int) -> ValShards:
    """Size `cfg.val_shards` (stats files, else rank 0 counts and shares: call on every rank of the
    run's process group) and check they hold one modality. A run does this once, not per
    evaluation."""
    if not cfg.val_shards:
        raise ValueError("data.val_shards is empty")
    url_lists = [expand_urls(pattern) for pattern in cfg.val_shards]
    urls = [u for pattern_urls in url_lists for u in pattern_urls]
    check_shards_exist(urls, "data.val_shards")
    sizing_counts: Counter = Counter()
    sizes = shard_sizes(urls, sizing_counts, world_size=world_size)
    kinds, first = set(), 0
    for pattern_urls in url_lists:  # one look per pattern (a source is one dataset of one kind)
        pattern_sizes = sizes[first:first + len(pattern_urls)]
        first += len(pattern_urls)
        if any(n > 0 for n in pattern_sizes):
            kinds.add(source_modality(Source(pattern_urls, pattern_sizes, 0.0)))
    if len(kinds) > 1:  # an eval batch is one modality, and the val shards are read in file order
        raise ValueError(f"data.val_shards mix images and videos ({urls}): evaluate one modality per "
                         f"run (e.g. the image val shards during mixed pre-training)")
    return ValShards([Segment(u, 0, n) for u, n in zip(urls, sizes) if n > 0], sizing_counts)


def build_eval_loader(cfg: DataConfig, *, rank: int, world_size: int, mlm_prob: float = 0.15,
                      scl_mask_prob: float = 0.4, val: ValShards | None = None) -> EvalLoader:
    """Deterministic loader over `cfg.val_shards` (eval transform, file order, fixed masks); `val`:
    the val set as sized before (`size_val_shards`), else sized now."""
    val = val if val is not None else size_val_shards(cfg, world_size=world_size)
    segments = val.segments
    total = sum(s.stop for s in segments)
    begin, end = eval_rank_range(total, rank, world_size)
    plan = EvalPlan(segments=segments, begin=begin, end=end, batch_size=cfg.batch_size,
                    num_workers=max(1, cfg.num_workers), seed=cfg.seed, rank=rank,
                    caption_key=cfg.caption_key, max_pixels=cfg.max_image_pixels,
                    draft_size=cfg.image_size, num_frames=cfg.num_frames,
                    max_video_frames=cfg.max_video_frames)
    collator = Collator(build_tokenizer(cfg.tokenizer), eval_transform(cfg.image_size), cfg.mean,
                        cfg.std, cfg.max_text_len, mlm_prob, scl_mask_prob)
    return EvalLoader(plan, collator, cfg.num_workers, val.sizing_counts)


def build_task_collators(cfg: DataConfig, tokenizer: PreTrainedTokenizerFast, *, video: bool = False,
                         keep_batch_size: bool = False) -> tuple[TaskCollator, TaskCollator]:
    """(train, eval) TaskCollators: ALBEF train augmentation and eval resize (video: on clips of
    data.num_frames frames; keep_batch_size: see TaskCollator)."""
    clip_frames = cfg.num_frames if video else 0
    augment = train_transform(cfg.image_size, cfg.train_crop_scale, cfg.hflip, cfg.randaugment)
    train = TaskCollator(augment, cfg.mean, cfg.std, tokenizer, cfg.max_text_len, train=True,
                         image_size=cfg.image_size, clip_frames=clip_frames,
                         keep_batch_size=keep_batch_size)
    evaluation = TaskCollator(eval_transform(cfg.image_size), cfg.mean, cfg.std, tokenizer,
                              cfg.max_text_len, train=False, image_size=cfg.image_size,
                              clip_frames=clip_frames)
    return train, evaluation


def build_task_loader(items: list, to_fields: Callable[[object], tuple[list[str], dict]],
                      collator: TaskCollator, cfg: DataConfig, *, rank: int, world: int, seed: int,
                      train: bool, video: bool = False, global_batch_size: int | None = None) -> TaskLoader:
    """This rank's TaskLoader over items whose paths (`to_fields`) are images, or videos decoded as
    data.num_frames frames; `seed` (run.seed) fixes the order, crops and frame draws;
    `global_batch_size` (samples per optimizer step over all ranks) cuts the training order into
    world-independent global batches."""
    if video:
        dataset: TaskDataset = VideoTaskDataset(items, to_fields, cfg.num_frames, train=train,
                                                seed=seed, max_pixels=cfg.max_image_pixels,
                                                max_video_frames=cfg.max_video_frames)
    else:
        draft = train_draft_size(cfg.image_size, cfg.train_crop_scale) if train else cfg.image_size
        dataset = TaskDataset(items, to_fields, cfg.max_image_pixels, draft, seed=seed)
    return TaskLoader(dataset, collator, batch_size=cfg.batch_size, rank=rank, world=world,
                      train=train, seed=seed, num_workers=cfg.num_workers,
                      global_batch_size=global_batch_size)
