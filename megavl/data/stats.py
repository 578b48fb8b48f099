"""Stats files: samples (and bytes) per shard, so that sizing a run never opens its tars.

`DIR/stats.json` (version 2) maps shard file names to sample counts and tar sizes:
  {"version": 2, "written_by": WHO, "shards": {"000000.tar": 10000, ...},
   "bytes": {"000000.tar": 412345600, ...}, "total": N}
A shard's count is its number of SAMPLES: one per caption for a multi-caption group (index.py).
img2dataset's per-shard `NNNNN_stats.json` ("successes") is read too. Version 1 files (no "bytes")
are read as before.

Who writes: ShardWriter (megavl-make-shards, the synthetic tools) merges its shards into its
output folder's file. A run that had to count shards (shards.shard_sizes) records them only in a
stats.json it creates itself or created before (`written_by` = COUNTED_BY): it never changes a file
it did not write, and a missing or read-only folder is left alone. Every write is atomic.
"""
from __future__ import annotations

import json
import logging
import os

logger = logging.getLogger(__name__)

STATS_FILE = "stats.json"
STATS_VERSION = 2
COUNTED_BY = "megavl shard counting"
WRITER_BY = "megavl ShardWriter"


def _load(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def stats_size(url: str, cache: dict[str, dict]) -> int | None:
    """Samples of a local shard from its folder's stats.json or img2dataset's NNNNN_stats.json;
    None when neither lists it. `cache` keeps each folder's stats.json across calls."""
    dirname, base = os.path.split(url)
    path = os.path.join(dirname, STATS_FILE)
    if path not in cache:
        cache[path] = _load(path)
    shards = cache[path].get("shards")
    if isinstance(shards, dict) and isinstance(shards.get(base), int):
        return shards[base]
    per_shard = os.path.join(dirname, base.split(".")[0] + "_stats.json")
    if os.path.isfile(per_shard):
        successes = _load(per_shard).get("successes")
        if isinstance(successes, int):
            return successes
    return None


def _write_atomic(path: str, stats: dict, replace: bool) -> bool:
    """Write `stats` to `path` through a temporary file; `replace=False` creates it only if it does
    not exist (a hard link never clobbers). False when the folder refuses or another writer won."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(stats, f, indent=1)
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    except OSError:
        if os.path.exists(tmp):
            os.unlink(tmp)
        return False


def _stats_doc(shards: dict[str, int], tar_bytes: dict[str, int], written_by: str) -> dict:
    return {"version": STATS_VERSION, "written_by": written_by, "shards": dict(sorted(shards.items())),
            "bytes": dict(sorted(tar_bytes.items())), "total": sum(shards.values())}


def update_stats(out_dir: str, shard_counts: dict[str, int],
                 shard_bytes: dict[str, int] | None = None) -> dict:
    """Merge a writer's shards (name -> samples, name -> tar bytes) into out_dir/stats.json
    (written atomically) and return its content."""
    path = os.path.join(out_dir, STATS_FILE)
    old = _load(path)
    shards = {**old.get("shards", {}), **shard_counts}
    sizes = {**old.get("bytes", {}), **(shard_bytes or {})}
    stats = _stats_doc(shards, {k: v for k, v in sizes.items() if k in shards}, WRITER_BY)
    if not _write_atomic(path, stats, replace=True):
        raise OSError(f"cannot write {path}")
    return stats


def record_counted(counted: dict[str, tuple[int, int]]) -> None:
    """Record counted shards (url -> (samples, tar bytes)) in their folders' stats.json where that
    file is absent or was written by counting before; anything else is left as it is (logged)."""
    by_dir: dict[str, dict[str, tuple[int, int]]] = {}
    for url, value in counted.items():
        dirname, base = os.path.split(url)
        by_dir.setdefault(dirname, {})[base] = value
    for dirname, entries in by_dir.items():
        path = os.path.join(dirname, STATS_FILE)
        old = _load(path) if os.path.exists(path) else None
        if old is not None and old.get("written_by") != COUNTED_BY:
            logger.info("not recording %d counted shard sizes in %s: megavl did not write it (a "
                        "run counts these shards at every start; megavl-make-shards --index-only "
                        "writes their stats)", len(entries), path)
            continue
        shards = {**(old or {}).get("shards", {}), **{b: n for b, (n, _) in entries.items()}}
        sizes = {**(old or {}).get("bytes", {}), **{b: s for b, (_, s) in entries.items()}}
        if _write_atomic(path, _stats_doc(shards, sizes, COUNTED_BY), replace=old is not None):
            logger.info("recorded the sizes of %d counted shards in %s", len(entries), path)
        else:
            logger.info("cannot record counted shard sizes in %s (read-only, or written meanwhile)",
                        path)
