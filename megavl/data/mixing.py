"""What the global order's batches look like, and what reading them costs, planned without reading a
sample: the figures of `megavl-data-report` (megavl/tools/data_report.py) and the start-up warning
of a recipe whose global batches would hold too few shards.

  batch_mixing      distinct shards and sources per global batch, and the total-variation distance
                    between a batch's source shares and the epoch's mixture
  window_sizes      shards and samples per shuffle window (order.py)
  simulate_worker   one DataLoader worker's read path over the order: the shards it opens, how many
                    it holds at once (stream.py closes the shards of windows it has left; the reader's
                    LRU bounds the rest), file opens per sample
  warn_if_unmixed   the start-up check (build.py)
"""
from __future__ import annotations

import logging
import statistics
from collections import OrderedDict
from dataclasses import dataclass

from megavl.data.order import EpochOrder
from megavl.data.stream import TrainPlan

logger = logging.getLogger(__name__)

MIN_SHARDS_PER_BATCH = 4       # fewer per global batch: logged at start
_CHECK_BATCHES = 8             # global batches looked at by the start-up check, spread over epoch 0
_CHECK_POSITIONS = 4096        # ... and positions of each (distinct shards only grow with more)


@dataclass(frozen=True)
class BatchMixing:
    """Mixing of `batches` consecutive global batches of `global_batch` positions."""

    batches: int
    global_batch: int
    shards_mean: float
    shards_min: int
    sources_mean: float
    tv_mean: float
    tv_max: float


def mixture(plan: TrainPlan) -> list[float]:
    """Each source's share of the epoch's samples: its quota (epoch mode), or its weight (by size
    without weights) in resampled mode."""
    if plan.resampled:
        if all(s.weight <= 0 for s in plan.sources):
            parts = [float(s.size) for s in plan.sources]
        else:
            parts = [s.weight if s.size > 0 else 0.0 for s in plan.sources]
    else:
        parts = [float(q) for q in plan.quotas]
    total = sum(parts)
    return [p / total for p in parts]


def source_of_url(plan: TrainPlan) -> dict[str, int]:
    """Shard url -> index of its source in plan.sources (the first, if listed twice)."""
    out: dict[str, int] = {}
    for i, source in enumerate(plan.sources):
        for url in source.urls:
            out.setdefault(url, i)
    return out


