"""Random access to samples of tar shards with ONE open handle per shard.

`ShardReader.read(url, index)` returns the raw sample (shards.py layout, member bytes read) or None
when the shard holds no such sample (it is shorter than its stats said: truncated). A local shard is
opened once and kept open while the global order uses it (an LRU of `max_open` shards; the order
moves through windows of a few shards, order.py); its tar headers are walked lazily, only as far as
the highest index asked for, and member bytes are read with `os.pread` on the same descriptor. So a
worker does one `open` per shard per epoch instead of one per member (2-3 per sample).

Cost at scale, honestly: every worker needs a few samples of every shard, so every worker walks the
headers of every shard of the epoch (one 512-byte read per member, no image bytes of other workers'
samples). A `pipe:` shard cannot seek: it is streamed whole and its samples held in memory while it
is in the LRU (`max_open_pipes`), by every worker that reads from it; use local or mounted shards for
large runs.
"""
from __future__ import annotations

import logging
import os
import tarfile
from collections import Counter, OrderedDict

from megavl.data.shards import TAR_END_BYTES, RawSample, is_pipe, iter_raw_samples, split_member_name
from megavl.data.skips import TRUNCATED_TAR, UNREADABLE_SHARD

logger = logging.getLogger(__name__)


class _LocalShard:
    """One open tar: a lazily extended index of complete samples -> member (offset, size)."""

    def __init__(self, url: str, skips: Counter):
        self.url, self.skips = url, skips
        self.file = open(url, "rb")
        self.size = os.fstat(self.file.fileno()).st_size
        self.tar: tarfile.TarFile | None = None
        self.samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
        self._key: str | None = None
        self._members: dict[str, tuple[int, int]] = {}
        self.done = False
        try:
            self.tar = tarfile.open(fileobj=self.file, mode="r:")
        except (tarfile.TarError, EOFError) as err:
            self._fail(UNREADABLE_SHARD, err)

    def _fail(self, reason: str, err: Exception) -> None:
        self.done = True
        self.skips[reason] += 1
        logger.warning("skipping rest of shard %s after %d samples (%s): %s", self.url,
                       len(self.samples), reason, err)

    def _advance(self) -> None:
        """Read one more member header (or the end of the archive)."""
        try:
            member = self.tar.next()
            self.tar.members.clear()  # our own index is enough; do not grow tarfile's list
        except (tarfile.TarError, EOFError, OSError) as err:
            self._fail(TRUNCATED_TAR if self.samples or self._key else UNREADABLE_SHARD, err)
            return
        if member is None:
            if self.size - self.tar.offset < TAR_END_BYTES:
                # a cut on a header boundary ends tarfile quietly; a complete tar ends with two
                # zero blocks, so the last sample may miss members: drop it (as iter_raw_samples)
                self._fail(TRUNCATED_TAR, EOFError("no end-of-archive blocks"))
                return
            self._close_sample()
            self.done = True
            return
        if not member.isfile():
            return
        key, ext = split_member_name(member.name)
        if key != self._key:
            self._close_sample()
            self._key = key
        self._members[ext] = (member.offset_data, member.size)

    def _close_sample(self) -> None:
        if self._key is not None:
            self.samples.append((self._key, self._members))
        self._key, self._members = None, {}

    def read(self, index: int) -> RawSample | None:
        while len(self.samples) <= index and not self.done:
            self._advance()
        if index >= len(self.samples):
            return None
        key, members = self.samples[index]
        raw: RawSample = {"__key__": key, "__url__": self.url, "__index__": index}
        for ext, (offset, size) in members.items():
            data = os.pread(self.file.fileno(), size, offset)
            if len(data) != size:  # the file was cut after its headers were read
                self.skips[TRUNCATED_TAR] += 1
                return None
            raw[ext] = data
        return raw

    def close(self) -> None:
        self.file.close()


class _PipeShard:
    """A `pipe:` shard streamed once into memory (it cannot seek)."""

    def __init__(self, url: str, skips: Counter):
        self.samples = list(iter_raw_samples(url, skips=skips))

    def read(self, index: int) -> RawSample | None:
        return dict(self.samples[index]) if index < len(self.samples) else None

    def close(self) -> None:
        self.samples = []


class ShardReader:
    """Samples by (url, index); keeps the most recently used shards open. Not thread-safe: one
    reader per DataLoader worker."""

    def __init__(self, skips: Counter, max_open: int = 16, max_open_pipes: int = 2):
        self.skips, self.max_open, self.max_open_pipes = skips, max_open, max_open_pipes
        self._open: OrderedDict[str, _LocalShard | _PipeShard] = OrderedDict()

    def read(self, url: str, index: int) -> RawSample | None:
        shard = self._open.get(url)
        if shard is None:
            shard = self._open_shard(url)
        else:
            self._open.move_to_end(url)
        return shard.read(index)

    def _open_shard(self, url: str) -> _LocalShard | _PipeShard:
        pipe = is_pipe(url)
        limit = self.max_open_pipes if pipe else self.max_open
        same_kind = [u for u in self._open if is_pipe(u) == pipe]
        while len(same_kind) >= limit:
            self._open.pop(same_kind.pop(0)).close()
        try:
            shard = _PipeShard(url, self.skips) if pipe else _LocalShard(url, self.skips)
        except OSError as err:
            self.skips[UNREADABLE_SHARD] += 1
            logger.warning("cannot read shard %s: %s", url, err)
            shard = _PipeShard.__new__(_PipeShard)
            shard.samples = []
        self._open[url] = shard
        return shard

    def retain(self, urls: set[str]) -> None:
        """Close every open shard not in `urls` (shards the global order has left)."""
        for url in [u for u in self._open if u not in urls]:
            self._open.pop(url).close()

    @property
    def open_count(self) -> int:
        return len(self._open)

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()
