"""Shard URLs and raw samples: brace expansion, missing-shard checks, sizes, and tar reading.

A shard is a tar in the img2dataset/webdataset layout: consecutive members `KEY.EXT` that share a
KEY form one member group (`KEY.jpg` + `KEY.txt` and/or `KEY.json`). A group serves one sample, or
one sample per caption when it stores one image for several captions: a group WITHOUT a txt member
whose json holds a list under "captions" (`group_captions`; COCO: 1 image, 5 samples). Sample j of
such a group has `__key__` "KEY#j", `__group__` "KEY" and `__caption__` j; the decoders take
caption j of the list. A URL is a local path or a `pipe:COMMAND` whose stdout is the tar.

A raw sample is a dict `{"__key__": str, "__url__": str, "__index__": int, EXT: bytes | FileSpan}`
(`__index__` counts samples, not groups). `iter_raw_samples` reads a shard in one sequential pass
(bytes, or for header-only passes over local files a `FileSpan` (offset, size) that `read_field`
reads later by opening the file again: tools only). Training and evaluation read samples by index
with one handle per shard and the shard's member index: reader.py, index.py.

Sizes (samples per shard) come from stats files (stats.py); a shard without one is counted from its
index header, else by walking its tar, on rank 0 only, which shares the result with the other ranks.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import tarfile
from collections import Counter
from dataclasses import dataclass
from typing import IO, Callable, Iterable, Iterator, TypeVar

import braceexpand

from megavl.data.index import MemberGroup, index_path, index_samples
from megavl.data.skips import TRUNCATED_TAR, UNREADABLE_SHARD
from megavl.data.stats import record_counted, stats_size
from megavl.errors import DataError

logger = logging.getLogger(__name__)

PIPE_PREFIX = "pipe:"
TAR_END_BYTES = 1024  # a complete tar ends with two zero 512-byte blocks
CAPTIONS_KEY = "captions"  # a json list of captions: one stored image, one sample per caption
T = TypeVar("T")

@dataclass(frozen=True)
class FileSpan:
    """Where a member's bytes lie in a local shard: read lazily by `read_field`."""

    path: str
    offset: int
    size: int


RawSample = dict  # see module docstring


def expand_urls(pattern: str) -> list[str]:
    """All URLs of one source: brace-expanded (`data/{000000..000009}.tar`); `::` also separates."""
    urls: list[str] = []
    for part in pattern.split("::"):
        part = part.strip()
        if part:
            urls.extend(braceexpand.braceexpand(part))
    if not urls:
        raise ValueError(f"shard pattern {pattern!r} expands to no URLs")
    return urls


def is_pipe(url: str) -> bool:
    return url.startswith(PIPE_PREFIX)


def check_shards_exist(urls: list[str], key: str = "shards") -> None:
    """Fail at start, in one line naming the setting `key` and the missing local shards (pipe: URLs
    cannot be checked up front)."""
    missing = [u for u in urls if not is_pipe(u) and not os.path.isfile(u)]
    if missing:
        shown = ", ".join(missing[:10])
        more = f", ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DataError(f"{key}: {len(missing)} of {len(urls)} shards are missing: {shown}{more}")


def split_member_name(name: str) -> tuple[str, str]:
    """`dir/000123.jpg` -> ("dir/000123", "jpg"); the key ends at the basename's first dot."""
    dirname, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (os.path.join(dirname, stem) if dirname else stem), ext.lower()


def read_field(sample: RawSample, ext: str) -> bytes:
    """The bytes of one member of a raw sample, reading a local span if needed."""
    value = sample[ext]
    if isinstance(value, FileSpan):
        with open(value.path, "rb") as f:
            f.seek(value.offset)
            data = f.read(value.size)
        if len(data) != value.size:
            raise EOFError(f"{value.path}: member {sample['__key__']}.{ext} is truncated")
        return data
    return value


class _PipeFile:
    """A `pipe:` command's stdout as a context manager that kills the command on early exit."""

    def __init__(self, url: str):
        self.command = url[len(PIPE_PREFIX):]
        self.proc = subprocess.Popen(self.command, shell=True, stdout=subprocess.PIPE)

    def __enter__(self) -> IO[bytes]:
        return self.proc.stdout

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.stdout.close()
        self.proc.wait()