def batch_mixing(order: EpochOrder, source_of_url: dict[str, int], shares: list[float],
                 global_batch: int, batches: int, first: int = 0,
                 positions_per_batch: int = 0) -> BatchMixing:
    """Global batches first .. first + batches - 1 of the order (those that fit in the epoch);
    `source_of_url` maps a shard to its index in `shares`; `positions_per_batch` > 0 looks at only
    that many leading positions of each batch."""
    batches = max(0, min(batches, order.length // global_batch - first))
    if batches == 0:
        raise ValueError(f"the epoch's {order.length} positions hold no global batch of "
                         f"{global_batch} from batch {first} on")
    look = min(global_batch, positions_per_batch or global_batch)
    shards, sources, tvs = [], [], []
    for b in range(first, first + batches):
        counts = [0] * len(shares)
        urls = set()
        for p in range(b * global_batch, b * global_batch + look):
            url, _ = order.locate(p)
            urls.add(url)
            counts[source_of_url[url]] += 1
        shards.append(len(urls))
        sources.append(sum(1 for c in counts if c))
        tvs.append(0.5 * sum(abs(c / look - s) for c, s in zip(counts, shares)))
    return BatchMixing(batches, global_batch, statistics.fmean(shards), min(shards),
                       statistics.fmean(sources), statistics.fmean(tvs), max(tvs))


@dataclass(frozen=True)
class WindowSizes:
    windows: int
    shards: tuple[int, int, int]    # min, median, max segments (shards or shard pieces) per window
    samples: tuple[int, int, int]   # min, median, max samples per window


def window_sizes(order: EpochOrder) -> WindowSizes:
    shards = [len(order.window_segments(w)) for w in range(order.num_windows)]
    samples = [order.window_starts[w + 1] - order.window_starts[w] for w in range(order.num_windows)]

    def spread(xs: list[int]) -> tuple[int, int, int]:
        return min(xs), int(statistics.median(xs)), max(xs)

    return WindowSizes(order.num_windows, spread(shards), spread(samples))


@dataclass(frozen=True)
class WorkerReads:
    """One DataLoader worker's reading over the batches it serves: `opens` of a shard (per shard:
    `samples_per_open` samples read on average before it was closed), at most `max_open` at once."""

    samples: int
    opens: int
    max_open: int
    open_limit: int
    shards: int                     # distinct shards it read

    @property
    def opens_per_sample(self) -> float:
        return self.opens / self.samples

    @property
    def samples_per_open(self) -> float:
        return self.samples / self.opens


def simulate_worker(plan: TrainPlan, order: EpochOrder, num_workers: int, worker: int = 0,
                    max_batches: int = 0, *, release: bool = True,
                    open_limit: int = 0) -> WorkerReads:
    """The read path of worker `worker` of `num_workers` on the plan's rank over one epoch (or its
    first `max_batches` rank batches): stream.py's window release plus the reader's LRU of
    `plan.max_open_shards()` handles, as TrainStream does them, without opening a file.
    `release=False`, `open_limit`: a reader that only evicts by LRU, with that many handles (for
    comparing with other orders that have only `locate`)."""
    limit = open_limit or plan.max_open_shards()
    open_: OrderedDict[str, None] = OrderedDict()
    opens = samples = peak = 0
    seen: set[str] = set()
    window = None
    batches = plan.batches_per_epoch if max_batches <= 0 else min(max_batches, plan.batches_per_epoch)
    for t in range(worker, batches, max(1, num_workers)):
        _, positions = plan.share(t)
        first = order.window_of(positions[0]) if release else None
        if release and window != first:
            window = first
            keep = {seg.url for w in range(first, order.window_of(positions[-1]) + 1)
                    for seg in order.window_segments(w)}
            for url in [u for u in open_ if u not in keep]:
                del open_[url]
        for p in positions:
            url, _ = order.locate(p)
            samples += 1
            seen.add(url)
            if url in open_:
                open_.move_to_end(url)
                continue
            while len(open_) >= limit:
                open_.popitem(last=False)
            open_[url] = None
            opens += 1
            peak = max(peak, len(open_))
    if samples == 0:
        raise ValueError(f"worker {worker} of {num_workers} serves no batch of the epoch")
    return WorkerReads(samples, opens, peak, limit, len(seen))


def warn_if_unmixed(plan: TrainPlan, global_batch: int) -> BatchMixing | None:
    """Log a warning naming data.shuffle_buffer when the order's global batches hold fewer than
    MIN_SHARDS_PER_BATCH distinct shards (or fewer than the epoch has, when it has fewer): a look at
    a few global batches spread over epoch 0, a fraction of a second."""
    order = plan.epoch_order(0)
    total = order.length // global_batch
    if total == 0:
        return None
    stride = max(1, total // _CHECK_BATCHES)
    urls = source_of_url(plan)
    looked = [batch_mixing(order, urls, mixture(plan), global_batch, 1, first=b,
                           positions_per_batch=_CHECK_POSITIONS)
              for b in range(0, total, stride)][:_CHECK_BATCHES]
    mean = statistics.fmean(m.shards_mean for m in looked)
    shards = len({seg.url for seg in order.segments})
    if mean < min(MIN_SHARDS_PER_BATCH, shards):
        median = sorted(n for s in plan.sources for n in s.sizes if n > 0)
        shard = median[len(median) // 2] if median else 0
        logger.warning(
            "%s data: global batches of %d hold %.1f distinct shards on average (of %d in the "
            "epoch): data.shuffle_buffer=%d samples is about %.1f shards of %d. Batches of one or "
            "two shards make ITC/ITM negatives and Adam's moments single-source: raise "
            "data.shuffle_buffer to ~32 shards' worth (%d), or -1 for a full permutation "
            "(megavl-data-report shows the cost)", plan.modality, global_batch, mean, shards,
            plan.shuffle_buffer, plan.shuffle_buffer / max(1, shard), shard, 32 * shard)
    return BatchMixing(len(looked), global_batch, mean, min(m.shards_min for m in looked),
                       statistics.fmean(m.sources_mean for m in looked),
                       statistics.fmean(m.tv_mean for m in looked), max(m.tv_max for m in looked))
