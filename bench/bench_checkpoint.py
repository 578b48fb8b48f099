"""Checkpoint cost under ZeRO-3: bytes on disk at 1, 2 and 4 ranks, and the save time a signal must cover.

Each side is a real DeepSpeed ZeRO-3 engine (ds_configs/zero3.json, tiny towers, fp32) in gloo
processes, with the 4M recipe's ITC queue (objectives.itc.queue_size x model.embed_dim, 65,536 x 256:
two 64 MiB fp32 queues and their ids) and SemMIM centres (model.num_prototypes 8,192). After two
training steps (AdamW has its moments) `megavl.engine.checkpoint.save` writes a complete checkpoint
(DeepSpeed's files, megavl's state, the marker) `REPS` times. Bytes are split into DeepSpeed's
optimizer partitions (`*optim_states.pt`: their total is the same at any world size, one file per
rank) and everything else (model states, teacher, queues, centres, RNG, marker), which must not grow
with the world size: state identical on every rank is written once.

"before" registers the queues and centres as persistent buffers again (in the module's state dict,
so in each rank's `zero_pp_rank_*_model_states.pt`), as megavl did before they were saved once only.
The seconds are the slowest rank's median complete save (barrier to marker), per GB of the state (the
1-rank checkpoint's bytes): the time a SIGTERM save must fit into, which should not grow with the
world size.

    python bench/bench_checkpoint.py [--out benchmarks/checkpoint_bytes_cpu2core_202612.md] [--worlds 1 2 4]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from megavl.config import load_config
from megavl.engine import checkpoint
from megavl.engine.launch import _free_port, init_distributed
from megavl.engine.step import build_engine, step_generator

from harness import DS_CONFIGS, RECIPES, Row, machine_line, synthetic_batch

GLOBAL_BATCH = 8
REPS = 3
QUEUE_4M = {"queue": 65536, "embed": 256, "prototypes": 8192}  # configs/pretrain_4m.yaml
QUICK = {"queue": 4096, "embed": 256, "prototypes": 1024}
ONCE = ("image_queue", "text_queue", "queue_image_ids", "queue_ptr", "center_global", "center_patch")


def _worker(rank: int, world: int, port: int, out: str, shape: dict, before: bool, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = init_distributed()
    micro = GLOBAL_BATCH // world
    cfg = load_config(RECIPES["tiny"], [f"data.batch_size={micro} run.global_batch_size={GLOBAL_BATCH}",
                                        "run.grad_accum=1 run.precision=fp32",
                                        f"objectives.itc.queue_size={shape['queue']}",
                                        f"model.embed_dim={shape['embed']} model.num_prototypes={shape['prototypes']}"])
    torch.manual_seed(0)
    engine, _, stage = build_engine(cfg, str(DS_CONFIGS[3]), world, info.device)
    if before:  # the buffers in the state dict again, as they were registered before
        for module in engine.module.modules():
            module._non_persistent_buffers_set.difference_update(ONCE)
    batch = synthetic_batch(cfg, micro, 24, info.device, seed=rank)
    for step, mode in enumerate(("single", "two")):
        total, _ = engine(batch, mode, step_generator(0, step, 0, info.device))
        engine.backward(total)
        engine.step()
    save_info = checkpoint.SaveInfo(run_id="bench", world_size=world, zero_stage=stage, keep=1, config_yaml="")
    deepspeed_save, deepspeed_seconds = engine.save_checkpoint, []

    def timed_deepspeed_save(*args, **kwargs):  # DeepSpeed's share of the complete save
        start = time.perf_counter()
        out = deepspeed_save(*args, **kwargs)
        deepspeed_seconds.append(time.perf_counter() - start)
        return out

    engine.save_checkpoint = timed_deepspeed_save
    seconds = []
    for rep in range(REPS):
        torch.distributed.barrier()
        start = time.perf_counter()
        checkpoint.save(engine, engine.module, Path(out), 2 + rep, rank, {"data": {}}, save_info)
        seconds.append(time.perf_counter() - start)
    results.put((rank, statistics.median(seconds), statistics.median(deepspeed_seconds)))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def measure(world: int, shape: dict, before: bool = False) -> dict[str, float]:
    """Bytes of the newest checkpoint by kind, and the slowest rank's median save seconds."""
    out = tempfile.mkdtemp(prefix=f"bench_ckpt_w{world}_")
    try:
        ctx = mp.get_context("spawn")
        results = ctx.SimpleQueue()
        mp.start_processes(_worker, args=(world, _free_port(), out, shape, before, results), nprocs=world,
                           join=True, start_method="spawn")
        per_rank = [results.get() for _ in range(world)]
        seconds, deepspeed_seconds = max(r[1] for r in per_rank), max(r[2] for r in per_rank)
        tag = Path(out) / (Path(out) / "latest").read_text().strip()
        files = [p for p in tag.rglob("*") if p.is_file()]
        optim = sum(p.stat().st_size for p in files if p.name.endswith("optim_states.pt"))
        models = sum(p.stat().st_size for p in files if p.name.endswith("model_states.pt"))
        total = sum(p.stat().st_size for p in files)
        return {"optim": optim, "model_states": models, "rest": total - optim, "total": total, "seconds": seconds,
                "deepspeed_seconds": deepspeed_seconds}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def checkpoint_rows(device: torch.device, quick: bool) -> list[Row]:
    """run_all's section: 2 ranks against 1 (the report's 1/2/4 table comes from main)."""
    del device  # CPU ranks either way: the bytes do not depend on the device
    shape = QUICK if quick else QUEUE_4M
    one, two = measure(1, shape), measure(2, shape)
    mib, gb = 2 ** 20, 1e9
    case = f"ZeRO-3, ITC queue {shape['queue']} x {shape['embed']}"
    return [
        Row("checkpoint", f"{case}, all but optimizer partitions", "MiB on disk", two["rest"] / mib,
            one["rest"] / mib, "1 rank", "<= 1.05x",
            note=f"DeepSpeed's optimizer partitions: {two['optim'] / mib:.1f} MiB (2 ranks) vs "
                 f"{one['optim'] / mib:.1f} MiB (1 rank)"),
        Row("checkpoint", f"{case}, complete save", "s per GB of state (SIGTERM must cover)",
            two["seconds"] / (one["total"] / gb), one["seconds"] / (one["total"] / gb), "1 rank", GOAL_NONE,
            note=f"median of {REPS} saves, slowest rank; state {one['total'] / mib:.0f} MiB"),
    ]


