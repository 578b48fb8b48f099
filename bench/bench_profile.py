"""Where a ZeRO-3 2-rank CPU step of the tiny recipe goes: forward, backward (with DeepSpeed's
parameter hooks = per-module gathers/releases, and gradient reduce-scatter), optimizer step, EMA,
data wait and eval; next to the same step under ZeRO-0 (2 ranks), measured in the same run.

    python bench/bench_profile.py [--steps N] [--batch B] [--out DIR]   # writes profile.md/.json

Each rank runs the Trainer's step (tiny recipe, its `data.batch_size` unless --batch, curriculum
alternating, all objectives) on synthetic batches; phase walls are medians over the timed steps
(the slowest rank's). Then rank 0 profiles a further single+two step pair with cProfile: the share of
the forward/backward spent in DeepSpeed's ZeRO-3 module hooks (gathering and releasing parameters)
and gradient reduce-scatter hooks; cProfile inflates Python-heavy parts, so read those as shares.
Data wait and eval are not in this loop: the trainer's StepTimer logs perf/data_wait, and eval is
timed in bench/bench_retrieval.py.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from harness import DS_CONFIGS, RECIPES, REPO, machine_line, synthetic_batch  # noqa: E402

PHASES = ("forward", "backward", "optimizer step", "EMA teacher")
HOOKS = {"_pre_forward_module_hook", "_post_forward_module_hook", "_pre_backward_module_hook",
         "_post_backward_module_hook"}
REDUCE = {"reduce_partition_and_remove_grads", "independent_gradient_partition_epilogue"}


def _worker(rank: int, world: int, port: int, stage: int, steps: int, batch_size: int, sets: list[str], results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from megavl.config import load_config
    from megavl.tasks.curriculum import mode_at
    from megavl.engine.launch import init_distributed
    from megavl.engine.step import build_engine, clear_zero3_grad_partitions, step_generator, zero_fill_unused_grads

    info = init_distributed()
    cfg = load_config(RECIPES["tiny"], [f"data.batch_size={batch_size}", "run.grad_accum=1 run.precision=fp32",
                                        f"run.global_batch_size={batch_size * world}", *sets])
    torch.manual_seed(0)
    engine, _, zstage = build_engine(cfg, str(DS_CONFIGS[stage]), world, info.device)
    module = engine.module
    batch = synthetic_batch(cfg, batch_size, cfg.data.max_text_len, info.device, seed=rank)
    walls: dict[str, list[float]] = {p: [] for p in PHASES}

    def one_step(step: int, record: bool) -> None:
        mode = mode_at(step, 0, cfg.curriculum)
        t0 = time.perf_counter()
        total, _ = engine(batch, mode, step_generator(0, step, 0, info.device))
        t1 = time.perf_counter()
        engine.backward(total)
        t2 = time.perf_counter()
        zero_fill_unused_grads(module, zstage)
        engine.step()
        clear_zero3_grad_partitions(engine, zstage)
        t3 = time.perf_counter()
        module.update_teachers(step, 4 + steps)
        t4 = time.perf_counter()
        if record:
            for name, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                walls[name].append(dt)

    for step in range(2):  # warm-up: one step of each mode
        one_step(step, False)
    for step in range(2, 2 + steps):
        one_step(step, True)
    result = {"walls": {p: statistics.median(v) for p, v in walls.items()}}
    profiler = cProfile.Profile() if rank == 0 else None
    if profiler:
        profiler.enable()
    t0 = time.perf_counter()
    for step in range(2 + steps, 4 + steps):
        one_step(step, False)
    profiled = time.perf_counter() - t0
    if profiler:
        profiler.disable()
        stats = pstats.Stats(profiler).stats
        hooks = sum(v[3] for (f, _, name), v in stats.items() if name in HOOKS and "deepspeed" in f)
        reduce = sum(v[3] for (f, _, name), v in stats.items() if name in REDUCE and "deepspeed" in f)
        own = {}  # self time per DeepSpeed function: where the framework's cost sits
        for (f, line, name), v in stats.items():
            if "deepspeed" in f:
                key = f"{f.split('deepspeed/')[-1]}:{line}({name})"
                own[key] = own.get(key, 0.0) + v[2]
        top = sorted(own.items(), key=lambda kv: -kv[1])[:8]
        result["profiled"] = {"seconds": profiled, "zero3 param hooks": hooks, "zero3 grad reduce": reduce,
                              "deepspeed self time": sum(own.values()), "top deepspeed functions": top}
    results.put((rank, result))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def measure(stage: int, steps: int, batch_size: int, sets: list[str], world: int = 2) -> dict:
    from megavl.engine.launch import _free_port

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world, _free_port(), stage, steps, batch_size, sets, results), nprocs=world,
                       join=True, start_method="spawn")
    per_rank = dict(results.get() for _ in range(world))
    walls = {p: max(per_rank[r]["walls"][p] for r in per_rank) for p in PHASES}
    return {"walls": walls, "step": sum(walls.values()), "profiled": per_rank[0].get("profiled")}


def report(sides: dict[str, dict], batch_size: int, steps: int) -> str:
    lines = [f"Machine: {machine_line(torch.device('cpu'))}", "",
             f"tiny recipe, 2 gloo ranks x 1 thread, micro-batch {batch_size} per rank, synthetic batches, "
             f"median of {steps} steps (alternating single/two), slowest rank", "",
             "| phase | " + " | ".join(f"{name} s" for name in sides) + " |", "|---|" + "---|" * len(sides)]
    for p in PHASES:
        lines.append(f"| {p} | " + " | ".join(f"{s['walls'][p]:.3f}" for s in sides.values()) + " |")
    lines.append("| **step** | " + " | ".join(f"**{s['step']:.3f}**" for s in sides.values()) + " |")
    for name, s in sides.items():
        prof = s.get("profiled")
        if prof:
            lines.append(f"\n{name}, cProfile over 2 steps on rank 0 ({prof['seconds']:.2f} s): ZeRO-3 parameter "
                         f"hooks {prof['zero3 param hooks']:.2f} s ({100 * prof['zero3 param hooks'] / prof['seconds']:.0f}%),"
                         f" gradient reduce {prof['zero3 grad reduce']:.2f} s "
                         f"({100 * prof['zero3 grad reduce'] / prof['seconds']:.0f}%); self time in DeepSpeed's own "
                         f"Python {prof['deepspeed self time']:.2f} s; top: "
                         + ", ".join(f"{k} {v:.2f} s" for k, v in prof["top deepspeed functions"][:5]))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=None, help="micro-batch per rank (default: the recipe's)")
    parser.add_argument("--set", nargs="*", default=[], help="recipe overrides, as train.py's --set")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench")
    args = parser.parse_args(argv)
    from megavl.config import load_config

    batch = args.batch or load_config(RECIPES["tiny"], args.set).data.batch_size
    sides = {"ZeRO-3": measure(3, args.steps, batch, args.set), "ZeRO-0": measure(0, args.steps, batch, args.set)}
    text = report(sides, batch, args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.md").write_text(text)
    (args.out / "profile.json").write_text(json.dumps({"batch": batch, "steps": args.steps, "sets": args.set,
                                                       "sides": sides}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
