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
    python bench/bench_data.py --mixing [--quick] [--report benchmarks/data_mixing_cpu2core_202612.md]

`run(quick) -> list[dict]` returns one row per pipeline plus the ratio row, then megavl with the
order it had before shards were interleaved across sources (data_order_before.py); repetitions of
the sides alternate and medians are reported (the machine is shared).

`--mixing`: the global order before (windows of >= data.shuffle_buffer=5000 samples of shuffled
shards: one 10k shard) and after (shards interleaved across sources, the recipes' 32-shard
windows), (1) planned at the 4M and 14M recipes' real shard counts, 10,000 samples per shard
(distinct shards and sources per global batch of 512, source TV distance over 200 batches; one
DataLoader worker of 8 ranks x 8 workers: open handles, file opens per sample), and (2) measured on
real shards written here, the 4M recipe scaled down (its 4 sources' shard counts, 1,000 samples per
shard, windows scaled alike): worker 0 of 8 ranks x 1 worker reads its whole epoch through
megavl's reader (file opens, bytes read per sample from /proc/self/io rchar, most handles open at
once, raw samples/s), then the samples/s per core rows of `run`.
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
from megavl.data.stream import TrainStream
from megavl.data.transforms import train_transform
from megavl.data.writer import ShardWriter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data_order_before import max_open_before, order_before  # noqa: E402

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


def use_order_before(loader) -> None:
    """Make a TrainLoader (not yet iterated) follow the order of data_order_before.py, with the
    reader that only evicted by LRU."""
    plan = loader.plan
    plan.epoch_order = lambda epoch: order_before(plan, epoch)
    plan.max_open_shards = lambda: max_open_before(plan)


def time_megavl(pattern: str, before: bool = False) -> tuple[float, float]:
    """(samples/s, opens per sample) over one epoch of megavl's train loader, in-process: its
    default order (whole-epoch window here), or the order before (windows of >= 1000 samples)."""
    cfg = DataConfig(train_shards=[pattern], batch_size=BATCH, num_workers=0,
                     shuffle_buffer=1000 if before else DataConfig().shuffle_buffer,
                     image_size=IMAGE_SIZE, max_text_len=MAX_LEN)
    loader = build_train_loader(cfg, rank=0, world_size=1, mlm_prob=0.15, scl_mask_prob=0.4,
                                global_batch_size=BATCH)
    release = TrainStream._leave_windows
    if before:
        use_order_before(loader)
        TrainStream._leave_windows = lambda self, t: None
    try:
        batches = loader.batches_per_epoch
        with OpenCounter() as opens:
            start = time.perf_counter()
            for _ in range(batches):
                next(loader)
            elapsed = time.perf_counter() - start
        loader.close()
    finally:
        TrainStream._leave_windows = release
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
    sides = {"webdataset": time_webdataset, "megavl": time_megavl,
             "megavl-before": lambda pattern: time_megavl(pattern, before=True)}
    times: dict[str, list[float]] = {name: [] for name in sides}
    opens: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory() as out:
            pattern = write_bench_shards(out, samples, width, height)
            time_webdataset(pattern)  # warm the page cache and imports
            time_megavl(pattern)
            for _ in range(reps):  # alternate the sides: a neighbour's load hits both alike
                for name, fn in sides.items():
                    rate, opens[name] = fn(pattern)
                    times[name].append(rate)
    finally:
        torch.set_num_threads(threads)
    ours, plain = statistics.median(times["megavl"]), statistics.median(times["webdataset"])
    before = statistics.median(times["megavl-before"])
    common = {"image": f"{width}x{height} jpeg", "size": IMAGE_SIZE, "batch": BATCH,
              "samples": samples, "shards": 4, "reps": reps}
    return [{"pipeline": "megavl", "samples_per_s_per_core": round(ours, 1),
             "opens_per_sample": round(opens["megavl"], 5), "all": times["megavl"], **common},
            {"pipeline": "webdataset (wds.WebDataset...decode)", "samples_per_s_per_core":
             round(plain, 1), "opens_per_sample": round(opens["webdataset"], 5),
             "all": times["webdataset"], **common},
            {"pipeline": "ratio megavl/webdataset", "ratio": round(ours / plain, 3)},
            {"pipeline": "megavl, order before", "samples_per_s_per_core": round(before, 1),
             "opens_per_sample": round(opens["megavl-before"], 5), "all": times["megavl-before"],
             **common},
            {"pipeline": "ratio megavl before/webdataset", "ratio": round(before / plain, 3)}]


