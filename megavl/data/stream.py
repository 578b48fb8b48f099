"""The per-worker pipeline, as a list of stages (what flows out of each in the comments):

  plan.py segments      -> shard pieces this (epoch, rank, logical worker) reads
  shards.iter_raw_samples -> raw samples: keys + byte spans, nothing decoded
  shuffle_buffer        -> raw samples in a seeded order (a pure function of the plan)
  slots of batch_size   -> batch j of this worker is raw samples [j*B, (j+1)*B) of that order
  decode_sample         -> RGB image + caption + image id, or a skip reason (counted)
  fill                  -> skipped slots take a repeat of a good sample of the same batch
  Collator(seed)        -> the batch dict (collate.py), augmentation/masks seeded per batch

Because a batch's raw samples depend only on (seed, epoch, rank, world, workers, batch index) --
never on which samples failed to decode -- the loader's state is just (epoch, batches consumed):
on resume each worker skips its first j*B raw samples without reading image bytes.

DataLoader hands batches out round-robin from worker 0. Global batch k of an epoch belongs to
logical worker k % W; after resuming at batch b, physical worker p plays logical worker
(p + b) % W so the round-robin order continues exactly.
"""
from __future__ import annotations

import itertools
import logging
import random
from collections import Counter, deque
from dataclasses import dataclass
from typing import Iterable, Iterator, TypeVar

import torch
from torch.utils.data import IterableDataset, get_worker_info

from megavl.data.collate import Collator
from megavl.data.decode import Decoded
from megavl.data.video import decode_any, frame_seed
from megavl.data.plan import (Segment, Source, derive_seed, epoch_segments, resampled_segments,
                              slice_segments, worker_chunk)
from megavl.data.shards import RawSample, iter_raw_samples

logger = logging.getLogger(__name__)

T = TypeVar("T")
MAX_LOOKAHEAD_SLOTS = 16     # an all-bad batch borrows good samples from up to this many next ones
MAX_EMPTY_SHARD_DRAWS = 100  # resampled mode: this many unreadable draws in a row is an error


