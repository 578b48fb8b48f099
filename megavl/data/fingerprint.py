"""What a training data state records about the data it ran on, and how a resume compares it.

The global order (sources.py, order.py) is a function of each source's shard LIST (the shards'
places in it), their sample counts, the weights and the quotas; it never reads a shard's path. The
fingerprint therefore names each shard by its path relative to its source's directory (the deepest
directory holding all of the source's shards: `/mnt/a/cc3m/00012.tar` -> `00012.tar`, a source
spread over sub-directories keeps them: `part1/00012.tar`) and records its sample count. Copying the
data to scratch or another mount leaves the fingerprint, and hence the resume, exact.

Sample counts, not byte sizes: the counts are what moves samples, and they come from the stats
files when present (no stat of every shard at start, nothing to stat behind a `pipe:` URL). A shard
rewritten with the same samples (re-encoded, re-indexed) keeps the order; one that gained or lost
samples does not, and is named.

`describe_sources` gives per source {"shards": [[name, samples], ...], "weight", "quota"} (quota
None in resampled mode); `order_digest` hashes it. A state saved before names were relative holds
only an `order_digest` of the absolute URLs (`legacy_order_digest`): it still resumes while the
shards lie where they lay, and its changes cannot be itemised.
"""
from __future__ import annotations

import hashlib
import json
import shlex

from megavl.data.shards import PIPE_PREFIX, is_pipe
from megavl.data.sources import Source

DATA_RESUME_MODES = ("exact", "approx")
_SHOWN = 5  # shard names listed per kind of change


def check_data_resume(mode: str) -> None:
    if mode not in DATA_RESUME_MODES:
        raise ValueError(f"data resume mode {mode!r}: expected one of {DATA_RESUME_MODES}")


def _path_parts(url: str) -> list[str]:
    """A URL's path components; a `pipe:` command is named by its last argument that is not an
    option (`pipe:aws s3 cp s3://b/cc3m/0001.tar -` -> s3:, b, cc3m, 0001.tar)."""
    path = url
    if is_pipe(url):
        command = url[len(PIPE_PREFIX):]
        try:
            args = shlex.split(command)
        except ValueError:
            args = command.split()
        args = [a for a in args if not a.startswith("-")]
        path = args[-1] if args else command
    return [p for p in path.split("/") if p not in ("", ".")]


def shard_names(urls: list[str]) -> list[str]:
    """Each URL relative to the deepest directory that holds all of them."""
    parts = [_path_parts(u) for u in urls]
    common = 0
    dirs = [p[:-1] for p in parts]
    while all(len(d) > common and d[common] == dirs[0][common] for d in dirs):
        common += 1
    return ["/".join(p[common:]) for p in parts]


def describe_sources(sources: list[Source], quotas: list[int]) -> list[dict]:
    """JSON-able fingerprint of what fixes the order, per source (module docstring)."""
    return [{"shards": [[name, int(n)] for name, n in zip(shard_names(s.urls), s.sizes)],
             "weight": float(s.weight), "quota": int(quotas[i]) if quotas else None}
            for i, s in enumerate(sources)]


def order_digest(described: list[dict]) -> str:
    return hashlib.blake2b(json.dumps(described, sort_keys=True).encode(), digest_size=16).hexdigest()


def legacy_order_digest(sources: list[Source], quotas: list[int]) -> str:
    """The digest that states without shard names hold: absolute URLs, sizes, weights, quotas."""
    parts = [(s.urls, s.sizes, s.weight) for s in sources] + [quotas]
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).hexdigest()


def _listed(names: list[str]) -> str:
    more = f", ... and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def source_changes(saved: list[dict], now: list[dict]) -> list[str]:
    """One line per difference between two `describe_sources` results ([] when the same)."""
    lines = []
    if len(saved) != len(now):
        lines.append(f"train sources: saved {len(saved)}, now {len(now)}")
    for i, (old, new) in enumerate(zip(saved, now)):
        where = f"source {i}"
        old_sizes, new_sizes = dict(map(tuple, old["shards"])), dict(map(tuple, new["shards"]))
        removed = [n for n in old_sizes if n not in new_sizes]
        added = [n for n in new_sizes if n not in old_sizes]
        resized = [f"{n} {old_sizes[n]} -> {new_sizes[n]} samples" for n in old_sizes
                   if n in new_sizes and old_sizes[n] != new_sizes[n]]
        if removed:
            lines.append(f"{where}: {len(removed)} shard(s) removed: {_listed(removed)}")
        if added:
            lines.append(f"{where}: {len(added)} shard(s) added: {_listed(added)}")
        if resized:
            lines.append(f"{where}: {len(resized)} shard(s) resized: {_listed(resized)}")
        if not (removed or added or resized) and [n for n, _ in old["shards"]] != [n for n, _ in new["shards"]]:
            lines.append(f"{where}: the same shards in another order")
        if old["weight"] != new["weight"]:
            lines.append(f"{where}: weight {old['weight']} -> {new['weight']}")
        if old["quota"] != new["quota"]:
            lines.append(f"{where}: its share of the epoch {old['quota']} -> {new['quota']} samples")
    return lines


def data_changes(state: dict, sources: list[Source], quotas: list[int], epoch_length: int) -> list[str]:
    """What differs between the data a loader state was saved on and `sources` ([] = the same
    order): shards added, removed, resized or reordered, weights, quotas, the epoch length."""
    if "sources" in state:
        lines = source_changes(state["sources"], describe_sources(sources, quotas))
    elif state.get("order_digest") == legacy_order_digest(sources, quotas):
        lines = []
    else:
        lines = ["the shards, their sizes, weights or quotas differ from the state's (it was saved "
                 "with absolute shard paths, so it resumes exactly only while the shards lie where "
                 "they lay then, and what changed cannot be itemised)"]
    if state.get("samples_per_epoch") != epoch_length:
        lines.append(f"samples_per_epoch: saved {state.get('samples_per_epoch')!r}, now {epoch_length}")
    return lines