# ------------------------------------------------------------------------ mixing, before vs after
RECIPE_WORLD, RECIPE_WORKERS = 8, 8   # the 4M/14M recipes: 512 = 64 per GPU x 8 GPUs, 8 workers
BEFORE_BUFFER = 5000                  # the recipes' data.shuffle_buffer before: one 10k shard


def _recipe_plan(recipe: str, shuffle_buffer: int | None, shard_samples: int = 10_000):
    from megavl.config import load_config
    from megavl.tools.data_report import recipe_plan

    overrides = [] if shuffle_buffer is None else [f"data.shuffle_buffer={shuffle_buffer}"]
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", f"{recipe}.yaml"),
                      overrides)
    return recipe_plan(cfg, f"assume={shard_samples}", RECIPE_WORLD)[:2]


def _order_figures(plan, global_batch: int, before: bool, batches: int) -> dict:
    """Mixing of `batches` global batches and one worker's simulated reading, for either order."""
    from megavl.data.mixing import batch_mixing, mixture, simulate_worker, source_of_url

    order = order_before(plan, 0) if before else plan.epoch_order(0)
    mixing = batch_mixing(order, source_of_url(plan), mixture(plan), global_batch, batches)
    reads = simulate_worker(plan, order, RECIPE_WORKERS, release=not before,
                            open_limit=max_open_before(plan) if before else 0)
    return {"shards_per_batch": round(mixing.shards_mean, 2), "sources_per_batch":
            round(mixing.sources_mean, 2), "tv": round(mixing.tv_mean, 3),
            "windows": order.num_windows, "handles": reads.max_open,
            "opens_per_sample": round(reads.opens_per_sample, 5)}


def mixing_planned(batches: int = 200) -> list[dict]:
    """Before vs after at the 4M and 14M recipes' real shard counts, 10k samples per shard."""
    rows = []
    for recipe in ("pretrain_4m", "pretrain_14m"):
        for before in (True, False):
            plan, global_batch = _recipe_plan(recipe, BEFORE_BUFFER if before else None)
            rows.append({"recipe": recipe, "order": "before" if before else "after",
                         "shuffle_buffer": plan.shuffle_buffer, "global_batch": global_batch,
                         **_order_figures(plan, global_batch, before, batches)})
    return rows


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


def write_recipe_shards(out: str, shard_samples: int) -> list[str]:
    """The 4M recipe's sources (60/77/86/290 shards, scaled by 1/10 to 6/8/9/29) with
    `shard_samples` img2dataset-like samples (jpg + txt + json) per shard; 32 distinct JPEGs."""
    rng = random.Random(1)
    jpegs = [photo_like_jpeg(rng, 256, 192) for _ in range(32)]
    patterns, index = [], 0
    for name, shards in (("coco", 6), ("vg", 8), ("sbu", 9), ("cc3m", 29)):
        with ShardWriter(os.path.join(out, name), samples_per_shard=shard_samples) as writer:
            for _ in range(shards * shard_samples):
                writer.write(f"{index:09d}", {"jpg": jpegs[index % 32],
                                              "txt": f"caption {index} of {name}".encode(),
                                              "json": f'{{"key": "{index:09d}"}}'.encode()})
                index += 1
        patterns.append(os.path.join(out, name, f"{{000000..{shards - 1:06d}}}.tar"))
    return patterns


