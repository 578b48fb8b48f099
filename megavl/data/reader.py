"""Random access to samples of tar shards with ONE open handle per shard.

`ShardReader.read(url, index)` returns the raw sample (shards.py layout, member bytes read) or None
when the shard holds no such sample (it was cut: truncated). A local shard is opened once and kept
open while the order uses it (an LRU of `max_open` shards; the order moves through windows of a few
shards, order.py).

With a member index (index.py, `SHARD.tar.idx`): sample i costs one `pread` of its index record
(~100 bytes) and ONE `pread` of its members with the tar headers between them, which are checked
to name them. The index stays open with its tar (two descriptors per open shard); opening it reads
its header line only.

Without one, the shard's tar headers are walked lazily, as far as the highest index asked for, and
member bytes are read with `os.pread` on the same descriptor: every worker then walks the headers of
every shard it reads from (one 512-byte read per member), which at 10,000 samples per shard costs
far more than the few samples it needs. Each such shard is counted once per reader as
`missing_index`; an index that disagrees with its tar (size, a member outside the file, a header
that does not name the member) is counted as `bad_index`, named in the log, and the shard is read by
walking its headers instead.

`sizes` (url -> samples, from the stats files) is checked when a shard is read: an index, or a
complete tar, that holds another number of samples is a DataError naming the shard, before the
order hands out a position that does not exist or misses samples that do.

A `pipe:` shard cannot seek: it is streamed whole and its samples held in memory while it is in the
LRU (`max_open_pipes`), by every worker that reads from it; use local or mounted shards for large
runs. `io` counts opens, reads and bytes read (the benchmark's and the tests' view of the cost).
"""
from __future__ import annotations

import logging
import os
import tarfile
from collections import Counter, OrderedDict
from typing import Callable

from megavl.data.index import (TAR_BLOCK, IndexMismatch, ReadCost, ShardIndex, header_names,
                               index_path)
from megavl.data.shards import (TAR_END_BYTES, RawSample, caption_sample, group_captions, is_pipe,
                                iter_raw_samples, split_member_name)
from megavl.data.skips import BAD_INDEX, MISSING_INDEX, TRUNCATED_TAR, UNREADABLE_SHARD
from megavl.errors import DataError

logger = logging.getLogger(__name__)

Note = Callable[[str, str, str], None]  # (url, skip reason, detail): ShardReader._note


def _stats_lie(url: str, found: str, expected: int) -> DataError:
    return DataError(f"shard {url} holds {found} samples but its stats file says {expected}: the "
                     f"stats are stale (the shard was rewritten after them); delete the stats.json "
                     f"next to it or rewrite it (megavl-make-shards --index-only)")


class _CountingFile:
    """The shard's file as tarfile sees it during a header walk, counting the reads."""

    def __init__(self, file, io: ReadCost):
        self.file, self.io = file, io

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        self.io.read(len(data))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()


