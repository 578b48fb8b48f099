"""Writing shards: deterministic tars (fixed mtime/owner, members in given order) + stats.json.

`stats.json` in the output directory maps shard file names to sample counts:
  {"shards": {"train-000000.tar": 1000, ...}, "total": N}
Writers with different prefixes may share a directory (synthetic train/val); each merges its own
shards into the file. The loader reads sizes from it instead of counting tar members.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from types import TracebackType

STATS_FILE = "stats.json"


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Append one regular file with reproducible metadata."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def update_stats(out_dir: str, shard_counts: dict[str, int]) -> dict:
    """Merge shard counts into out_dir/stats.json (written atomically) and return its content."""
    path = os.path.join(out_dir, STATS_FILE)
    shards: dict[str, int] = {}
    if os.path.isfile(path):
        with open(path) as f:
            shards = json.load(f).get("shards", {})
    shards.update(shard_counts)
    stats = {"shards": dict(sorted(shards.items())), "total": sum(shards.values())}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(stats, f, indent=1)
    os.replace(tmp, path)
    return stats


class ShardWriter:
    """Writes `out_dir/{prefix}{NNNNNN}.tar`, `samples_per_shard` samples each, then stats.json."""

    def __init__(self, out_dir: str, samples_per_shard: int = 10_000, prefix: str = ""):
        if samples_per_shard <= 0:
            raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.samples_per_shard, self.prefix = out_dir, samples_per_shard, prefix
        self.counts: dict[str, int] = {}
        self._tar: tarfile.TarFile | None = None
        self._name = ""
        self._keys: set[str] = set()

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        """One sample: `fields` maps extension ("jpg", "txt", "json") to bytes."""
        if "." in key or "/" in key or not key:
            raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/'")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        self._keys.add(key)
        if self._tar is None or self.counts[self._name] >= self.samples_per_shard:
            self.start_shard()
        for ext, data in fields.items():
            add_member(self._tar, f"{key}.{ext}", data)
        self.counts[self._name] += 1

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

    def close(self) -> dict:
        """Finish the last shard and write stats.json; returns the stats."""
        self._close_tar()
        return update_stats(self.out_dir, self.counts)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self._close_tar()
