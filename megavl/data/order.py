"""The epoch's GLOBAL sample order: position p -> (shard url, sample index), a pure function of
(seed, epoch, virtual sequence, shuffle_buffer). Rank, world size, micro-batch and workers play no
part, so any world reads the same order (Megatron-LM's global consumed-sample counter, for tars).

Design. The virtual sequence (sources.py: shuffled shard segments) is cut into WINDOWS of consecutive
whole segments, each grown until it holds at least `shuffle_buffer` samples (so a window is a few
shards: set shuffle_buffer to a few shard sizes, e.g. 50_000 for 10k-sample shards, to make every
global batch mix ~5 shards). Inside a window the samples are permuted by a generator seeded with
(seed, epoch, window). Position p lies in the window that holds virtual index p, so:
  - a global batch mixes the shards of one (or, at a boundary, two) windows;
  - every sample of the virtual sequence appears once per epoch (the last positions of an epoch that
    is cut to a multiple of the global batch are dropped);
  - the readers advance through the shards monotonically: a window's shards are opened once, read
    by seeking (reader.py), and closed when the order has moved on.
shuffle_buffer = 0 keeps the virtual order (no sample shuffle: debugging and tests).
Why windows and not a global permutation: a global permutation would touch every shard in every
global batch (a seek in each of thousands of tars per step, and every tar open at once); a window
keeps the set of open shards small and the reading local, and is what a webdataset shuffle buffer
of that size gives, but defined over the global order instead of per worker.
"""
from __future__ import annotations

import bisect
import random

from megavl.data.seeds import derive_seed
from megavl.data.sources import Segment

_PERMUTATIONS_KEPT = 4  # a batch touches <= 2 windows; borrowing for bad batches may look further


class EpochOrder:
    """Global order of one epoch over `segments` (each with a stop); `length` positions used."""

    def __init__(self, segments: list[Segment], shuffle_buffer: int, seed: int, epoch: int,
                 length: int):
        self.segments, self.seed, self.epoch, self.length = segments, seed, epoch, length
        self.shuffle = shuffle_buffer > 0
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
        self.total = total  # window_starts ends with total: window w is [starts[w], starts[w+1])
        if length > total:
            raise ValueError(f"epoch order of {total} samples cannot serve {length} positions")
        self._perms: dict[int, list[int]] = {}

    def _permutation(self, window: int) -> list[int]:
        perm = self._perms.get(window)
        if perm is None:
            size = self.window_starts[window + 1] - self.window_starts[window]
            perm = list(range(size))
            if self.shuffle:
                random.Random(derive_seed(self.seed, "window", self.epoch, window)).shuffle(perm)
            if len(self._perms) >= _PERMUTATIONS_KEPT:
                self._perms.pop(next(iter(self._perms)))
            self._perms[window] = perm
        return perm

    def virtual_index(self, position: int) -> int:
        if not 0 <= position < self.length:
            raise IndexError(f"position {position} outside the epoch's {self.length}")
        window = bisect.bisect_right(self.window_starts, position) - 1
        lo = self.window_starts[window]
        return lo + self._permutation(window)[position - lo]

    def locate(self, position: int) -> tuple[str, int]:
        """(shard url, sample index in that shard) at a global position of the epoch."""
        v = self.virtual_index(position)
        s = bisect.bisect_right(self.segment_starts, v) - 1
        seg = self.segments[s]
        return seg.url, seg.start + v - self.segment_starts[s]
