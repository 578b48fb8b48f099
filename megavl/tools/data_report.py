"""megavl-data-report: what a recipe's global batches look like, and what reading them costs, before
a run: distinct shards and sources per global batch, the source TV distance, the shuffle windows,
and one DataLoader worker's open handles, file opens and bytes read per sample.

    megavl-data-report --config configs/pretrain_4m.yaml [--set KEY=VALUE ...]
        [--shard-sizes-from stats|count|assume=N] [--batches 200] [--world N] [--epoch E]

Shard sizes: `stats` (default) reads stats.json / img2dataset's NNNNN_stats.json where present and
assumes 10,000 samples (img2dataset's default) for every other shard, so a recipe reports without
its shards on this machine: the shard COUNTS come from the brace patterns. `count` counts the
samples of every shard present (reads every header: slow on real data); `assume=N` assumes N for
all. Bytes per sample use the shards' file sizes when every shard is present, else an assumed
sample (ASSUMED_SAMPLE_BYTES, ASSUMED_MEMBERS: img2dataset's jpg + txt + json). The world is
run.global_batch_size / (data.batch_size x run.grad_accum) ranks unless --world says otherwise.
All sources are reported as one stream (a run with image AND video sources keeps one order per
modality: report each with --set data.train_shards=...).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

ASSUMED_SHARD_SAMPLES = 10_000   # img2dataset's samples per shard
ASSUMED_SAMPLE_BYTES = 20_000    # a 256-px JPEG + caption + json, as img2dataset writes them
ASSUMED_MEMBERS = 3              # jpg, txt, json
# reads per tar member when a worker walks a shard's headers (reader.py: a 512-byte header read
# through the file's buffer), measured on megavl's reader
HEADER_WALK_BYTES_PER_MEMBER = 2048
# memory of an open shard's member offsets in reader.py's index (Python tuples and dicts), measured
READER_BYTES_PER_MEMBER = 240


def _sizes(urls: list[str], how: str) -> tuple[list[int], int]:
    """Samples per shard and how many of them were assumed."""
    from megavl.data.shards import count_samples
    from megavl.data.stats import stats_size

    if how.startswith("assume="):
        n = int(how.split("=", 1)[1])
        return [n] * len(urls), len(urls)
    cache: dict[str, dict] = {}
    sizes, assumed = [], 0
    for url in urls:
        size = stats_size(url, cache) if os.path.isfile(url) else None
        if size is None and how == "count" and os.path.isfile(url):
            size = count_samples(url, Counter())
        if size is None:
            size, assumed = ASSUMED_SHARD_SAMPLES, assumed + 1
        sizes.append(size)
    return sizes, assumed


def _sample_bytes(urls: list[str], samples: int) -> tuple[float, int, bool]:
    """(bytes per sample, tar members per sample, measured?) from the shards when all are present."""
    from megavl.data.shards import iter_raw_samples

    if not urls or not all(os.path.isfile(u) for u in urls) or samples == 0:
        return ASSUMED_SAMPLE_BYTES, ASSUMED_MEMBERS, False
    first = next(iter_raw_samples(urls[0], 0, 1, Counter()), None)
    members = sum(1 for k in first if not k.startswith("__")) if first else ASSUMED_MEMBERS
    return sum(os.path.getsize(u) for u in urls) / samples, members, True


def recipe_plan(cfg, sizes_from: str = "stats", world: int = 0):
    """(TrainPlan of rank 0, optimizer-step global batch, shards whose size was assumed) for a
    loaded Config: the plan build.py makes, from the patterns and `sizes_from`, all sources as one
    stream."""
    from megavl.data.shards import expand_urls
    from megavl.data.sources import Source, source_quotas
    from megavl.data.stream import TrainPlan

    d, run = cfg.data, cfg.run
    if not d.train_shards:
        raise ValueError("data.train_shards is empty")
    if world <= 0:
        per_rank = d.batch_size * max(1, run.grad_accum)
        world = max(1, run.global_batch_size // per_rank) if run.global_batch_size else 1
    global_batch = run.global_batch_size or d.batch_size * world * max(1, run.grad_accum)
    weights = d.train_weights or [0.0] * len(d.train_shards)
    sources, assumed = [], 0
    for pattern, w in zip(d.train_shards, weights):
        urls = expand_urls(pattern)
        sizes, n = _sizes(urls, sizes_from)
        sources.append(Source(urls, sizes, w))
        assumed += n
    quotas = [] if d.resampled else source_quotas(sources, d.samples_per_epoch)
    virtual = sum(quotas) if quotas else (d.samples_per_epoch or sum(s.size for s in sources))
    length = virtual // global_batch * global_batch
    if length == 0:
        raise ValueError(f"an epoch of {virtual} samples holds no global batch of {global_batch}")
    plan = TrainPlan(sources=sources, quotas=quotas, resampled=d.resampled, virtual_size=virtual,
                     epoch_length=length, shuffle_buffer=d.shuffle_buffer, seed=d.seed,
                     batch_size=d.batch_size, rank=0, world_size=world, caption_key=d.caption_key,
                     max_pixels=d.max_image_pixels, draft_size=0,
                     source_indices=list(range(len(sources))))
    return plan, global_batch, assumed


def report(cfg, sizes_from: str = "stats", batches: int = 200, world: int = 0,
           epoch: int = 0) -> str:
    """The report's text for a loaded Config."""
    from megavl.data.mixing import (batch_mixing, mixture, simulate_worker, source_of_url,
                                    window_sizes)

    d, run = cfg.data, cfg.run
    plan, global_batch, assumed = recipe_plan(cfg, sizes_from, world)
    sources, quotas, world = plan.sources, plan.quotas, plan.world_size
    virtual, length = plan.virtual_size, plan.epoch_length
    order = plan.epoch_order(epoch)
    shares = mixture(plan)
    mixing = batch_mixing(order, source_of_url(plan), shares, global_batch, batches)
    windows = window_sizes(order)
    reads = simulate_worker(plan, order, max(1, d.num_workers))
    all_urls = [u for s in sources for u in s.urls]
    payload, members, measured = _sample_bytes(all_urls, sum(s.size for s in sources))
    shard_samples = sum(s.size for s in sources) / len(all_urls)
    walk = reads.opens * shard_samples * members * HEADER_WALK_BYTES_PER_MEMBER / reads.samples
    workers = world * max(1, d.num_workers)

    lines = [f"sources ({len(sources)}): shard sizes from {sizes_from}"
             + (f"; {assumed} of {len(all_urls)} shards assumed {ASSUMED_SHARD_SAMPLES:,} samples"
                if assumed and not sizes_from.startswith("assume=") else "")]
    lines.append(f"  {'#':>2}  {'shards':>6}  {'samples/epoch':>13}  {'share':>5}  pattern")
    for i, (pattern, s) in enumerate(zip(d.train_shards, sources)):
        take = quotas[i] if quotas else round(shares[i] * virtual)
        lines.append(f"  {i:>2}  {len(s.urls):>6}  {take:>13,}  {shares[i]:>5.3f}  {pattern}")
    buffer = "-1 (the whole epoch)" if d.shuffle_buffer < 0 else f"{d.shuffle_buffer:,}"
    lines += [
        f"order: epoch {epoch}, {length:,} positions ({virtual:,} samples), "
        f"data.shuffle_buffer = {buffer}, seed {d.seed}",
        f"windows: {windows.windows}; shards per window min/median/max "
        f"{'/'.join(map(str, windows.shards))}; samples {'/'.join(f'{n:,}' for n in windows.samples)}",
        f"global batch {global_batch} ({world} ranks x {d.batch_size}"
        + (f" x {run.grad_accum} accumulation" if run.grad_accum > 1 else "")
        + f"), batches 0..{mixing.batches - 1} of epoch {epoch}:",
        f"  distinct shards per batch   mean {mixing.shards_mean:.1f}, min {mixing.shards_min}",
        f"  sources per batch           mean {mixing.sources_mean:.2f} of {len(sources)}",
        f"  source TV distance          mean {mixing.tv_mean:.3f}, max {mixing.tv_max:.3f}",
        f"one DataLoader worker (rank 0, worker 0 of {world} ranks x {d.num_workers} workers = "
        f"{workers}), epoch {epoch}:",
        f"  samples read                {reads.samples:,} from {reads.shards} shards",
        f"  open handles                max {reads.max_open} (limit {reads.open_limit}), their "
        f"member offsets ~{reads.max_open * shard_samples * members * READER_BYTES_PER_MEMBER / 1e6:,.0f} MB",
        f"  file opens per sample       {reads.opens_per_sample:.4f} "
        f"({reads.samples_per_open:.0f} samples per open)",
        f"  bytes read per sample       {(payload + walk) / 1e3:,.1f} kB = sample "
        f"{payload / 1e3:,.1f} kB ({'shards on disk' if measured else 'assumed'}) + tar header "
        f"walk {walk / 1e3:,.1f} kB ({members} members x {shard_samples:,.0f} samples per open)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megavl-data-report", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML recipe")
    parser.add_argument("--set", dest="overrides", action="append", nargs="+", default=[],
                        metavar="KEY=VALUE")
    parser.add_argument("--shard-sizes-from", default="stats",
                        help="stats (default; absent stats: 10,000 assumed) | count | assume=N")
    parser.add_argument("--batches", type=int, default=200, help="consecutive global batches")
    parser.add_argument("--world", type=int, default=0, help="ranks (default: from the recipe)")
    parser.add_argument("--epoch", type=int, default=0)
    args = parser.parse_args(argv)
    how = args.shard_sizes_from
    if how not in ("stats", "count") and not (how.startswith("assume=")
                                             and how.split("=", 1)[1].isdigit()
                                             and int(how.split("=", 1)[1]) > 0):
        parser.error(f"--shard-sizes-from {how!r}: expected stats, count or assume=N (N > 0)")
    from megavl.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, [item for group in args.overrides for item in group])
        print(f"megavl-data-report: {args.config}")
        print(report(cfg, how, args.batches, args.world, args.epoch))
    except (ConfigError, ValueError) as err:
        print(f"megavl-data-report: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
