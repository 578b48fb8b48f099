"""The epoch's virtual sample sequence: a pure function of (seed, epoch, sources), never of the world.

Epoch mode: each source contributes a quota of samples per epoch (its size, or its mixture weight
times the epoch size; a quota above the size repeats whole shards, below it takes a subset that
changes every epoch). Each source's shard pieces ("segments", its shards in a new order every
epoch) are INTERLEAVED into one virtual sequence in proportion to the sources' samples, from a random
phase per source and epoch: any K consecutive segments hold each source's share of K to within one
segment, so order.py's windows of K shards are a fair draw of the mixture.

Resampled mode: the virtual sequence is whole shards drawn with replacement from one epoch-seeded
generator until the epoch is full: the next shard comes from the source furthest behind its share of
the samples so far (by weight, or by size without weights; stride scheduling from a random phase),
drawn uniformly among that source's shards.

order.py turns the virtual sequence into the epoch's global sample order; which rank reads which
position is stream.py's business. Nothing here depends on the rank, world size or workers.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from megavl.data.seeds import derive_seed


@dataclass(frozen=True)
class Segment:
    """Samples `start <= i < stop` of one shard (`stop=None`: to the shard's end)."""

    url: str
    start: int
    stop: int | None


@dataclass(frozen=True)
class Source:
    """One dataset of a mixture: its shard URLs and (when known) samples per shard."""

    urls: list[str]
    sizes: list[int] | None
    weight: float

    @property
    def size(self) -> int:
        if self.sizes is None:
            raise ValueError("source size unknown")
        return sum(self.sizes)


def source_quotas(sources: list[Source], samples_per_epoch: int) -> list[int]:
    """Samples each source contributes per epoch; weights are normalised, 0 weights = by size."""
    if all(s.weight <= 0 for s in sources):
        sizes = [s.size for s in sources]
        if samples_per_epoch <= 0:
            return sizes
        total = sum(sizes)
        return [round(samples_per_epoch * n / total) for n in sizes]
    total_weight = sum(s.weight for s in sources)
    epoch_size = samples_per_epoch if samples_per_epoch > 0 else sum(s.size for s in sources)
    return [round(epoch_size * s.weight / total_weight) for s in sources]


def _source_segments(source: Source, quota: int, rng: random.Random) -> list[Segment]:
    """`quota` samples of one source as whole shards in shuffled order, the last one partial."""
    segments: list[Segment] = []
    remaining = quota
    while remaining > 0:
        order = list(range(len(source.urls)))
        rng.shuffle(order)
        for i in order:
            n = source.sizes[i]
            if n <= 0:
                continue
            take = min(n, remaining)
            segments.append(Segment(source.urls[i], 0, take))
            remaining -= take
            if remaining == 0:
                break
        if source.size == 0:
            raise ValueError(f"source {source.urls[0]}... has no samples")
    return segments


def interleave(groups: list[list[Segment]], rng: random.Random) -> list[Segment]:
    """One sequence of the groups' segments, each group spread evenly over it by samples: a segment
    sits at the fraction of its group's samples where it falls, shifted by a random phase per group
    (ties: the group listed first). Every group keeps its own order."""
    keyed: list[tuple[float, int, int, Segment]] = []
    for g, segments in enumerate(groups):
        total = sum(seg.stop - seg.start for seg in segments)
        phase, done = rng.random(), 0
        for i, seg in enumerate(segments):
            length = seg.stop - seg.start
            keyed.append(((done + phase * length) / total, g, i, seg))
            done += length
    keyed.sort(key=lambda item: item[:3])
    return [item[3] for item in keyed]


def epoch_segments(sources: list[Source], quotas: list[int], seed: int, epoch: int) -> list[Segment]:
    """The epoch's virtual sample sequence as an ordered list of shard segments."""
    rng = random.Random(derive_seed(seed, "epoch", epoch))
    groups = [_source_segments(src, q, rng) for src, q in zip(sources, quotas)]
    return interleave([g for g in groups if g], rng)


def slice_segments(segments: list[Segment], begin: int, end: int) -> list[Segment]:
    """Virtual samples `begin <= i < end` of a segment sequence (segments must have a stop)."""
    out: list[Segment] = []
    pos = 0
    for seg in segments:
        length = seg.stop - seg.start
        lo, hi = max(begin, pos), min(end, pos + length)
        if lo < hi:
            out.append(Segment(seg.url, seg.start + lo - pos, seg.start + hi - pos))
        pos += length
        if pos >= end:
            break
    return out


def resampled_epoch_segments(sources: list[Source], epoch_size: int, seed: int,
                            epoch: int) -> list[Segment]:
    """`epoch_size` samples as whole shards drawn with replacement (the last one cut)."""
    rng = random.Random(derive_seed(seed, "resample", epoch))
    if all(s.weight <= 0 for s in sources):
        weights = [float(s.size) for s in sources]
    else:
        weights = [s.weight for s in sources]
    weights = [w if s.size > 0 else 0.0 for w, s in zip(weights, sources)]  # never draw empty ones
    if not any(w > 0 for w in weights):
        raise ValueError("resampled mode: no source with a positive weight has samples")
    drawn = [i for i, w in enumerate(weights) if w > 0]
    # stride scheduling: source s is due when (its samples so far + a phase of one mean shard) per
    # unit of weight is the smallest, so every stretch of the sequence holds the mixture
    lead = {s: rng.random() * sources[s].size / len(sources[s].urls) for s in drawn}
    taken = dict.fromkeys(drawn, 0)
    segments: list[Segment] = []
    remaining = epoch_size
    while remaining > 0:
        s = min(drawn, key=lambda j: ((taken[j] + lead[j]) / weights[j], j))
        source = sources[s]
        i = rng.randrange(len(source.urls))
        take = min(source.sizes[i], remaining)
        if take > 0:
            segments.append(Segment(source.urls[i], 0, take))
            remaining -= take
            taken[s] += take
    return segments


def eval_rank_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous share of `total` eval samples for one rank; shares differ by at most one."""
    return total * rank // world_size, total * (rank + 1) // world_size