class _LocalShard:
    """One open tar, read through its member index or, without a usable one, by a lazily extended
    header walk (samples -> member (offset, size))."""

    def __init__(self, url: str, skips: Counter, expected: int | None, io: ReadCost, note: Note):
        self.url, self.skips, self.expected, self.io, self.note = url, skips, expected, io, note
        self.file = open(url, "rb")
        io.opens += 1
        self.fd = self.file.fileno()
        self.size = os.fstat(self.fd).st_size
        self.index = self._load_index()
        if self.index is not None and expected is not None and self.index.samples != expected:
            self.close()
            raise _stats_lie(url, str(self.index.samples), expected)
        # header walk state (used when there is no usable index)
        self.tar: tarfile.TarFile | None = None
        self.samples: list[tuple[str, dict[str, tuple[int, int]], int | None]] = []
        self._key: str | None = None
        self._members: dict[str, tuple[int, int]] = {}
        self.done = False

    def _load_index(self) -> ShardIndex | None:
        path = index_path(self.url)
        try:
            index = ShardIndex(path, self.size, self.io)
        except FileNotFoundError:
            self.note(self.url, MISSING_INDEX, "")
            return None
        except (OSError, IndexMismatch) as err:
            self.note(self.url, BAD_INDEX, str(err))
            return None
        self.io.opens += 1
        return index

    # ------------------------------------------------------------------ through the index
    def _read_indexed(self, index: int) -> RawSample:
        group, caption = self.index.locate(index)
        key, members = self.index.group(group)
        first = min(offset for _, offset, _ in members) - TAR_BLOCK  # the first member's header
        end = max(offset + size for _, offset, size in members)
        span = os.pread(self.fd, end - first, first)
        self.io.read(len(span))
        if len(span) != end - first:
            raise IndexMismatch(f"the tar ends before member {key}'s end at {end}")
        raw: RawSample = {"__key__": key, "__url__": self.url, "__index__": index}
        for ext, offset, size in members:
            at = offset - first
            if not header_names(span[at - TAR_BLOCK:at], f"{key}.{ext}"):
                raise IndexMismatch(f"no tar header names {key}.{ext} before offset {offset}")
            raw[ext] = span[at:at + size]
        return caption_sample(raw, caption) if caption is not None else raw

    # ------------------------------------------------------------------ by walking the headers
    def _fail(self, reason: str, err: Exception) -> None:
        self.done = True
        if len(self.samples) >= (self.expected or 0) > 0:
            return  # a cut past every sample the order uses: the sizing that counted them saw it
        self.skips[reason] += 1
        logger.warning("skipping rest of shard %s after %d samples (%s): %s", self.url,
                       len(self.samples), reason, err)

    def _advance(self) -> None:
        """Read one more member header (or the end of the archive)."""
        try:
            if self.tar is None:  # opened on the first walk: an indexed shard never needs it
                self.tar = tarfile.open(fileobj=_CountingFile(self.file, self.io), mode="r:")
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
            if self.expected is not None and len(self.samples) != self.expected:
                raise _stats_lie(self.url, str(len(self.samples)), self.expected)
            return
        if not member.isfile():
            return
        key, ext = split_member_name(member.name)
        if key != self._key:
            self._close_sample()
            self._key = key
        self._members[ext] = (member.offset_data, member.size)

    def _close_sample(self) -> None:
        if self._key is None:
            return
        members = self._members

        def read_json() -> bytes:
            offset, size = members["json"]
            data = os.pread(self.fd, size, offset)
            self.io.read(len(data))
            return data

        captions = group_captions(members, read_json)
        if captions:
            self.samples.extend((self._key, members, j) for j in range(captions))
        else:
            self.samples.append((self._key, members, None))
        self._key, self._members = None, {}
        if self.expected is not None and len(self.samples) > self.expected:
            raise _stats_lie(self.url, f"more than {self.expected}", self.expected)

    def _read_walked(self, index: int) -> RawSample | None:
        while len(self.samples) <= index and not self.done:
            self._advance()
        if self.expected is not None and len(self.samples) == self.expected:
            # the last sample the stats promise: walk on until the end, or until one more whole
            # group shows the stats short (a group cut by truncation is not one)
            while not self.done:
                self._advance()
        if index >= len(self.samples):
            return None
        key, members, caption = self.samples[index]
        raw: RawSample = {"__key__": key, "__url__": self.url, "__index__": index}
        for ext, (offset, size) in members.items():
            data = os.pread(self.fd, size, offset)
            self.io.read(len(data))
            if len(data) != size:  # the file was cut after its headers were read
                self.skips[TRUNCATED_TAR] += 1
                return None
            raw[ext] = data
        return caption_sample(raw, caption) if caption is not None else raw

    def read(self, index: int) -> RawSample | None:
        if self.index is not None:
            if index >= self.index.samples:
                return None
            try:
                return self._read_indexed(index)
            except IndexMismatch as err:
                self.note(self.url, BAD_INDEX, str(err))
                self.index.close()
                self.index = None
        return self._read_walked(index)

    def close(self) -> None:
        if self.index is not None:
            self.index.close()
        self.file.close()


class _PipeShard:
    """A `pipe:` shard streamed once into memory (it cannot seek)."""

    def __init__(self, url: str, skips: Counter, expected: int | None = None):
        found: Counter = Counter()
        self.samples = list(iter_raw_samples(url, skips=found))
        skips.update(found)
        if not found and expected is not None and len(self.samples) != expected:
            raise _stats_lie(url, str(len(self.samples)), expected)

    def read(self, index: int) -> RawSample | None:
        return dict(self.samples[index]) if index < len(self.samples) else None

    def close(self) -> None:
        self.samples = []


class ShardReader:
    """Samples by (url, index); keeps the most recently used shards open. Not thread-safe: one
    reader per DataLoader worker. `sizes`: url -> samples the order assumes (checked on read)."""

    def __init__(self, skips: Counter, max_open: int = 16, max_open_pipes: int = 2,
                 sizes: dict[str, int] | None = None):
        self.skips, self.max_open, self.max_open_pipes = skips, max_open, max_open_pipes
        self.sizes = sizes or {}
        self.io = ReadCost()
        self._open: OrderedDict[str, _LocalShard | _PipeShard] = OrderedDict()
        self._noted: set[tuple[str, str]] = set()

    def read(self, url: str, index: int) -> RawSample | None:
        shard = self._open.get(url)
        if shard is None:
            shard = self._open_shard(url)
        else:
            self._open.move_to_end(url)
        return shard.read(index)

    def _note(self, url: str, reason: str, detail: str) -> None:
        """Count an index event once per shard (not per open: the LRU may reopen it)."""
        if (url, reason) in self._noted:
            return
        self._noted.add((url, reason))
        self.skips[reason] += 1
        if reason == BAD_INDEX:
            logger.warning("shard %s: ignoring its member index %s (%s); reading it by its tar "
                           "headers", url, index_path(url), detail)

    def _open_shard(self, url: str) -> _LocalShard | _PipeShard:
        pipe = is_pipe(url)
        limit = self.max_open_pipes if pipe else self.max_open
        same_kind = [u for u in self._open if is_pipe(u) == pipe]
        while len(same_kind) >= limit:
            self._open.pop(same_kind.pop(0)).close()
        expected = self.sizes.get(url)
        try:
            shard = (_PipeShard(url, self.skips, expected) if pipe
                     else _LocalShard(url, self.skips, expected, self.io, self._note))
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
