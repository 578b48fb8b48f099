"""Data pipeline throughput per core and shard opens per sample: megavl's train loader vs
webdataset's OWN pipeline on the same shards.

Both run in ONE process with ONE torch thread (= one DataLoader worker, one core): read tar ->
decode JPEG -> train transform at 224 px (RandomResizedCrop(0.5, 1) + flip + normalise) ->
tokenise to 30 tokens -> batch of 32. The reference is webdataset's fluid API as its README and
OpenCLIP use it: `wds.WebDataset(urls).shuffle(1000).decode("pilrgb").to_tuple("jpg;png", "txt")
.map_tuple(transform, tokenize).batched(32)`, the transform normalising per image in float (as
OpenCLIP's). megavl additionally draws per-sample MLM and SCL masks and follows the global order
(order.py: random access by seek, one open handle per shard, reader.py). Opens per sample: calls of
`open()` on a .tar during the timed pass, counted by a wrapper around builtins.open on both sides
(a reader that opens the tar per member would make 2 per image+txt sample, 3 with a json).

    python bench/bench_data.py [--quick] [--reps N] [--image-width 512 --image-height 384]
    python bench/bench_data.py --reading [--quick]   reading cost: member index vs header walk
                                                    per worker share, and start-up sizing

`run(quick) -> list[dict]` returns one row per pipeline plus the ratio row; repetitions of the two
sides alternate and medians are reported (the machine is shared).
"""
from __future__ import annotations

import argparse
import builtins
import io
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

import torch
import webdataset as wds
from PIL import Image, ImageDraw, ImageFilter
from torchvision.transforms import v2

from megavl.config import DataConfig
from megavl.data import build_tokenizer, build_train_loader
from megavl.data.transforms import train_transform
from megavl.data.writer import ShardWriter

BATCH = 32
IMAGE_SIZE = 224
MAX_LEN = 30


def photo_like_jpeg(rng: random.Random, width: int, height: int) -> bytes:
    """Smooth shapes on a gradient, blurred: compresses like a photo (tens of kB), not like noise."""
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    pen = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randrange(10, width // 3)
        colour = tuple(rng.randrange(256) for _ in range(3))
        pen.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(2))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_bench_shards(out: str, samples: int, width: int, height: int) -> str:
    rng = random.Random(0)
    words = "a the red small large dog cat sitting on near grass table photo of with".split()
    with ShardWriter(out, samples_per_shard=max(1, samples // 4)) as writer:
        for i in range(samples):
            caption = " ".join(rng.choice(words) for _ in range(rng.randint(6, 20)))
            writer.write(f"{i:08d}", {"jpg": photo_like_jpeg(rng, width, height),
                                      "txt": caption.encode()})
    shards = sorted(f for f in os.listdir(out) if f.endswith(".tar"))
    return os.path.join(out, f"{{000000..{len(shards) - 1:06d}}}.tar")


class OpenCounter:
    """Counts `open()` calls on .tar files while active (both pipelines open shards with it)."""

    def __init__(self):
        self.count = 0
        self._real = builtins.open

    def __enter__(self) -> "OpenCounter":
        def counting_open(file, *args, **kwargs):
            if str(file).endswith(".tar"):
                self.count += 1
            return self._real(file, *args, **kwargs)
        builtins.open = counting_open
        return self

    def __exit__(self, *exc) -> None:
        builtins.open = self._real


def time_megavl(pattern: str) -> tuple[float, float]:
    """(samples/s, opens per sample) over one epoch of megavl's train loader, in-process."""
    cfg = DataConfig(train_shards=[pattern], batch_size=BATCH, num_workers=0, shuffle_buffer=1000,
                     image_size=IMAGE_SIZE, max_text_len=MAX_LEN)
    loader = build_train_loader(cfg, rank=0, world_size=1, mlm_prob=0.15, scl_mask_prob=0.4,
                                global_batch_size=BATCH)
    batches = loader.batches_per_epoch
    with OpenCounter() as opens:
        start = time.perf_counter()
        for _ in range(batches):
            next(loader)
        elapsed = time.perf_counter() - start
    loader.close()
    return batches * BATCH / elapsed, opens.count / (batches * BATCH)


def time_webdataset(pattern: str) -> tuple[float, float]:
    """(samples/s, opens per sample) over one pass of webdataset's own pipeline."""
    transform = v2.Compose([train_transform(IMAGE_SIZE, [0.5, 1.0], True, False),
                            v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(DataConfig().mean, DataConfig().std)])
    tokenizer = build_tokenizer("")

    def tokenize(text: str) -> torch.Tensor:
        return tokenizer(text, padding="max_length", truncation=True, max_length=MAX_LEN,
                         return_tensors="pt")["input_ids"][0]

    dataset = (wds.WebDataset(pattern, shardshuffle=False, empty_check=False)
               .shuffle(1000)
               .decode("pilrgb")
               .to_tuple("jpg;png;jpeg;webp", "txt")
               .map_tuple(transform, tokenize)
               .batched(BATCH, partial=False))
    with OpenCounter() as opens:
        start = time.perf_counter()
        count = sum(images.shape[0] for images, _ in dataset)
        elapsed = time.perf_counter() - start
    return count / elapsed, opens.count / count


def run(quick: bool, width: int = 512, height: int = 384, reps: int | None = None) -> list[dict]:
    """Median samples/s on one core and opens per sample for both pipelines + the ratio row."""
    samples = 256 if quick else 1536
    reps = reps or (1 if quick else 5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {"megavl": [], "webdataset": []}
    opens: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory() as out:
            pattern = write_bench_shards(out, samples, width, height)
            time_webdataset(pattern)  # warm the page cache and imports
            time_megavl(pattern)
            for _ in range(reps):  # alternate the sides: a neighbour's load hits both alike
                for name, fn in (("webdataset", time_webdataset), ("megavl", time_megavl)):
                    rate, opens[name] = fn(pattern)
                    times[name].append(rate)
    finally:
        torch.set_num_threads(threads)
    ours, plain = statistics.median(times["megavl"]), statistics.median(times["webdataset"])
    common = {"image": f"{width}x{height} jpeg", "size": IMAGE_SIZE, "batch": BATCH,
              "samples": samples, "shards": 4, "reps": reps}
    return [{"pipeline": "megavl", "samples_per_s_per_core": round(ours, 1),
             "opens_per_sample": round(opens["megavl"], 5), "all": times["megavl"], **common},
            {"pipeline": "webdataset (wds.WebDataset...decode)", "samples_per_s_per_core":
             round(plain, 1), "opens_per_sample": round(opens["webdataset"], 5),
             "all": times["webdataset"], **common},
            {"pipeline": "ratio megavl/webdataset", "ratio": round(ours / plain, 3)}]


# ---------------------------------------------------------------------------------------------
# Reading cost (member index vs header walk) and start-up sizing (stats vs counting): --reading


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--image-width", type=int, default=512)
    parser.add_argument("--image-height", type=int, default=384)
    parser.add_argument("--reading", action="store_true",
                        help="reading cost (index vs header walk) and start-up sizing tables")
    args = parser.parse_args(argv)
    if args.reading:
        print(reading_report(args.quick))
        return 0
    for row in run(args.quick, args.image_width, args.image_height, args.reps):
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
