"""`bench_data.py --reading`: the cost of reading a worker's share of each shard through the member
index vs a walk of the tar headers, and the start-up sizing of a job's shards (stats.json vs index
headers vs a header walk)."""
from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import tempfile
import time

from bench_data import photo_like_jpeg
from megavl.data.writer import ShardWriter

def _proc_io() -> tuple[int, int]:
    """(read syscalls, bytes read) of this process so far (Linux /proc/self/io: syscr, rchar)."""
    with open("/proc/self/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields["syscr"]), int(fields["rchar"])


def write_real_size_shards(out: str, shards: int, per_shard: int) -> list[str]:
    """img2dataset-like shards: `per_shard` samples of jpg + txt + json each (photo-like 256x192
    JPEGs, a few distinct ones cycled: reading cost does not depend on the pixels)."""
    rng = random.Random(0)
    jpegs = [photo_like_jpeg(rng, 256, 192) for _ in range(16)]
    with ShardWriter(out, samples_per_shard=per_shard) as writer:
        for i in range(shards * per_shard):
            caption = f"a photo number {i} of a small dog sitting on the grass"
            writer.write(f"{i:09d}", {"jpg": jpegs[i % len(jpegs)], "txt": caption.encode(),
                                      "json": json.dumps({"caption": caption, "key": i}).encode()})
    return [os.path.join(out, f"{s:06d}.tar") for s in range(shards)]


def _without_index(urls: list[str], out: str) -> list[str]:
    """The same tars (hard links) in a folder without their index files: today's reading."""
    os.makedirs(out, exist_ok=True)
    linked = []
    for url in urls:
        linked.append(os.path.join(out, os.path.basename(url)))
        os.link(url, linked[-1])
    return linked


def time_worker_reads(urls: list[str], per_shard: int, workers: int, seed: int) -> dict:
    """One DataLoader worker of a `workers`-worker job reading its share of every shard: 1/workers
    of the samples at random indices in random order (what the global order gives a worker: every
    shard's samples spread over all workers). Per sample: seconds, opens, read syscalls, bytes."""
    from collections import Counter

    from megavl.data.reader import ShardReader

    rng = random.Random(seed)
    reader = ShardReader(Counter(), sizes={u: per_shard for u in urls})
    wanted = [(u, i) for u in urls for i in rng.sample(range(per_shard), max(1, per_shard // workers))]
    rng.shuffle(wanted)
    calls0, bytes0 = _proc_io()
    start = time.perf_counter()
    for url, i in wanted:
        reader.read(url, i)
    elapsed = time.perf_counter() - start
    calls1, bytes1 = _proc_io()
    reader.close()
    n = len(wanted)
    return {"s": elapsed / n, "opens": reader.io.opens / n,  # tars and index files
            "reads": (calls1 - calls0) / n, "bytes": (bytes1 - bytes0) / n}


def reading_rows(quick: bool, reps: int = 3) -> list[dict]:
    """Header walk (shards without an index) vs member index, per worker share, side by side."""
    shards, per_shard = (2, 1000) if quick else (2, 10_000)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        indexed = write_real_size_shards(os.path.join(out, "indexed"), shards, per_shard)
        walked = _without_index(indexed, os.path.join(out, "walked"))
        data_bytes = sum(os.path.getsize(u) for u in indexed) / (shards * per_shard)
        for workers in (1, 8, 64, 512):
            results: dict[str, list[dict]] = {"walk": [], "index": []}
            for rep in range(reps):
                for name, urls in (("walk", walked), ("index", indexed)):
                    results[name].append(time_worker_reads(urls, per_shard, workers, seed=rep))
            row = {"workers": workers, "samples_per_shard": per_shard,
                   "samples_read": shards * max(1, per_shard // workers),
                   "tar_bytes_per_sample": round(data_bytes)}
            for name, runs in results.items():
                row[f"{name}_us"] = round(statistics.median(r["s"] for r in runs) * 1e6, 1)
                for key in ("opens", "reads", "bytes"):
                    row[f"{name}_{key}"] = round(statistics.median(r[key] for r in runs), 3)
            rows.append(row)
        rows[0]["count_walk_s"], rows[0]["count_index_s"] = _count_times(walked, indexed, reps)
    return rows


def _count_times(walked: list[str], indexed: list[str], reps: int) -> tuple[float, float]:
    """Median seconds to count one real-size shard's samples: header walk vs index header."""
    from megavl.data.shards import count_samples

    times: dict[str, list[float]] = {"walk": [], "index": []}
    for _ in range(reps):
        for name, urls in (("walk", walked), ("index", indexed)):
            start = time.perf_counter()
            for url in urls:
                count_samples(url)
            times[name].append((time.perf_counter() - start) / len(urls))
    return round(statistics.median(times["walk"]), 4), round(statistics.median(times["index"]), 6)


def sizing_rows(quick: bool, shards: int = 200, reps: int = 3) -> list[dict]:
    """Start-up sizing of `shards` small shards: stats.json vs index headers vs a header walk
    (today's cost without stats, paid by every rank; now by rank 0 once, then recorded)."""
    from megavl.data.shards import shard_sizes

    per_shard = 100 if quick else 500
    rng = random.Random(0)
    jpeg = photo_like_jpeg(rng, 64, 48)
    with tempfile.TemporaryDirectory() as out:
        with ShardWriter(os.path.join(out, "stats"), samples_per_shard=per_shard) as writer:
            for i in range(shards * per_shard):
                writer.write(f"{i:09d}", {"jpg": jpeg, "txt": b"a caption"})
        with_stats = [os.path.join(out, "stats", f"{s:06d}.tar") for s in range(shards)]
        index_only = _without_index(with_stats, os.path.join(out, "index"))
        for source, url in zip(with_stats, index_only):
            shutil.copy(source + ".idx", url + ".idx")
        neither = _without_index(with_stats, os.path.join(out, "walk"))
        cases = {"stats.json": with_stats, "index headers (no stats)": index_only,
                 "header walk (no stats, no index)": neither}
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(reps):
            for name, urls in cases.items():
                recorded = os.path.join(os.path.dirname(urls[0]), "stats.json")
                if name != "stats.json" and os.path.exists(recorded):
                    os.remove(recorded)  # what a first start finds
                start = time.perf_counter()
                assert shard_sizes(urls) == [per_shard] * shards
                times[name].append(time.perf_counter() - start)
    return [{"sizing": name, "shards": shards, "samples_per_shard": per_shard,
             "seconds": round(statistics.median(t), 4), "ms_per_shard": round(statistics.median(t) / shards * 1e3, 3)}
            for name, t in times.items()]


def reading_report(quick: bool) -> str:
    """The --reading tables as markdown."""
    lines = ["| worker's share | samples read | time/sample walk -> index | opens/sample walk -> index "
             "| read calls/sample walk -> index | bytes read/sample walk -> index |",
             "|---|---|---|---|---|---|"]
    rows = reading_rows(quick)
    for r in rows:
        lines.append(f"| 1/{r['workers']} of each shard | {r['samples_read']} | {r['walk_us']} us -> "
                     f"{r['index_us']} us | {r['walk_opens']} -> {r['index_opens']} | {r['walk_reads']} -> "
                     f"{r['index_reads']} | {r['walk_bytes']:.0f} -> {r['index_bytes']:.0f} "
                     f"(tar: {r['tar_bytes_per_sample']}) |")
    lines += ["", f"Counting one shard of {rows[0]['samples_per_shard']} samples: header walk "
              f"{rows[0]['count_walk_s']} s, index header {rows[0]['count_index_s']} s.",
              "", "| sizing at start | shards | time | per shard |", "|---|---|---|---|"]
    for r in sizing_rows(quick):
        lines.append(f"| {r['sizing']} | {r['shards']} x {r['samples_per_shard']} | {r['seconds']} s | "
                     f"{r['ms_per_shard']} ms |")
    return "\n".join(lines)