def group_captions(exts: Iterable[str], read_json: Callable[[], bytes]) -> int:
    """How many captions a member group stores (0: a plain group, one sample): the length of its
    json's "captions" list when it has a json member and no txt one. `read_json` is called only
    then, so walking a plain img2dataset shard reads no member bytes."""
    exts = set(exts)
    if "txt" in exts or "json" not in exts:
        return 0
    try:
        meta = json.loads(read_json())
    except (ValueError, UnicodeDecodeError, OSError, EOFError):
        return 0  # a bad json is one sample that decoding skips (bad_json)
    captions = meta.get(CAPTIONS_KEY) if isinstance(meta, dict) else None
    return len(captions) if isinstance(captions, list) else 0


def caption_sample(raw: RawSample, caption: int) -> RawSample:
    """Sample `caption` of a multi-caption group's raw sample (see the module docstring)."""
    key = raw.get("__group__", raw["__key__"])
    return {**raw, "__key__": f"{key}#{caption}", "__group__": key, "__caption__": caption}


def _span_bytes(value: bytes | FileSpan, fd: int | None) -> bytes:
    if not isinstance(value, FileSpan):
        return value
    data = os.pread(fd, value.size, value.offset)
    if len(data) != value.size:
        raise EOFError(f"member at {value.offset} is cut")
    return data


def _iter_groups(url: str, skips: Counter) -> Iterator[tuple[str, dict, int | None]]:
    """(KEY, {ext: bytes | FileSpan}, fd of the open file or None for a pipe) per member group,
    in file order, in ONE open of the shard; truncation ends the iteration, counted in `skips`."""
    pipe = is_pipe(url)
    key, members = None, {}
    try:
        with (_PipeFile(url) if pipe else open(url, "rb")) as fileobj:
            fd = None if pipe else fileobj.fileno()
            tf = tarfile.open(fileobj=fileobj, mode="r|*" if pipe else "r:")
            for member in tf:
                if not member.isfile():
                    continue
                member_key, ext = split_member_name(member.name)
                if member_key != key:
                    if key is not None:
                        yield key, members, fd
                    key, members = member_key, {}
                if pipe:
                    data = tf.extractfile(member).read()
                    if len(data) != member.size:
                        raise tarfile.ReadError("unexpected end of data")
                    members[ext] = data
                else:
                    members[ext] = FileSpan(url, member.offset_data, member.size)
            if not pipe and os.fstat(fd).st_size - tf.offset < TAR_END_BYTES:
                # tarfile ends quietly when a cut falls on a header boundary; a complete tar
                # always ends with two zero blocks, so their absence means truncation.
                raise tarfile.ReadError("no end-of-archive blocks")
            if key is not None:
                yield key, members, fd
    except (tarfile.TarError, EOFError) as err:
        reason = TRUNCATED_TAR if key is not None else UNREADABLE_SHARD
        skips[reason] += 1
        logger.warning("skipping rest of shard %s (%s): %s", url, reason, err)
    except OSError as err:
        skips[UNREADABLE_SHARD] += 1
        logger.warning("cannot read shard %s: %s", url, err)


def iter_raw_samples(url: str, start: int = 0, stop: int | None = None,
                     skips: Counter | None = None, read_data: bool = False) -> Iterator[RawSample]:
    """Raw samples number `start <= i < stop` of one shard, in file order, in ONE open of the file.

    `read_data`: member bytes are read on the way; else a local shard gives `FileSpan`s (headers
    only: counting, tools) and a pipe always gives bytes. A multi-caption group gives one raw
    sample per caption (its json is read to count them).

    A truncated or unreadable shard ends early: the partial sample is dropped and the event is
    counted in `skips` as TRUNCATED_TAR / UNREADABLE_SHARD (and logged), never raised.
    """
    skips = skips if skips is not None else Counter()
    index = 0
    for key, fields, fd in _iter_groups(url, skips):
        if stop is not None and index >= stop:
            return
        captions = group_captions(fields, lambda: _span_bytes(fields["json"], fd))
        count = max(1, captions)
        if index + count > start:
            if read_data:
                try:
                    fields = {ext: _span_bytes(value, fd) for ext, value in fields.items()}
                except (EOFError, OSError) as err:
                    skips[TRUNCATED_TAR] += 1
                    logger.warning("skipping rest of shard %s (%s): %s", url, TRUNCATED_TAR, err)
                    return
            raw = {"__key__": key, "__url__": url, **fields}
            for j in range(max(0, start - index), count):
                if stop is not None and index + j >= stop:
                    return
                sample = {**raw, "__index__": index + j}
                yield caption_sample(sample, j) if captions else sample
        index += count


