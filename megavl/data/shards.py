"""Shard URLs and raw samples: brace expansion, missing-shard checks, sizes, and tar reading.

A shard is a tar in the img2dataset/webdataset layout: consecutive members `KEY.EXT` that share a
KEY form one raw sample (`KEY.jpg` + `KEY.txt` and/or `KEY.json`). A URL is a local path or a
`pipe:COMMAND` whose stdout is the tar.

A raw sample is a dict `{"__key__": str, "__url__": str, "__index__": int, EXT: bytes | FileSpan}`.
`iter_raw_samples` reads a shard in one sequential pass (bytes, or for header-only passes over local
files a `FileSpan` (offset, size) that `read_field` reads later by opening the file again: tools
only). Training reads samples by index with one handle per shard: reader.py.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import tarfile
from collections import Counter
from dataclasses import dataclass
from typing import IO, Iterator

import braceexpand

from megavl.data.skips import TRUNCATED_TAR, UNREADABLE_SHARD
from megavl.errors import DataError

logger = logging.getLogger(__name__)

PIPE_PREFIX = "pipe:"
TAR_END_BYTES = 1024  # a complete tar ends with two zero 512-byte blocks


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


def iter_raw_samples(url: str, start: int = 0, stop: int | None = None,
                     skips: Counter | None = None, read_data: bool = False) -> Iterator[RawSample]:
    """Raw samples number `start <= i < stop` of one shard, in file order, in ONE open of the file.

    `read_data`: member bytes are read on the way (one sequential pass: the eval stream); else a
    local shard gives `FileSpan`s (headers only: counting, tools) and a pipe always gives bytes.

    A truncated or unreadable shard ends early: the partial sample is dropped and the event is
    counted in `skips` as TRUNCATED_TAR / UNREADABLE_SHARD (and logged), never raised.
    """
    skips = skips if skips is not None else Counter()
    pipe = is_pipe(url)
    index, key, current = -1, None, None
    try:
        with (_PipeFile(url) if pipe else open(url, "rb")) as fileobj:
            tf = tarfile.open(fileobj=fileobj, mode="r|*" if pipe else "r:")
            for member in tf:
                if not member.isfile():
                    continue
                member_key, ext = split_member_name(member.name)
                if member_key != key:
                    if current is not None:
                        yield current
                    index, key = index + 1, member_key
                    if stop is not None and index >= stop:
                        return
                    current = ({"__key__": key, "__url__": url, "__index__": index}
                               if index >= start else None)
                if current is None:
                    continue
                if pipe or read_data:
                    data = tf.extractfile(member).read()
                    if len(data) != member.size:
                        raise tarfile.ReadError("unexpected end of data")
                    current[ext] = data
                else:
                    current[ext] = FileSpan(url, member.offset_data, member.size)
            if not pipe and os.fstat(fileobj.fileno()).st_size - tf.offset < TAR_END_BYTES:
                # tarfile ends quietly when a cut falls on a header boundary; a complete tar
                # always ends with two zero blocks, so their absence means truncation.
                raise tarfile.ReadError("no end-of-archive blocks")
        if current is not None:
            yield current
    except (tarfile.TarError, EOFError) as err:
        reason = TRUNCATED_TAR if index >= 0 else UNREADABLE_SHARD
        skips[reason] += 1
        logger.warning("skipping rest of shard %s after %d samples (%s): %s", url, index, reason, err)
    except OSError as err:
        skips[UNREADABLE_SHARD] += 1
        logger.warning("cannot read shard %s: %s", url, err)


def count_samples(url: str, skips: Counter | None = None) -> int:
    """Number of readable samples in a shard, by reading its headers (a pipe: URL is streamed
    through); truncation found on the way is counted in `skips`."""
    return sum(1 for _ in iter_raw_samples(url, skips=skips))


def _stats_for(url: str, cache: dict[str, dict]) -> int | None:
    """Size of a local shard from `stats.json` (ours) or `NNNNN_stats.json` (img2dataset)."""
    if is_pipe(url):
        return None
    dirname, base = os.path.split(url)
    stats_path = os.path.join(dirname, "stats.json")
    if stats_path not in cache:
        try:
            with open(stats_path) as f:
                cache[stats_path] = json.load(f).get("shards", {})
        except (OSError, ValueError):
            cache[stats_path] = {}
    if base in cache[stats_path]:
        return int(cache[stats_path][base])
    per_shard = os.path.join(dirname, base.split(".")[0] + "_stats.json")
    if os.path.isfile(per_shard):
        with open(per_shard) as f:
            successes = json.load(f).get("successes")
        if successes is not None:
            return int(successes)
    return None


def shard_sizes(urls: list[str], skips: Counter | None = None) -> list[int]:
    """Samples per shard: from stats files when present, else counted (logged, slower; a
    truncated shard then counts its readable samples and the truncation goes into `skips`)."""
    cache: dict[str, dict] = {}
    sizes = []
    counted = 0
    for url in urls:
        size = _stats_for(url, cache)
        if size is None:
            size = count_samples(url, skips)
            counted += 1
        sizes.append(size)
    if counted:
        logger.info("counted samples of %d/%d shards without a stats.json", counted, len(urls))
    return sizes
