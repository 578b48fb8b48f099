"""The member index of a shard: where each sample's members lie in its tar, so a reader jumps to
sample i with one read instead of walking every tar header before it (webdataset's `wids` and
DALI's `.idx` files serve the same purpose).

File: `SHARD.tar.idx` next to `SHARD.tar`, written by ShardWriter (megavl-make-shards, the
synthetic tools) and by `megavl-make-shards --index-only` for existing shards. Plain JSON lines:

  line 1      {"format": "megavl-shard-index", "version": 1, "tar_bytes": B, "samples": S,
               "groups": G, "record_bytes": L[, "captions": [c_0, ..., c_{G-1}]]}
  line 2 + g  ["KEY", [["jpg", data_offset, size], ["txt", ...], ...]]   one line per member group,
              space-padded to L bytes with its newline, so line g is read with ONE pread of L bytes
              at (end of line 1) + g * L: a worker that needs 20 samples of a 10,000-sample shard
              reads 20 records, not the whole index.

A member group is the members sharing a KEY. It serves one sample, or, when it holds a list of
captions (shards.group_captions: one stored image, several captions), one sample per caption:
`captions` then gives each group's caption count c_g (0 = a plain one-sample group) and sample i
maps to (group, caption j) by the running sum of max(1, c_g). Without `captions` sample i is group i.

An index is trusted only as far as it agrees with its tar and with itself: `tar_bytes` must equal
the tar's size, the file must hold exactly G records of L bytes, and every member must lie inside
the tar behind a tar header that names it (the reader checks the headers it reads anyway).
"""
from __future__ import annotations

import bisect
import itertools
import json
import os
from dataclasses import dataclass

INDEX_SUFFIX = ".idx"
INDEX_FORMAT = "megavl-shard-index"
INDEX_VERSION = 1
TAR_BLOCK = 512
_HEADER_READ = 4096  # first read of the header line; a long caption list takes more


@dataclass
class ReadCost:
    """What reading shards has cost so far: file opens, read calls and bytes read."""

    opens: int = 0
    reads: int = 0
    bytes: int = 0

    def read(self, size: int) -> None:
        self.reads += 1
        self.bytes += size


class IndexMismatch(Exception):
    """The index does not describe its tar (stale, from another file, cut, or not an index)."""


@dataclass
class MemberGroup:
    """One KEY's members: (extension, data offset, size) in tar order; `captions`: c_g above."""

    key: str
    members: list[tuple[str, int, int]]
    captions: int = 0

    @property
    def samples(self) -> int:
        return max(1, self.captions)


def index_path(url: str) -> str:
    return url + INDEX_SUFFIX


def dump_index(groups: list[MemberGroup], tar_bytes: int) -> bytes:
    records = [json.dumps([g.key, [list(m) for m in g.members]], separators=(",", ":")).encode()
               for g in groups]
    width = max((len(r) for r in records), default=0) + 1
    header = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "tar_bytes": tar_bytes,
              "samples": sum(g.samples for g in groups), "groups": len(groups),
              "record_bytes": width}
    if any(g.captions for g in groups):
        header["captions"] = [g.captions for g in groups]
    return b"".join([json.dumps(header).encode() + b"\n"]
                    + [r.ljust(width - 1) + b"\n" for r in records])


def write_index(url: str, groups: list[MemberGroup], tar_bytes: int) -> None:
    """Write (or replace: the index belongs to the tar written with it) `url`'s index atomically."""
    path = index_path(url)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(dump_index(groups, tar_bytes))
    os.replace(tmp, path)


def _read_header(fd: int, io: ReadCost) -> tuple[dict, int]:
    """(header, its length with the newline), read from the start of an index file."""
    size = _HEADER_READ
    while True:
        data = os.pread(fd, size, 0)
        io.read(len(data))
        end = data.find(b"\n")
        if end >= 0 or len(data) < size:
            break
        size *= 16
    try:
        header = json.loads(data[:end if end >= 0 else len(data)])
    except ValueError:
        raise IndexMismatch("its first line is not JSON") from None
    if not isinstance(header, dict) or header.get("format") != INDEX_FORMAT:
        raise IndexMismatch("not a megavl shard index")
    if header.get("version") != INDEX_VERSION:
        raise IndexMismatch(f"index version {header.get('version')!r}, this megavl reads {INDEX_VERSION}")
    return header, end + 1