def shuffle_buffer(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """Buffered shuffle (as webdataset's): emits a random buffered item for each new one."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def read_segments(segments: Iterable[Segment], skips: Counter) -> Iterator[RawSample]:
    for seg in segments:
        yield from iter_raw_samples(seg.url, seg.start, seg.stop, skips)


def _worker_identity() -> tuple[int, int | None]:
    info = get_worker_info()
    if info is None:
        return 0, None
    torch.set_num_threads(1)  # W workers x 1 thread: decode parallelism comes from processes
    return info.id, info.num_workers


@dataclass
class TrainPlan:
    """Everything that fixes a rank's sample order (see plan.py)."""

    sources: list[Source]
    quotas: list[int]            # epoch mode: samples per source per epoch
    resampled: bool
    batches_per_worker: int      # per epoch, the same on every rank and worker
    batch_size: int
    num_workers: int             # logical workers W (1 when the DataLoader has none)
    shuffle_buffer: int
    seed: int
    rank: int
    world_size: int
    caption_key: str
    max_pixels: int
    draft_size: int
    num_frames: int = 4          # frames per video clip (image samples are unaffected)
    max_video_frames: int = 18_000


class TrainStream(IterableDataset):
    """Yields this rank's batches forever, starting at (start_epoch, start_batch)."""

    def __init__(self, plan: TrainPlan, collator: Collator, start_epoch: int, start_batch: int):
        self.plan, self.collator = plan, collator
        self.start_epoch, self.start_batch = start_epoch, start_batch

    def __iter__(self) -> Iterator[dict]:
        physical, num_workers = _worker_identity()
        plan = self.plan
        if (num_workers or 1) != plan.num_workers:
            raise RuntimeError(f"stream planned for {plan.num_workers} workers runs in {num_workers}")
        logical = (physical + self.start_batch) % plan.num_workers
        counts: Counter = Counter()
        epoch, done = self.start_epoch, self.start_batch
        while True:
            # batches k < done with k % W == logical were consumed before the restart
            first_j = max(0, (done - logical + plan.num_workers - 1) // plan.num_workers)
            yield from self._epoch(epoch, logical, first_j, counts)
            epoch, done = epoch + 1, 0

    def _raw_order(self, epoch: int, logical: int, skips: Counter) -> Iterator[RawSample]:
        plan = self.plan
        if plan.resampled:
            segments = resampled_segments(plan.sources, plan.seed, epoch, plan.rank, logical)
            rng = random.Random(derive_seed(plan.seed, "shuffle", epoch, plan.rank, logical))
            yield from shuffle_buffer(_guard_empty(segments, skips), plan.shuffle_buffer, rng)
            return
        chunk_len = plan.batches_per_worker * plan.batch_size
        chunk = worker_chunk(epoch_segments(plan.sources, plan.quotas, plan.seed, epoch),
                             plan.rank * plan.num_workers + logical, chunk_len)
        # Pass 0 is the chunk. Later passes only run when shards held fewer samples than their
        # stats said (truncation); they repeat the chunk in a new order to keep batch counts equal.
        for pass_index in itertools.count():
            rng = random.Random(derive_seed(plan.seed, "shuffle", epoch, plan.rank, logical,
                                            pass_index))
            produced = 0
            for raw in shuffle_buffer(read_segments(chunk, skips), plan.shuffle_buffer, rng):
                produced += 1
                raw["__pass__"] = pass_index
                yield raw
            if produced == 0:
                raise RuntimeError(f"rank {plan.rank} worker {logical}: no readable sample in "
                                   f"{[s.url for s in chunk]}")

    def _epoch(self, epoch: int, logical: int, first_j: int, counts: Counter) -> Iterator[dict]:
        plan = self.plan
        raw = self._raw_order(epoch, logical, counts)
        skipped = sum(1 for _ in itertools.islice(raw, first_j * plan.batch_size))
        if skipped != first_j * plan.batch_size:
            raise RuntimeError("raw stream ended while fast-forwarding")
        if first_j:
            counts.clear()  # skips met while fast-forwarding were counted before the restart
        pending: deque[list[RawSample]] = deque()

        def next_slot() -> list[RawSample]:
            if pending:
                return pending.popleft()
            return list(itertools.islice(raw, plan.batch_size))

        for j in range(first_j, plan.batches_per_worker):
            slot = next_slot()
            decoded = [self._decode(r, epoch) for r in slot]
            for d in decoded:
                if isinstance(d, str):
                    counts[d] += 1
            counts["repeated"] += sum(1 for r in slot if r.get("__pass__", 0) > 0)
            good = [d for d in decoded if isinstance(d, Decoded)]
            if not good:
                good = self._borrow(pending, raw, slot, epoch)
            samples, bad = [], 0
            for d in decoded:
                if isinstance(d, Decoded):
                    samples.append(d)
                else:
                    samples.append(good[bad % len(good)])
                    bad += 1
            counts["repeated"] += bad
            index = j * plan.num_workers + logical
            batch = self.collator(samples, derive_seed(plan.seed, "batch", epoch, plan.rank, index))
            batch["_meta"] = {"epoch": epoch, "index": index, "counts": dict(counts)}
            yield batch

    def _decode(self, raw: RawSample, epoch: int) -> Decoded | str:
        plan = self.plan
        return decode_any(raw, caption_key=plan.caption_key, max_pixels=plan.max_pixels,
                          draft_size=plan.draft_size, num_frames=plan.num_frames, train=True,
                          seed=frame_seed(plan.seed, raw, epoch), max_video_frames=plan.max_video_frames)

    def _borrow(self, pending: deque, raw: Iterator[RawSample],
                slot: list[RawSample], epoch: int) -> list[Decoded]:
        """Good samples for a batch whose samples all failed: from the next batches' samples
        (read ahead into `pending`, which later serves those batches as usual)."""
        for depth in range(MAX_LOOKAHEAD_SLOTS):
            if len(pending) <= depth:
                pending.append(list(itertools.islice(raw, self.plan.batch_size)))
            good = [d for d in (self._decode(r, epoch) for r in pending[depth]) if isinstance(d, Decoded)]
            if good:
                return good
        urls = sorted({r["__url__"] for r in slot})
        raise RuntimeError(f"{MAX_LOOKAHEAD_SLOTS + 1} consecutive batches without one decodable "
                           f"sample (shards {urls}): the data is broken, fix or drop these shards")


def _guard_empty(segments: Iterator[Segment], skips: Counter) -> Iterator[RawSample]:
    """Resampled reading that fails loudly instead of spinning over unreadable shards."""
    empty_in_row = 0
    for seg in segments:
        produced = 0
        for raw in iter_raw_samples(seg.url, seg.start, seg.stop, skips):
            produced += 1
            yield raw
        empty_in_row = 0 if produced else empty_in_row + 1
        if empty_in_row >= MAX_EMPTY_SHARD_DRAWS:
            raise RuntimeError(f"{empty_in_row} shard draws in a row gave no sample (last {seg.url})")


@dataclass
class EvalPlan:
    """A rank's contiguous share of the val sequence (plan.eval_rank_range), in file order."""

    segments: list[Segment]      # the whole val sequence, every segment with a stop
    begin: int
    end: int
    batch_size: int
    num_workers: int
    seed: int
    rank: int
    caption_key: str
    max_pixels: int
    draft_size: int
    num_frames: int = 4
    max_video_frames: int = 18_000


class EvalStream(IterableDataset):
    """Each val sample of the rank's share once; workers take contiguous sub-ranges; bad samples are
    dropped (counted), so a worker's last batch may be smaller than batch_size."""

    def __init__(self, plan: EvalPlan, collator: Collator):
        self.plan, self.collator = plan, collator

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker_identity()
        plan, workers = self.plan, num_workers or 1
        total = plan.end - plan.begin
        lo = plan.begin + total * worker // workers
        hi = plan.begin + total * (worker + 1) // workers
        counts: Counter = Counter()
        samples: list[Decoded] = []
        batch_index = 0
        raws = read_segments(slice_segments(plan.segments, lo, hi), counts)
        for raw in itertools.chain(raws, [None]):
            if raw is not None:
                d = decode_any(raw, caption_key=plan.caption_key, max_pixels=plan.max_pixels,
                               draft_size=plan.draft_size, num_frames=plan.num_frames, train=False,
                               max_video_frames=plan.max_video_frames)
                if isinstance(d, str):
                    counts[d] += 1
                    continue
                samples.append(d)
            if samples and (len(samples) == plan.batch_size or raw is None):
                batch = self.collator(samples, derive_seed(plan.seed, "eval", plan.rank, worker,
                                                           batch_index))
                batch["_meta"] = {"worker": worker, "counts": dict(counts)}
                yield batch
                samples, batch_index = [], batch_index + 1
