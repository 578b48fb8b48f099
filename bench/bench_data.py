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
import os
import random
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
        from bench_data_reading import reading_report

        print(reading_report(args.quick))
        return 0
    if args.mixing:
        from bench_data_mixing import mixing_report

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
