"""Writing shards: deterministic tars (fixed mtime/owner, members in given order), each with its
member index (`SHARD.tar.idx`, index.py), and the folder's stats.json (stats.py).

Writers with different prefixes may share a folder (synthetic train/val); each merges its own
shards into stats.json. The loader reads sizes from it instead of counting tar members, and reads
samples through the index instead of walking tar headers.
"""
from __future__ import annotations

import io
import os
import tarfile
from types import TracebackType

from megavl.data.index import MemberGroup, write_index
from megavl.data.shards import group_captions
from megavl.data.stats import STATS_FILE, update_stats

__all__ = ["STATS_FILE", "ShardWriter", "add_member", "update_stats"]


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append one regular file with reproducible metadata; returns its data's offset."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
    return tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


class ShardWriter:
    """Writes `out_dir/{prefix}{NNNNNN}.tar` (+ `.tar.idx`), `samples_per_shard` samples each (a
    multi-caption group counts one per caption and is never split: a shard may end a few over),
    then stats.json."""

    def __init__(self, out_dir: str, samples_per_shard: int = 10_000, prefix: str = ""):
        if samples_per_shard <= 0:
            raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.samples_per_shard, self.prefix = out_dir, samples_per_shard, prefix
        self.counts: dict[str, int] = {}
        self.bytes: dict[str, int] = {}
        self._groups: list[MemberGroup] = []
        self._tar: tarfile.TarFile | None = None
        self._name = ""
        self._keys: set[str] = set()

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        """One member group: `fields` maps extension ("jpg", "txt", "json") to bytes. A group
        without txt whose json holds a "captions" list is one sample per caption (shards.py)."""
        if "." in key or "/" in key or not key:
            raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/'")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        self._keys.add(key)
        if self._tar is None or self.counts[self._name] >= self.samples_per_shard:
            self.start_shard()
        members = [(ext, add_member(self._tar, f"{key}.{ext}", data), len(data))
                   for ext, data in fields.items()]
        group = MemberGroup(key, members, group_captions(fields, lambda: fields["json"]))
        self._groups.append(group)
        self.counts[self._name] += group.samples

    def start_shard(self) -> None:
        """Close the current shard (if any) and open the next one."""
        self._close_tar()
        self._name = f"{self.prefix}{len(self.counts):06d}.tar"
        self.counts[self._name] = 0
        self._tar = tarfile.open(os.path.join(self.out_dir, self._name), "w")

    def _close_tar(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            path = os.path.join(self.out_dir, self._name)
            self.bytes[self._name] = os.path.getsize(path)
            write_index(path, self._groups, self.bytes[self._name])
            self._groups = []

    def close(self) -> dict:
        """Finish the last shard and write stats.json; returns the stats."""
        self._close_tar()
        return update_stats(self.out_dir, self.counts, self.bytes)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self._close_tar()