class ShardIndex:
    """An open index, its header checked against the tar's size and the file's own length; its
    records read one at a time. Raises IndexMismatch; `close()` releases its file."""

    def __init__(self, path: str, tar_bytes: int, io: ReadCost):
        self.fd = os.open(path, os.O_RDONLY)
        self.io = io
        try:
            self._check(tar_bytes)
        except Exception:
            self.close()
            raise

    def _check(self, tar_bytes: int) -> None:
        header, self.first = _read_header(self.fd, self.io)
        if header.get("tar_bytes") != tar_bytes:
            raise IndexMismatch(f"it describes a tar of {header.get('tar_bytes')} bytes, the tar "
                                f"has {tar_bytes}")
        self.tar_bytes = tar_bytes
        self.groups, self.width = header.get("groups"), header.get("record_bytes")
        self.samples, self.captions = header.get("samples"), header.get("captions")
        if not (isinstance(self.groups, int) and isinstance(self.width, int) and self.width > 0):
            raise IndexMismatch("its header lacks the group count or record size")
        if os.fstat(self.fd).st_size != self.first + self.groups * self.width:
            raise IndexMismatch(f"the file does not hold {self.groups} records of {self.width} bytes")
        if self.captions is not None:
            if not (isinstance(self.captions, list) and len(self.captions) == self.groups
                    and all(isinstance(c, int) and c >= 0 for c in self.captions)):
                raise IndexMismatch("its caption counts do not match its groups")
            self.starts = [0, *itertools.accumulate(max(1, c) for c in self.captions)]
            total = self.starts[-1]
        else:
            total = self.groups
        if self.samples != total:
            raise IndexMismatch(f"its header says {self.samples!r} samples, its groups hold {total}")

    def locate(self, index: int) -> tuple[int, int | None]:
        """(group, caption j or None for a plain group) of sample `index` (< self.samples)."""
        if self.captions is None:
            return index, None
        group = bisect.bisect_right(self.starts, index) - 1
        return group, (index - self.starts[group] if self.captions[group] else None)

    def group(self, g: int) -> tuple[str, list[tuple[str, int, int]]]:
        """(KEY, [(ext, data offset, size), ...]) of group g, checked to lie inside the tar."""
        record = os.pread(self.fd, self.width, self.first + g * self.width)
        self.io.read(len(record))
        try:
            key, members = json.loads(record)
            members = [(str(ext), int(offset), int(size)) for ext, offset, size in members]
        except (ValueError, TypeError):
            raise IndexMismatch(f"record {g} is not [KEY, [[ext, offset, size], ...]]") from None
        if not members:
            raise IndexMismatch(f"record {g} lists no members")
        for ext, offset, size in members:
            if offset < TAR_BLOCK or size < 0 or offset + size > self.tar_bytes:
                raise IndexMismatch(f"member {key}.{ext} at {offset} (+{size} bytes) lies outside "
                                    f"the tar's {self.tar_bytes} bytes")
        return str(key), members

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def index_samples(url: str, tar_bytes: int) -> int | None:
    """The sample count in `url`'s index header (one short read: what sizing a shard needs), or
    None without a usable index (missing, another version, or made for another tar size)."""
    try:
        fd = os.open(index_path(url), os.O_RDONLY)
    except OSError:
        return None
    try:
        header, _ = _read_header(fd, ReadCost())
    except (IndexMismatch, OSError):
        return None
    finally:
        os.close(fd)
    if header.get("tar_bytes") != tar_bytes or not isinstance(header.get("samples"), int):
        return None
    return header["samples"]


def header_names(header: bytes, name: str) -> bool:
    """Whether a 512-byte ustar header names member `name` (long names, which need an extended
    header, are not checked)."""
    if header[257:262] != b"ustar":
        return False
    encoded = name.encode()
    if len(encoded) > 100:
        return True
    stored = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0]
    return (prefix + b"/" + stored if prefix else stored) == encoded