def read_one_worker(plan, order, before: bool) -> dict:
    """Worker 0 of rank 0 (1 worker per rank) reads its epoch's raw samples with megavl's reader:
    after = stream.py's window release + the LRU; before = the LRU alone."""
    from collections import Counter

    from megavl.data.reader import ShardReader

    reader = ShardReader(Counter(), max_open=max_open_before(plan) if before else plan.max_open_shards())
    samples = peak = 0
    window = None
    with OpenCounter() as opens:
        start_bytes, start = _rchar(), time.perf_counter()
        for t in range(plan.batches_per_epoch):
            _, positions = plan.share(t)
            if not before and order.window_of(positions[0]) != window:
                window = order.window_of(positions[0])
                reader.retain({seg.url for w in range(window, order.window_of(positions[-1]) + 1)
                               for seg in order.window_segments(w)})
            for p in positions:
                reader.read(*order.locate(p))
                samples += 1
                peak = max(peak, reader.open_count)
        elapsed, read = time.perf_counter() - start, _rchar() - start_bytes
    reader.close()
    return {"opens_per_sample": round(opens.count / samples, 5),
            "bytes_per_sample": round(read / samples), "handles": peak,
            "raw_samples_per_s": round(samples / elapsed, 1), "samples": samples}


def reading_measured(quick: bool) -> tuple[list[dict], int]:
    """Before vs after on real shards (the 4M recipe scaled down), one worker of 8 ranks."""
    from megavl.data.mixing import batch_mixing, mixture, source_of_url
    from megavl.data.shards import expand_urls, shard_sizes
    from megavl.data.sources import Source, source_quotas
    from megavl.data.stream import TrainPlan

    shard_samples = 200 if quick else 1000
    rows = []
    with tempfile.TemporaryDirectory() as out:
        patterns = write_recipe_shards(out, shard_samples)
        sources = [Source(urls, shard_sizes(urls), 0.0) for urls in map(expand_urls, patterns)]
        quotas = source_quotas(sources, 0)
        payload = sum(os.path.getsize(u) for s in sources for u in s.urls) / sum(quotas)
        for name, buffer in (("before", shard_samples // 2), ("after, K = 8", 8 * shard_samples),
                             ("after, K = 32", 32 * shard_samples)):
            before = name == "before"
            plan = TrainPlan(sources=sources, quotas=quotas, resampled=False,
                             virtual_size=sum(quotas), epoch_length=sum(quotas) // 512 * 512,
                             shuffle_buffer=buffer, seed=0, batch_size=512 // RECIPE_WORLD, rank=0,
                             world_size=RECIPE_WORLD, caption_key="txt", max_pixels=10**8,
                             draft_size=0, source_indices=[0, 1, 2, 3])
            order = order_before(plan, 0) if before else plan.epoch_order(0)
            mixing = batch_mixing(order, source_of_url(plan), mixture(plan), 512,
                                  plan.epoch_length // 512)
            rows.append({"order": name, "shuffle_buffer": buffer,
                         "shards_per_batch": round(mixing.shards_mean, 2),
                         "tv": round(mixing.tv_mean, 3), "payload_bytes": round(payload),
                         **read_one_worker(plan, order, before)})
    return rows, shard_samples


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def mixing_report(quick: bool, reps: int | None) -> str:
    """The markdown of benchmarks/data_mixing_*.md: planned, measured and throughput tables."""
    from harness import machine_line

    planned = mixing_planned(40 if quick else 200)
    measured, shard_samples = reading_measured(quick)
    speed = run(quick, reps=reps or (1 if quick else 7))
    lines = ["# Data order: mixing and reading cost, before vs after", "",
             f"- **Date:** {time.strftime('%Y-%m-%d')}.",
             f"- **Hardware:** {machine_line(torch.device('cpu'))}; load average "
             f"{os.getloadavg()[0]:.1f}.",
             f"- **Command:** `python bench/bench_data.py --mixing{' --quick' if quick else ''} "
             f"--report benchmarks/data_mixing_cpu2core_202612.md`", "",
             "Before: the epoch's shards shuffled together, windows of >= `data.shuffle_buffer` "
             "samples (the recipes' 5000: one shard). After: shards interleaved across sources by "
             "quota, windows of >= 320,000 samples (32 shards of 10k; the recipes' setting), each "
             "window permuted by a keyed bijection.", "",
             "## Planned at the recipes' real shard counts (10,000 samples per shard)", "",
             f"Global batch 512; {40 if quick else 200} consecutive batches; one "
             f"DataLoader worker of {RECIPE_WORLD} ranks x {RECIPE_WORKERS} workers over epoch 0 "
             "(`megavl.data.mixing.simulate_worker`).", ""]
    lines += _table(["recipe", "order", "shuffle_buffer", "windows", "distinct shards/batch",
                     "sources/batch", "source TV", "handles/worker", "file opens/sample"],
                    [[r["recipe"], r["order"], r["shuffle_buffer"], r["windows"],
                      r["shards_per_batch"], r["sources_per_batch"], r["tv"], r["handles"],
                      r["opens_per_sample"]] for r in planned])
    lines += ["", "## Measured on real shards: the 4M recipe scaled down", "",
              f"6/8/9/29 shards of {shard_samples} samples (jpg + txt + json, "
              f"{measured[0]['payload_bytes']:,} bytes per sample on disk); windows of half a shard "
              f"(before), 8 shards (after, K = 8: 6 windows) and 32 shards (after, K = 32, the "
              f"recipes' K: with 52 shards one window, as the short tail joins it); global batch 512 "
              f"= {RECIPE_WORLD} ranks x {512 // RECIPE_WORLD}; worker 0 of rank 0 (1 worker per "
              f"rank) reads its {measured[0]['samples']:,} samples of the epoch with megavl's "
              "reader. Bytes: `rchar` of /proc/self/io (all read syscalls: tar header walk + "
              "members), page cache warm.", ""]
    lines += _table(["order", "distinct shards/batch", "source TV", "file opens/sample",
                     "bytes read/sample", "handles/worker (max open)", "raw reads/s"],
                    [[r["order"], r["shards_per_batch"], r["tv"], r["opens_per_sample"],
                      f"{r['bytes_per_sample']:,}", r["handles"], r["raw_samples_per_s"]]
                     for r in measured])
    ours, plain, ratio, before, before_ratio = speed
    lines += ["", "## Samples/s per core on real shards vs webdataset's own pipeline", "",
              f"{ours['samples']} samples ({ours['image']}) in {ours['shards']} shards -> "
              f"{ours['size']} px, batch {ours['batch']}, one core, median of {ours['reps']} "
              "alternating repetitions (the pipeline of `python bench/bench_data.py`).", ""]
    spread = lambda row: f"{min(row['all']):.0f}-{max(row['all']):.0f}"  # noqa: E731
    lines += _table(["pipeline", "samples/s per core (median)", "repetitions' range",
                     "file opens/sample", "vs webdataset"],
                    [[ours["pipeline"] + " (after)", ours["samples_per_s_per_core"], spread(ours),
                      ours["opens_per_sample"], f"{ratio['ratio']:.2f}x (goal >= 1.2x)"],
                     [before["pipeline"], before["samples_per_s_per_core"], spread(before),
                      before["opens_per_sample"], f"{before_ratio['ratio']:.2f}x"],
                     [plain["pipeline"], plain["samples_per_s_per_core"], spread(plain),
                      plain["opens_per_sample"], "1.00x"]])
    return "\n".join(lines) + "\n"


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
    parser.add_argument("--mixing", action="store_true", help="the order's mixing and reading cost")
    parser.add_argument("--report", default="", help="with --mixing: write the markdown here")
    args = parser.parse_args(argv)
    if args.reading:
        print(reading_report(args.quick))
        return 0
    if args.mixing:
        text = mixing_report(args.quick, args.reps)
        print(text)
        if args.report:
            with open(args.report, "w") as f:
                f.write(text)
        return 0
    for row in run(args.quick, args.image_width, args.image_height, args.reps):
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
