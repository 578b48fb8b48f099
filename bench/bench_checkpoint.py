"""Checkpoint cost: bytes on disk at 2 ranks vs 1 rank under ZeRO-2, and the save time a SIGTERM must cover.

Each side is a real DeepSpeed ZeRO-2 engine (ds_configs/zero2.json, tiny recipe, fp32) in gloo
processes; after two training steps (AdamW has its moments) `megavl.engine.checkpoint.save` writes a
complete checkpoint (DeepSpeed's files, megavl's state, the marker) `REPS` times. Bytes are split into
DeepSpeed's optimizer partitions (`*optim_states.pt`: their total is the same at any world size, one
file per rank) and everything else (model states, teacher, queues, centres, RNG, marker), which must
not grow with the world size: state identical on every rank is written once (writing the teacher, its
master and both queues from every rank would multiply them by the world size).
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from megavl.config import load_config
from megavl.engine import checkpoint
from megavl.engine.launch import _free_port, init_distributed
from megavl.engine.step import build_engine, step_generator

from harness import DS_CONFIGS, RECIPES, Row, synthetic_batch

GLOBAL_BATCH = 8
REPS = 3


def _worker(rank: int, world: int, port: int, out: str, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = init_distributed()
    micro = GLOBAL_BATCH // world
    cfg = load_config(RECIPES["tiny"], [f"data.batch_size={micro} run.global_batch_size={GLOBAL_BATCH}",
                                        "run.grad_accum=1 run.precision=fp32"])
    torch.manual_seed(0)
    engine, _, stage = build_engine(cfg, str(DS_CONFIGS[2]), world, info.device)
    batch = synthetic_batch(cfg, micro, 24, info.device, seed=rank)
    for step, mode in enumerate(("single", "two")):
        total, _ = engine(batch, mode, step_generator(0, step, 0, info.device))
        engine.backward(total)
        engine.step()
    save_info = checkpoint.SaveInfo(run_id="bench", world_size=world, zero_stage=stage, keep=1, config_yaml="")
    seconds = []
    for rep in range(REPS):
        torch.distributed.barrier()
        start = time.perf_counter()
        checkpoint.save(engine, engine.module, Path(out), 2 + rep, rank, {"data": {}}, save_info)
        seconds.append(time.perf_counter() - start)
    results.put((rank, statistics.median(seconds)))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def measure(world: int) -> dict[str, float]:
    """Bytes of the newest checkpoint by kind, and the slowest rank's median save seconds."""
    out = tempfile.mkdtemp(prefix=f"bench_ckpt_w{world}_")
    try:
        ctx = mp.get_context("spawn")
        results = ctx.SimpleQueue()
        mp.start_processes(_worker, args=(world, _free_port(), out, results), nprocs=world, join=True,
                           start_method="spawn")
        seconds = max(results.get()[1] for _ in range(world))
        tag = Path(out) / (Path(out) / "latest").read_text().strip()
        files = [p for p in tag.rglob("*") if p.is_file()]
        optim = sum(p.stat().st_size for p in files if p.name.endswith("optim_states.pt"))
        return {"optim": optim, "rest": sum(p.stat().st_size for p in files) - optim, "seconds": seconds}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def checkpoint_rows(device: torch.device, quick: bool) -> list[Row]:
    del device, quick  # CPU ranks either way: the bytes do not depend on the device
    one, two = measure(1), measure(2)
    mib = 2 ** 20
    return [
        Row("checkpoint", "tiny ZeRO-2, all but optimizer partitions", "MiB on disk", two["rest"] / mib,
            one["rest"] / mib, "1 rank", "<= 1.1x",
            note=f"DeepSpeed's optimizer partitions: {two['optim'] / mib:.1f} MiB (2 ranks) vs "
                 f"{one['optim'] / mib:.1f} MiB (1 rank)"),
        Row("checkpoint", "tiny ZeRO-2, complete save", "s (SIGTERM must cover)", two["seconds"], one["seconds"],
            "1 rank", GOAL_NONE, note=f"median of {REPS} saves, slowest rank; marker last, after a barrier"),
    ]


GOAL_NONE = ""
