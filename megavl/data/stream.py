"""The per-worker pipeline of the training stream, stage by stage (what flows out of each):

  sources.py, order.py  the epoch's global order: position -> (shard, index), world-independent
  rank share            rank batch t of this rank = epoch e = t // batches_per_epoch, micro-step
                        j = t % batches_per_epoch, positions [j*G + r*B, j*G + (r+1)*B), G = B * world
                        (contiguous shares: rank r's rows are rows r*B.. of the global batch)
  reader.py             raw samples, one open handle per shard, member bytes by seek; the shards
                        of windows the order has left are closed when a batch enters a new window
  decode_any            Decoded image or DecodedVideo clip + caption + image id, or a skip reason
                        (counted; decode_image.py, decode_video.py)
  fill                  a bad slot repeats a good sample of the same rank share (i-th bad slot takes
                        good[i % len(good)]); an all-bad share borrows from the rank's next shares
  Collator              PretrainBatch (collate.py, batch.py); augmentation and masks seeded PER
                        SAMPLE from (seed, epoch, position), so a sample looks the same at any world

DataLoader hands batches out round-robin from worker 0, so after a (re)start at rank batch t0,
physical worker p serves t0 + p, t0 + p + W, ...: no state beyond t0, and no fast-forward reading.
What a good sample looks like and where it sits in the global order depend only on (seed, epoch,
position); only the filler of a bad slot depends on the share (B, world).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from megavl.data.collate import Collator
from megavl.data.decode_image import Decoded, decode_sample, namespaced_id
from megavl.data.decode_video import (DEFAULT_MAX_VIDEO_FRAMES, VIDEO_EXTS, DecodedVideo,
                                      decode_video_sample)
from megavl.data.order import EpochOrder, build_epoch_order
from megavl.data.reader import ShardReader
from megavl.data.seeds import derive_seed
from megavl.data.shards import RawSample
from megavl.data.skips import REPEATED, WRONG_MODALITY
from megavl.data.sources import Segment, Source, slice_segments

logger = logging.getLogger(__name__)

MAX_LOOKAHEAD_BATCHES = 16  # an all-bad share borrows good samples from up to this many next ones
MAX_OPEN_SHARDS = 256  # file descriptors a worker may hold (a window of more shards reopens them)


def read_segments(segments: list[Segment], reader: ShardReader) -> Iterator[RawSample]:
    """The raw samples of segments in order (a sample a cut shard lacks is left out, counted by
    the reader)."""
    for seg in segments:
        for index in range(seg.start, seg.stop):
            raw = reader.read(seg.url, index)
            if raw is not None:
                yield raw


def _worker_identity() -> tuple[int, int | None]:
    info = get_worker_info()
    if info is None:
        return 0, None
    torch.set_num_threads(1)  # W workers x 1 thread: decode parallelism comes from processes
    return info.id, info.num_workers


def decode_any(raw: RawSample, *, caption_key: str, max_pixels: int, draft_size: int = 0,
               num_frames: int = 4, train: bool = True, seed: int = 0,
               max_video_frames: int = DEFAULT_MAX_VIDEO_FRAMES) -> Decoded | str:
    """The decode stage for image and video shards alike: a sample with a video member
    (VIDEO_EXTS) decodes as a clip (decode_video.py), any other as an image (decode_image.py)."""
    if any(ext in raw for ext in VIDEO_EXTS):
        return decode_video_sample(raw, caption_key=caption_key, max_pixels=max_pixels,
                                   num_frames=num_frames, train=train, seed=seed,
                                   max_video_frames=max_video_frames)
    return decode_sample(raw, caption_key=caption_key, max_pixels=max_pixels, draft_size=draft_size)


def frame_seed(seed: int, epoch: int, position: int) -> int:
    """Seed of the training frame draw of the clip at a global position: every epoch draws new
    frames, a resumed run (on any world size) the same ones."""
    return derive_seed(seed, "frames", epoch, position)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """Seed of the augmentation and text masks of the sample at a global position."""
    return derive_seed(seed, "sample", epoch, position)


@dataclass
class TrainPlan:
    """Everything that fixes the global order (world-independent) plus this rank's share."""

    sources: list[Source]
    quotas: list[int]            # epoch mode: samples per source per epoch
    resampled: bool
    virtual_size: int            # samples in the epoch's virtual sequence
    epoch_length: int            # positions used per epoch: a multiple of the global batch
    shuffle_buffer: int          # order.py's window size in samples (-1: the whole epoch)
    seed: int
    batch_size: int              # micro-batch B per rank
    rank: int
    world_size: int
    caption_key: str
    max_pixels: int
    draft_size: int
    # per source: its index among data.train_shards (a mixed run's streams hold a subset of them):
    # the namespace of its image ids (decode_image.namespaced_id)
    source_indices: list[int]
    num_frames: int = 4          # frames per video clip (image samples are unaffected)
    max_video_frames: int = 18_000
    modality: str = "image"      # image | video: what every batch of this stream holds (modality.py)

    def __post_init__(self) -> None:
        if len(self.source_indices) != len(self.sources):
            raise ValueError(f"{len(self.source_indices)} source indices for {len(self.sources)} sources")

    def source_of_url(self) -> dict[str, int]:
        """Shard url -> index of its source among data.train_shards (the first, if listed twice)."""
        out: dict[str, int] = {}
        for source, index in zip(self.sources, self.source_indices, strict=True):
            for url in source.urls:
                out.setdefault(url, index)
        return out

    @property
    def micro_global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.epoch_length // self.micro_global_batch

    def epoch_order(self, epoch: int) -> EpochOrder:
        return build_epoch_order(self.sources, self.quotas, resampled=self.resampled,
                                 virtual_size=self.virtual_size, shuffle_buffer=self.shuffle_buffer,
                                 seed=self.seed, epoch=epoch, length=self.epoch_length)

    def shard_sizes(self) -> dict[str, int]:
        """Shard url -> the samples the order assumes it holds (checked when the shard is read)."""
        return {url: n for s in self.sources for url, n in zip(s.urls, s.sizes, strict=True)}

    def max_open_shards(self) -> int:
        """Handles a worker may keep: two windows' worth of shards of median size (a batch spans at
        most two windows, order.py), within [16, 256] (file descriptors)."""
        sizes = sorted(n for s in self.sources for n in s.sizes if n > 0) or [1]
        if self.shuffle_buffer < 0:
            per_window = len(sizes)
        else:
            per_window = -(-max(1, self.shuffle_buffer) // sizes[len(sizes) // 2]) + 1
        return min(MAX_OPEN_SHARDS, max(16, 2 * per_window + 2))

    def share(self, t: int) -> tuple[int, list[int]]:
        """(epoch, global positions) of this rank's batch number t (counted across epochs)."""
        epoch, j = divmod(t, self.batches_per_epoch)
        first = j * self.micro_global_batch + self.rank * self.batch_size
        return epoch, list(range(first, first + self.batch_size))


class TrainStream(IterableDataset):
    """Yields this rank's batches forever, starting at rank batch `start_batch` (across epochs)."""

    def __init__(self, plan: TrainPlan, collator: Collator, start_batch: int):
        self.plan, self.collator, self.start_batch = plan, collator, start_batch

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker_identity()
        step = num_workers or 1
        counts: Counter = Counter()
        self._orders: dict[int, EpochOrder] = {}
        self._window: tuple[int, int] | None = None  # (epoch, window) of the last batch's start
        self._source_of_url = self.plan.source_of_url()
        self._reader = ShardReader(counts, max_open=self.plan.max_open_shards(),
                                   sizes=self.plan.shard_sizes())
        try:
            t = self.start_batch + worker
            while True:
                yield self._batch(t, worker, counts)
                t += step
        finally:
            self._reader.close()

    def _order(self, epoch: int) -> EpochOrder:
        if epoch not in self._orders:
            for old in [e for e in self._orders if e < epoch - 1]:
                del self._orders[old]
            self._orders[epoch] = self.plan.epoch_order(epoch)
        return self._orders[epoch]

    def _decode_share(self, t: int) -> tuple[int, list[int], list[Decoded | str | None]]:
        epoch, positions = self.plan.share(t)
        order = self._order(epoch)
        decoded = []
        for p in positions:
            raw = self._reader.read(*order.locate(p))
            decoded.append(None if raw is None else self._decode(raw, frame_seed(self.plan.seed, epoch, p)))
        return epoch, positions, decoded

    def _leave_windows(self, t: int) -> None:
        """A worker's positions only grow within an epoch: when its batch t starts in a new window,
        close every shard outside the windows this batch reads (the order has left them)."""
        epoch, positions = self.plan.share(t)
        order = self._order(epoch)
        first = order.window_of(positions[0])
        if self._window == (epoch, first):
            return
        self._window = (epoch, first)
        keep = {seg.url for w in range(first, order.window_of(positions[-1]) + 1)
                for seg in order.window_segments(w)}
        self._reader.retain(keep)

    def _batch(self, t: int, worker: int, counts: Counter) -> dict:
        self._leave_windows(t)
        epoch, positions, decoded = self._decode_share(t)
        for d in decoded:
            if isinstance(d, str):
                counts[d] += 1  # None: a sample missing from a short shard, counted by the reader
        good = [d for d in decoded if isinstance(d, Decoded)]
        if not good:
            good = self._borrow(t, positions)
        samples, bad = [], 0
        for d in decoded:
            if isinstance(d, Decoded):
                samples.append(d)
            else:
                samples.append(good[bad % len(good)])
                bad += 1
        counts[REPEATED] += bad
        seeds = [sample_seed(self.plan.seed, epoch, p) for p in positions]
        batch = self.collator(samples, seeds)
        batch["_meta"] = {"batch": t, "worker": worker, "counts": dict(counts)}
        return batch

    def _decode(self, raw: RawSample, frames_seed: int) -> Decoded | str:
        """An image, or a clip whose training frames are drawn with `frames_seed` (a function of the
        seed, epoch and global position: the same frames at any world size); a sample of the other
        modality than the stream's is skipped (a batch must stack)."""
        plan = self.plan
        decoded = decode_any(raw, caption_key=plan.caption_key, max_pixels=plan.max_pixels,
                             draft_size=plan.draft_size, num_frames=plan.num_frames, train=True,
                             seed=frames_seed, max_video_frames=plan.max_video_frames)
        if isinstance(decoded, str):
            return decoded
        if isinstance(decoded, DecodedVideo) != (plan.modality == "video"):
            return WRONG_MODALITY
        source = self._source_of_url[raw["__url__"]]
        return dataclasses.replace(decoded, image_id=namespaced_id(plan.modality, source, decoded.image_id))

    def _borrow(self, t: int, positions: list[int]) -> list[Decoded]:
        """Good samples for a share whose samples all failed: from the rank's next shares (their
        samples still appear in their own batches as usual)."""
        for ahead in range(1, MAX_LOOKAHEAD_BATCHES + 1):
            good = [d for d in self._decode_share(t + ahead)[2] if isinstance(d, Decoded)]
            if good:
                return good
        epoch = self.plan.share(t)[0]
        urls = sorted({self._order(epoch).locate(p)[0] for p in positions})
        raise RuntimeError(f"{MAX_LOOKAHEAD_BATCHES + 1} consecutive batches without one decodable "
                           f"sample (shards {urls}): the data is broken, fix or drop these shards")


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
    num_frames: int = 4          # frames per video clip (image samples are unaffected)
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
        # the val segments are whole shards: their stops are the sizes the reader checks
        reader = ShardReader(counts, max_open=2, sizes={s.url: s.stop for s in plan.segments})
        try:
            yield from self._batches(read_segments(slice_segments(plan.segments, lo, hi), reader),
                                     worker, counts)
        finally:
            reader.close()

    def _batches(self, raws: Iterator[RawSample], worker: int, counts: Counter) -> Iterator[dict]:
        plan = self.plan
        samples: list[Decoded] = []
        seeds: list[int] = []
        for raw in itertools.chain(raws, [None]):
            if raw is not None:
                d = decode_any(raw, caption_key=plan.caption_key, max_pixels=plan.max_pixels,
                               draft_size=plan.draft_size, num_frames=plan.num_frames, train=False,
                               max_video_frames=plan.max_video_frames)
                if isinstance(d, str):
                    counts[d] += 1
                    continue
                samples.append(d)
                # masks seeded by the sample's place in the val sequence: the same on any world
                seeds.append(derive_seed(plan.seed, "eval", raw["__url__"], raw["__index__"]))
            if samples and (len(samples) == plan.batch_size or raw is None):
                batch = self.collator(samples, seeds)
                batch["_meta"] = {"worker": worker, "counts": dict(counts)}
                yield batch
                samples, seeds = [], []
