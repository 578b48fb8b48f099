"""The global order as megavl built it before shards were interleaved across sources (kept for the
"before" side of bench_data.py only): every source's shard segments shuffled together into one
sequence, windows of consecutive whole segments grown to >= shuffle_buffer samples, each window's
samples permuted by `random.shuffle` (a list per window), and a worker's reader holding up to
max(16, 2 x (shards per window + 1) + 2) shards by LRU, never closing a shard before that.

`order_before(plan, epoch)` gives an object with `locate(position)` and `num_windows`, usable where
megavl's EpochOrder is (locate is all TrainStream needs when `release` is off)."""
from __future__ import annotations

import bisect
import random

from megavl.data.seeds import derive_seed
from megavl.data.sources import Segment, _source_segments
from megavl.data.stream import TrainPlan


def epoch_segments_before(plan: TrainPlan, epoch: int) -> list[Segment]:
    rng = random.Random(derive_seed(plan.seed, "epoch", epoch))
    segments = [seg for src, q in zip(plan.sources, plan.quotas)
                for seg in _source_segments(src, q, rng)]
    rng.shuffle(segments)
    return segments


class EpochOrderBefore:
    """Windows of whole shuffled segments, a list permutation per window (the last 4 kept)."""

    def __init__(self, segments: list[Segment], shuffle_buffer: int, seed: int, epoch: int,
                 length: int):
        self.segments, self.seed, self.epoch, self.length = segments, seed, epoch, length
        self.segment_starts: list[int] = []
        self.window_starts: list[int] = [0]
        total = 0
        for seg in segments:
            self.segment_starts.append(total)
            total += seg.stop - seg.start
            if total - self.window_starts[-1] >= max(1, shuffle_buffer):
                self.window_starts.append(total)
        if self.window_starts[-1] != total:
            self.window_starts.append(total)
        self._perms: dict[int, list[int]] = {}

    @property
    def num_windows(self) -> int:
        return len(self.window_starts) - 1

    def _permutation(self, window: int) -> list[int]:
        perm = self._perms.get(window)
        if perm is None:
            perm = list(range(self.window_starts[window + 1] - self.window_starts[window]))
            random.Random(derive_seed(self.seed, "window", self.epoch, window)).shuffle(perm)
            if len(self._perms) >= 4:
                self._perms.pop(next(iter(self._perms)))
            self._perms[window] = perm
        return perm

    def locate(self, position: int) -> tuple[str, int]:
        window = bisect.bisect_right(self.window_starts, position) - 1
        lo = self.window_starts[window]
        v = lo + self._permutation(window)[position - lo]
        s = bisect.bisect_right(self.segment_starts, v) - 1
        seg = self.segments[s]
        return seg.url, seg.start + v - self.segment_starts[s]


def order_before(plan: TrainPlan, epoch: int) -> EpochOrderBefore:
    return EpochOrderBefore(epoch_segments_before(plan, epoch), plan.shuffle_buffer, plan.seed,
                            epoch, plan.epoch_length)


def max_open_before(plan: TrainPlan) -> int:
    sizes = sorted(n for s in plan.sources for n in s.sizes if n > 0) or [1]
    per_window = -(-max(1, plan.shuffle_buffer) // sizes[len(sizes) // 2]) + 1
    return min(256, max(16, 2 * per_window + 2))
