"""ZeRO-3 prefetch trace vs the SemVLP curriculum: step time alternating every step vs in phases.

ZeRO-3 records the order in which submodules fetch their parameters during one step and, once the
same order repeats, prefetches the next modules' parameters ahead of use. A single-stream step and a
two-stream step run different modules (cross-attention only in "two"), so alternating every step
invalidates the trace every step (DeepSpeed's "Invalidate trace cache") and no step ever prefetches.
This measures what that costs: two real ZeRO-3 engines on 2 gloo ranks (tiny recipe), one schedule
alternating [single 1, two 1], the other in phases [single P, two P]; per-step wall time on rank 0
(after a barrier, so both ranks are counted), and the number of trace invalidations (counted by
wrapping the coordinator's `_invalidate_trace`). Steady state of the phased schedule: the steps of
each phase after its first two (one records the trace, the next uses it). A third arm alternates
every step with a trace per fusion mode (megavl/engine/zero3_traces.py, what the trainer does).

    python bench/bench_zero3_curriculum.py [--steps 16] [--phase 8]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megavl.config import load_config
from megavl.engine.launch import _free_port, init_distributed
from megavl.engine.step import build_engine, clear_zero3_grad_partitions, step_generator
from megavl.engine.zero3_traces import TracePerKind

from harness import DS_CONFIGS, RECIPES, Row, synthetic_batch

PER_RANK_BATCH = 8


def _schedule(steps: int, phase: int) -> list[str]:
    return [("single", "two")[(i // phase) % 2] for i in range(steps)]


def _count_invalidations() -> list[int]:
    from deepspeed.runtime.zero import partitioned_param_coordinator as ppc

    counter = [0]
    original = ppc.PartitionedParameterCoordinator._invalidate_trace

    def counted(self):
        counter[0] += 1
        return original(self)

    ppc.PartitionedParameterCoordinator._invalidate_trace = counted
    return counter


def _worker(rank: int, world: int, port: int, steps: int, phase: int, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = init_distributed()
    counter = _count_invalidations()
    cfg = load_config(RECIPES["tiny"], [f"data.batch_size={PER_RANK_BATCH} run.global_batch_size={PER_RANK_BATCH * world}",
                                        "run.grad_accum=1 run.precision=fp32"])
    torch.manual_seed(0)
    engine, _, stage = build_engine(cfg, str(DS_CONFIGS[3]), world, info.device)
    batch = synthetic_batch(cfg, PER_RANK_BATCH, cfg.data.max_text_len, info.device, seed=rank)
    traces = TracePerKind(engine)
    arms = ("alternating", "per_mode", "phases")
    out = {name: {"modes": [], "times": [], "invalidations": 0} for name in arms}
    # A B C C B A: a neighbour's load on the shared machine, or a slow first run, hits all alike.
    for name in arms + arms[::-1]:
        modes = _schedule(steps, phase if name == "phases" else 1)
        before = counter[0]
        times = []
        for step, mode in enumerate(modes):
            traces.use(mode if name == "per_mode" else "shared")
            dist.barrier()
            start = time.perf_counter()
            total, _ = engine(batch, mode, step_generator(0, step, 0, info.device))
            engine.backward(total)
            engine.step()
            clear_zero3_grad_partitions(engine, stage)
            engine.module.update_teachers(step, len(modes))
            dist.barrier()
            times.append(time.perf_counter() - start)
        out[name]["modes"] += modes
        out[name]["times"] += times
        out[name]["invalidations"] += counter[0] - before
    if rank == 0:
        results.put(out)
    dist.barrier()
    dist.destroy_process_group()


def steady(run: dict, phase: int) -> dict[str, float]:
    """Median step time per mode, skipping the first two steps of every phase (every step of the
    alternating schedule counts, but the first two of each run)."""
    by_mode: dict[str, list[float]] = {"single": [], "two": []}
    steps = len(run["modes"]) // 2
    for i, (mode, t) in enumerate(zip(run["modes"], run["times"])):
        if (i % phase >= 2) if phase > 1 else (i % steps >= 2):
            by_mode[mode].append(t)
    return {mode: statistics.median(ts) for mode, ts in by_mode.items()}


def _mean_after_warmup(times: list[float], steps: int) -> float:
    return statistics.mean(t for i, t in enumerate(times) if i % steps >= 2)


def measure(steps: int = 16, phase: int = 8) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(2, _free_port(), steps, phase, results), nprocs=2, join=True,
                       start_method="spawn")
    out = results.get()
    out["alternating"]["steady"] = steady(out["alternating"], 1)
    out["per_mode"]["steady"] = steady(out["per_mode"], 1)
    out["phases"]["steady"] = steady(out["phases"], phase)
    return out


def rows(device: torch.device, quick: bool, steps: int | None = None, phase: int | None = None) -> list[Row]:
    del device  # always 2 CPU ranks on gloo
    steps, phase = steps or (6 if quick else 16), phase or (3 if quick else 8)
    r = measure(steps, phase)
    alt, per, ph = r["alternating"], r["per_mode"], r["phases"]
    note = (f"ZeRO-3, 2 gloo ranks, tiny, batch {PER_RANK_BATCH}/rank, fp32; 2 runs of {steps} steps each "
            f"(A B C C B A); trace invalidations: one shared trace {alt['invalidations']}, a trace per mode "
            f"{per['invalidations']}, phases of {phase} {ph['invalidations']}")
    out = []
    for name, arm, goal in (("alternating, one shared trace", alt, ""), ("alternating, a trace per mode", per,
                                                                          "<= 1.05x")):
        out += [Row("ZeRO-3 curriculum", f"{name}: {mode}-stream step, steady state", "s/step", arm["steady"][mode],
                    ph["steady"][mode], f"phases of {phase}", goal, note=note) for mode in ("single", "two")]
        out.append(Row("ZeRO-3 curriculum", f"{name}: mean step over the schedule", "s/step",
                       _mean_after_warmup(arm["times"], steps), _mean_after_warmup(ph["times"], steps),
                       f"phases of {phase}", goal, note="all steps but the first 2 of each of the 2 runs per schedule"))
    return out


if __name__ == "__main__":
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--phase", type=int, default=8)
    args = parser.parse_args()
    result = measure(args.steps, args.phase)
    print(json.dumps(result, indent=1))
