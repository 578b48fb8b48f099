"""The epoch's GLOBAL sample order: position p -> (shard url, sample index), a pure function of
(seed, epoch, virtual sequence, shuffle_buffer). Rank, world size, micro-batch and workers play no
part, so any world reads the same order (Megatron-LM's global consumed-sample counter, for tars).

Design: two levels.
  1. Shards. The virtual sequence (sources.py) lays the epoch's shard segments out INTERLEAVED across
     sources in proportion to their quotas: any stretch of K consecutive segments holds each source's
     share of K to within one segment, whatever the stretch.
  2. Samples. That sequence is cut into WINDOWS of consecutive whole segments, each grown until it
     holds at least `shuffle_buffer` samples (a short last window joins the one before), and the
     samples of a window are permuted. Position p lies in the window that holds virtual index p.
So a global batch is a uniform draw (without replacement) from the K shards of one window (two, at
a boundary), and its source shares are those of the mixture up to sampling noise. With 10k-sample
shards, shuffle_buffer = 320_000 (K = 32) puts ~32 distinct shards into a batch of 512; a value at
least the epoch's size, or -1, makes the whole epoch one window: a full permutation.

What each level costs a DataLoader worker (every worker reads a slice of every window, so every
worker opens every shard of the epoch once, whatever K):
  - open handles: the shards of the window(s) its current batch touches, <= 2 K (stream.py closes
    the shards of windows the order has left);
  - file opens per sample and header/index bytes per sample: (workers in the job) / (shard size),
    the same for any K as long as a worker can hold a window's shards open; a full permutation of
    an epoch with more shards than a worker may keep open reopens a shard for nearly every sample;
  - memory of the permutation: none. A window's permutation is a keyed bijection (a Feistel network
    with cycle walking) computed per position, never a list, so a window of 14M samples costs what a
    window of 1000 does.
shuffle_buffer = 0 keeps the virtual order (no sample shuffle: debugging and tests).
"""
from __future__ import annotations

import bisect

from megavl.data.seeds import derive_seed
from megavl.data.sources import Segment, Source, epoch_segments, resampled_epoch_segments

ORDER_VERSION = "interleaved-windows-feistel-1"  # in the loader state: a changed algorithm refuses resume

_MASK64 = (1 << 64) - 1
_ROUNDS = 6


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a fast 64-bit mixing function (the Feistel round function)."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class KeyedPermutation:
    """A pseudo-random bijection of range(n) chosen by `key`, evaluated one index at a time.

    A balanced Feistel network on the smallest even number of bits that covers n is a bijection of
    [0, 2^bits); cycle walking (apply it again while the result is >= n) restricts it to a bijection
    of [0, n). 2^bits < 4n, so a call walks fewer than 4 times on average. O(1) memory for any n."""

    def __init__(self, n: int, key: int):
        if n <= 0:
            raise ValueError(f"permutation of {n} elements")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self._half = (bits + 1) // 2
        self._mask = (1 << self._half) - 1
        self._keys = [_mix64((key + r * 0x9E3779B97F4A7C15) & _MASK64) for r in range(_ROUNDS)]

    def __call__(self, index: int) -> int:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} outside a permutation of {self.n}")
        half, mask, x = self._half, self._mask, index
        while True:
            left, right = x >> half, x & mask
            for k in self._keys:
                left, right = right, left ^ (_mix64(right ^ k) & mask)
            x = (left << half) | right
            if x < self.n:
                return x


def window_bounds(lengths: list[int], shuffle_buffer: int) -> list[int]:
    """Virtual starts of the windows over segments of these lengths, ending with the total:
    consecutive whole segments grown to >= shuffle_buffer samples; a short last window joins the one
    before; shuffle_buffer < 0: one window."""
    total = sum(lengths)
    if shuffle_buffer < 0:
        return [0, total]
    starts, filled = [0], 0
    for n in lengths:
        filled += n
        if filled - starts[-1] >= max(1, shuffle_buffer):
            starts.append(filled)
    if starts[-1] != total:
        if len(starts) > 1 and shuffle_buffer > 0:
            starts[-1] = total  # the tail is short: it joins the window before
        else:
            starts.append(total)
    return starts


class EpochOrder:
    """Global order of one epoch over `segments` (each with a stop); `length` positions used."""

    def __init__(self, segments: list[Segment], shuffle_buffer: int, seed: int, epoch: int,
                 length: int):
        self.segments, self.seed, self.epoch, self.length = segments, seed, epoch, length
        self.shuffle = shuffle_buffer != 0
        lengths = [seg.stop - seg.start for seg in segments]
        self.segment_starts: list[int] = []
        total = 0
        for n in lengths:
            self.segment_starts.append(total)
            total += n
        self.total = total
        # window w is virtual [window_starts[w], window_starts[w + 1]); the list ends with total
        self.window_starts = window_bounds(lengths, shuffle_buffer)
        if length > total:
            raise ValueError(f"epoch order of {total} samples cannot serve {length} positions")
        self._perms: dict[int, KeyedPermutation] = {}

    @property
    def num_windows(self) -> int:
        return len(self.window_starts) - 1

    def window_of(self, position: int) -> int:
        """The window that serves a position (positions and virtual indices share the windows)."""
        return bisect.bisect_right(self.window_starts, position) - 1

    def window_segments(self, window: int) -> list[Segment]:
        """The segments of one window, in virtual order."""
        lo = bisect.bisect_left(self.segment_starts, self.window_starts[window])
        hi = bisect.bisect_left(self.segment_starts, self.window_starts[window + 1])
        return self.segments[lo:hi]

    def _permutation(self, window: int) -> KeyedPermutation:
        perm = self._perms.get(window)
        if perm is None:
            size = self.window_starts[window + 1] - self.window_starts[window]
            perm = KeyedPermutation(size, derive_seed(self.seed, "window", self.epoch, window))
            if len(self._perms) >= 8:  # a batch touches <= 2 windows; a few more cost nothing
                self._perms.pop(next(iter(self._perms)))
            self._perms[window] = perm
        return perm

    def virtual_index(self, position: int) -> int:
        if not 0 <= position < self.length:
            raise IndexError(f"position {position} outside the epoch's {self.length}")
        if not self.shuffle:
            return position
        window = self.window_of(position)
        lo = self.window_starts[window]
        return lo + self._permutation(window)(position - lo)

    def locate(self, position: int) -> tuple[str, int]:
        """(shard url, sample index in that shard) at a global position of the epoch."""
        v = self.virtual_index(position)
        s = bisect.bisect_right(self.segment_starts, v) - 1
        seg = self.segments[s]
        return seg.url, seg.start + v - self.segment_starts[s]


def build_epoch_order(sources: list[Source], quotas: list[int], *, resampled: bool,
                      virtual_size: int, shuffle_buffer: int, seed: int, epoch: int,
                      length: int) -> EpochOrder:
    """The epoch's order from the sources: epoch mode (quotas) or resampled mode."""
    if resampled:
        segments = resampled_epoch_segments(sources, virtual_size, seed, epoch)
    else:
        segments = epoch_segments(sources, quotas, seed, epoch)
    return EpochOrder(segments, shuffle_buffer, seed, epoch, length)