def count_samples(url: str, skips: Counter | None = None) -> int:
    """Samples in a shard: from its member index's header when it has one that fits the tar (one
    short read), else by walking its headers (a pipe: URL is streamed through); truncation found
    on the way is counted in `skips`."""
    if not is_pipe(url):
        try:
            indexed = index_samples(url, os.path.getsize(url))
        except OSError:
            indexed = None
        if indexed is not None:
            return indexed
    return sum(1 for _ in iter_raw_samples(url, skips=skips))


def _size_shards(urls: list[str]) -> tuple[list[int], Counter]:
    """(samples per shard, skips found while counting): stats files first, then counting; complete
    counted shards are recorded in a stats file where that is allowed (stats.record_counted)."""
    cache: dict[str, dict] = {}
    sizes: list[int] = []
    counts: Counter = Counter()
    counted: dict[str, tuple[int, int]] = {}
    walked = 0
    for url in urls:
        size = None if is_pipe(url) else stats_size(url, cache)
        if size is None:
            found: Counter = Counter()
            size = count_samples(url, found)
            walked += 1
            if not found and not is_pipe(url):
                counted[url] = (size, os.path.getsize(url))
            counts.update(found)
        sizes.append(size)
    if walked:
        logger.info("counted the samples of %d/%d shards without a stats file", walked, len(urls))
        record_counted(counted)
    _log_missing_indexes(urls)
    return sizes, counts


def _log_missing_indexes(urls: list[str]) -> None:
    missing = [u for u in urls if not is_pipe(u) and not os.path.isfile(index_path(u))]
    if missing:
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing) - 5} more)" if len(missing) > 5 else "")
        logger.warning("%d of %d shards have no member index (%s): their readers walk the tar "
                       "headers (counted as data/skipped/missing_index); `megavl-make-shards "
                       "--index-only PATTERN` writes the indexes", len(missing), len(urls), shown)



def _group_of(world_size: int):
    """The default process group when it spans exactly the caller's `world_size` ranks, else None
    (single-process use, or ranks simulated in one process by tests and tools)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() == world_size:
        return dist
    return None


def on_rank0(compute: Callable[[], T], world_size: int) -> tuple[T, bool]:
    """(compute()'s result, whether this process computed it). In a process group of `world_size`
    ranks, only rank 0 computes and broadcasts the result (or its exception, raised on every rank
    alike); every rank must call this at the same point. Without such a group: computed here."""
    dist = _group_of(world_size)
    if dist is None:
        return compute(), True
    payload: list = [None]
    if dist.get_rank() == 0:
        try:
            payload = [("ok", compute())]
        except Exception as err:  # noqa: BLE001 - every rank raises it, none waits forever
            payload = [("error", err)]
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        raise value
    return value, dist.get_rank() == 0


def shard_sizes(urls: list[str], skips: Counter | None = None, *, world_size: int = 1) -> list[int]:
    """Samples per shard: from stats files when present, else counted (index header, or a header
    walk: logged, slower; a truncated shard then counts its readable samples and the truncation
    goes into `skips`). Called on every rank of a process group of `world_size` ranks, rank 0 alone
    reads and counts, and only its `skips` get the counts (the trainer logs the sum over ranks)."""
    (sizes, counts), computed_here = on_rank0(lambda: _size_shards(urls), world_size)
    if skips is not None and computed_here:
        skips.update(counts)
    return sizes


def scan_groups(url: str, skips: Counter | None = None) -> list[MemberGroup] | None:
    """Every member group of a local shard with its members' places and caption count: what its
    member index holds (megavl-make-shards --index-only). None when the tar is cut or unreadable
    (counted in `skips`): an index must describe a whole tar."""
    found: Counter = Counter()
    groups = []
    for key, fields, fd in _iter_groups(url, found):
        members = [(ext, span.offset, span.size) for ext, span in fields.items()]
        captions = group_captions(fields, lambda: _span_bytes(fields["json"], fd))
        groups.append(MemberGroup(key, members, captions))
    if skips is not None:
        skips.update(found)
    return None if found else groups