GOAL_NONE = ""


def report(worlds: list[int], shape: dict) -> str:
    mib, gb = 2 ** 20, 1e9
    runs = {(w, before): measure(w, shape, before) for w in worlds for before in (True, False)}
    state = runs[(min(worlds), False)]["total"]
    head = ("| ranks | side | model states MiB | all but optimizer partitions MiB | x 1 rank | optimizer "
            "partitions MiB | complete save s | of which DeepSpeed's files s | s per GB of state |")
    lines = [head, "|" + "---|" * 9]
    for w in worlds:
        for before in (True, False):
            r = runs[(w, before)]
            ratio = r["rest"] / runs[(min(worlds), before)]["rest"]
            lines.append(f"| {w} | {'before' if before else 'after'} | {r['model_states'] / mib:.1f} | "
                         f"{r['rest'] / mib:.1f} | {ratio:.3f}x | {r['optim'] / mib:.1f} | {r['seconds']:.2f} | "
                         f"{r['deepspeed_seconds']:.2f} | "
                         f"{r['seconds'] / (state / gb):.2f} |")
    return "\n".join(lines) + f"\n\nState (the {min(worlds)}-rank checkpoint, after): {state / mib:.1f} MiB.\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="markdown file for the table (default: print)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--quick", action="store_true", help="a 4,096-entry queue instead of the 4M recipe's")
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else QUEUE_4M
    started = time.monotonic()
    table = report(args.worlds, shape)
    text = (f"Machine: {machine_line(torch.device('cpu'))}\n\nCommand: `python bench/bench_checkpoint.py "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}` ({time.monotonic() - started:.0f} s)\n\n"
            f"ZeRO-3 (ds_configs/zero3.json), tiny towers, fp32, ITC queue {shape['queue']} x {shape['embed']}, "
            f"{shape['prototypes']} prototypes; median of {REPS} saves, slowest rank.\n\n{table}")
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
