"""`bench_data.py --mixing`: the global order before (windows of >= data.shuffle_buffer=5000
samples of shuffled shards: one 10k shard) and after (shards interleaved across sources, the
recipes' 32-shard windows), planned at the 4M and 14M recipes' real shard counts and measured on
real shards written here (the 4M recipe scaled down), then the samples/s per core rows of
`bench_data.run`. The module docstring of bench_data.py describes every figure."""
from __future__ import annotations

import os
import random
import tempfile
import time

import torch

from bench_data import OpenCounter, photo_like_jpeg, run
from data_order_before import max_open_before, order_before
from megavl.data.writer import ShardWriter

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
