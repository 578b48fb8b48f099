"""Data pipeline throughput per worker: megavl's train loader vs a plain webdataset pipeline.

Both do the same work in ONE process with ONE torch thread (= one DataLoader worker, one core):
read tar -> decode JPEG -> train transform at 224 px (RandomResizedCrop(0.5, 1) + flip +
normalise) -> tokenise to 30 tokens -> batch of 32. The plain pipeline is written the way
OpenCLIP's `get_wds_dataset` does it (tarfile_to_samples -> shuffle -> decode("pilrgb") -> map).
megavl additionally draws the MLM and SCL masks.

    python bench/bench_data.py [--quick] [--image-width 512 --image-height 384]

`run(quick) -> list[dict]` returns one row per pipeline plus the ratio row.
"""
from __future__ import annotations

import argparse
import io
import os
import random
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


def time_megavl(pattern: str, samples: int) -> float:
    cfg = DataConfig(train_shards=[pattern], batch_size=BATCH, num_workers=0, shuffle_buffer=1000,
                     image_size=IMAGE_SIZE, max_text_len=MAX_LEN)
    loader = build_train_loader(cfg, rank=0, world_size=1, mlm_prob=0.15, scl_mask_prob=0.4)
    batches = loader.batches_per_epoch
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * BATCH / (time.perf_counter() - start)


def time_webdataset(pattern: str, samples: int) -> float:
    # per-sample normalisation in float, as OpenCLIP's image_transform does
    transform = v2.Compose([train_transform(IMAGE_SIZE, [0.5, 1.0], True, False),
                            v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(DataConfig().mean, DataConfig().std)])
    tokenizer = build_tokenizer("")

    def tokenize(text: str) -> torch.Tensor:
        return tokenizer(text, padding="max_length", truncation=True, max_length=MAX_LEN,
                         return_tensors="pt")["input_ids"][0]

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(pattern),            # shard URLs
        wds.tarfile_to_samples(),                # dicts of raw bytes per key
        wds.shuffle(1000),                       # same buffer size as megavl's
        wds.decode("pilrgb"),                    # PIL RGB images, str captions
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=transform, text=tokenize),
        wds.to_tuple("image", "text"),
        wds.batched(BATCH, partial=False),       # stacked tensors
    )
    start = time.perf_counter()
    count = sum(images.shape[0] for images, _ in pipeline)
    return count / (time.perf_counter() - start)


def run(quick: bool, width: int = 512, height: int = 384) -> list[dict]:
    """Samples/s on one core for both pipelines (best of 1 run if quick, else 2) + the ratio."""
    samples = 256 if quick else 1536
    repeats = 1 if quick else 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as out:
            pattern = write_bench_shards(out, samples, width, height)
            time_webdataset(pattern, samples)  # warm the page cache and imports
            plain = max(time_webdataset(pattern, samples) for _ in range(repeats))
            ours = max(time_megavl(pattern, samples) for _ in range(repeats))
    finally:
        torch.set_num_threads(threads)
    common = {"image": f"{width}x{height} jpeg", "size": IMAGE_SIZE, "batch": BATCH,
              "samples": samples}
    return [{"pipeline": "megavl", "samples_per_s_per_core": round(ours, 1), **common},
            {"pipeline": "webdataset (OpenCLIP-style)", "samples_per_s_per_core": round(plain, 1),
             **common},
            {"pipeline": "ratio megavl/webdataset", "ratio": round(ours / plain, 3)}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--image-width", type=int, default=512)
    parser.add_argument("--image-height", type=int, default=384)
    args = parser.parse_args(argv)
    for row in run(args.quick, args.image_width, args.image_height):
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
