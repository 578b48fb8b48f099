"""ZeRO-3 memory: per-rank bytes of parameters, gradients and optimizer state, 2 ranks vs 1.

Each side is a real DeepSpeed ZeRO-3 engine (ds_configs/zero3.json, tiny recipe, fp32) in gloo
processes started with torch.multiprocessing; after one training step each rank counts what it holds:

  parameters       its ds_tensor partitions + parameters still resident in full after the step
                   (ZeRO-3 keeps parameters under stage3_param_persistence_threshold gathered)
  gradients        the optimizer's flat gradient-partition buffer
  optimizer state  fp32 master partitions (when not the ds_tensor storage itself) + AdamW moments

The communication buckets (reduce_bucket_size, a fixed size per rank whatever the model) are not
counted: they are a setting, not model state. The reported figure is the largest rank's.
"""
from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp

from megavl.config import load_config
from megavl.engine.launch import _free_port, init_distributed
from megavl.engine.step import build_engine, clear_zero3_grad_partitions, step_generator

from harness import DS_CONFIGS, RECIPES, Row, synthetic_batch

COMPONENTS = ("parameters", "gradients", "optimizer state")
PER_RANK_BATCH = 4


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def rank_state_bytes(engine) -> dict[str, int]:
    """Bytes this rank holds per component (see the module docstring)."""
    opt = engine.optimizer
    params = list(engine.module.parameters())
    partition_ptrs = {p.ds_tensor.data_ptr() for p in params if getattr(p, "ds_tensor", None) is not None}
    param_bytes = sum(_nbytes(p.ds_tensor) for p in params if getattr(p, "ds_tensor", None) is not None)
    param_bytes += sum(_nbytes(p.data) for p in params if p.data.numel() > 0)  # resident in full
    flat_ptrs = {t.data_ptr() for t in getattr(opt, "fp16_partitioned_groups_flat", [])}
    master = sum(_nbytes(t) for t in opt.fp32_partitioned_groups_flat
                 if t.data_ptr() not in flat_ptrs and t.data_ptr() not in partition_ptrs)
    moments = sum(_nbytes(v) for state in opt.optimizer.state.values() for v in state.values()
                  if torch.is_tensor(v) and v.numel() > 1)
    resident = sum(_nbytes(p.data) for p in params if p.data.numel() > 0)
    return {"parameters": param_bytes, "gradients": _nbytes(opt.grad_partitions_flat_buffer),
            "optimizer state": master + moments, "resident": resident}


def _worker(rank: int, world: int, port: int, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = init_distributed()
    global_batch = PER_RANK_BATCH * world
    cfg = load_config(RECIPES["tiny"], [f"data.batch_size={PER_RANK_BATCH} run.global_batch_size={global_batch}",
                                        "run.grad_accum=1 run.precision=fp32"])
    torch.manual_seed(0)
    engine, _, stage = build_engine(cfg, str(DS_CONFIGS[3]), world, info.device)
    batch = synthetic_batch(cfg, PER_RANK_BATCH, 24, info.device, seed=rank)
    for step, mode in enumerate(("single", "two")):  # AdamW allocates its moments at the first step
        total, _ = engine(batch, mode, step_generator(0, step, 0, info.device))
        engine.backward(total)
        engine.step()
        clear_zero3_grad_partitions(engine, stage)
    results.put((rank, rank_state_bytes(engine)))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def measure(world: int) -> dict[str, int]:
    """Largest per-rank bytes of each component (and of the resident parameters) over `world` gloo ranks."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world, _free_port(), results), nprocs=world, join=True, start_method="spawn")
    per_rank = [results.get()[1] for _ in range(world)]
    return {c: max(r[c] for r in per_rank) for c in COMPONENTS + ("resident",)}


def zero3_memory(device: torch.device, quick: bool) -> list[Row]:
    """Rows per component and their total; always on CPU ranks (gloo), where the bytes are the same."""
    del device, quick  # the tiny geometry in both modes: the ratio does not depend on speed
    one, two = measure(1), measure(2)
    notes = {c: "2 ranks vs 1, fp32, after 2 steps" for c in COMPONENTS}
    notes["parameters"] = (f"includes {two['resident'] / 2**20:.1f} MiB (2 ranks) / {one['resident'] / 2**20:.1f} MiB "
                           "(1 rank) kept whole: params under stage3_param_persistence_threshold")
    rows = [Row("ZeRO-3 memory", f"tiny, {c}", "MiB per rank", two[c] / 2**20, one[c] / 2**20, "1 rank",
                "<= 0.55x", note=notes[c]) for c in COMPONENTS]
    rows.append(Row("ZeRO-3 memory", "tiny, total", "MiB per rank", sum(two[c] for c in COMPONENTS) / 2**20,
                    sum(one[c] for c in COMPONENTS) / 2**20, "1 rank", "<= 0.55x",
                    note="params+grads+optimizer state; comm buckets not counted"))
    return rows
