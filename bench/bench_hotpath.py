"""MFU against this machine's own peak, and where a step's time goes.

    python bench/bench_hotpath.py --out benchmarks/hotpath_cpu2core_202612.md [--quick]

Rows (one CPU process, fp32, torch's default thread count, DeepSpeed engine steps as the trainer
runs them: forward, engine.backward, engine.step, EMA teacher; a single- and a two-stream step alternate):
  matmul probe   the figure perf/mfu divides by on a device without a datasheet entry
                 (`engine/peak_probe.py`, measured fresh here, not read from the cache);
  4M step        ViT-B/16 + BERT-base (configs/pretrain_4m.yaml, 256 px), micro-batch 8, ZeRO-0:
                 MFU = analytic FLOPs (tasks/pretrain_flops.py) / (step time x probe);
  tiny step      configs/tiny.yaml (the `make demo` recipe) at its micro-batch, ZeRO-3 and ZeRO-0:
                 MFU, and the ZeRO-3 step's time split by torch.profiler.
Where the time goes (torch.profiler over one step of each mode): matmul kernels (mm/addmm/bmm/
attention), other ATen kernels (self time of every other aten:: op), and the rest of the wall time
(Python, autograd bookkeeping, DeepSpeed hooks); for ZeRO-3 also its cost over ZeRO-0 measured directly.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from megavl.config import load_config
from megavl.engine.peak_probe import PROBE_SIZE, measure_matmul_flops
from megavl.engine.step import build_engine, clear_zero3_grad_partitions, step_generator, zero_fill_unused_grads
from megavl.tasks.pretrain_flops import step_flops

from bench_step import MODES, ensure_distributed
from harness import DS_CONFIGS, RECIPES, machine_line, synthetic_batch

TINY = "tiny step (make demo recipe)"
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product",
              "aten::_flash_attention", "aten::_efficient_attention")


def _engine_step(engine, stage: int, batch: dict, step: int, device: torch.device):
    mode = MODES[step % 2]
    total, _ = engine(batch, mode, step_generator(0, step, 0, device))
    engine.backward(total)
    zero_fill_unused_grads(engine.module, stage)
    engine.step()
    clear_zero3_grad_partitions(engine, stage)
    engine.module.update_teachers(step, step + 100)


def _profile_split(run_two_steps) -> dict[str, float]:
    """Seconds of two steps (one per mode) by category, from one profiled run."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run_two_steps()
        wall = time.perf_counter() - start
    matmul = other = 0.0
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue
        seconds = event.self_cpu_time_total / 1e6
        if event.key.startswith(MATMUL_OPS):
            matmul += seconds
        else:
            other += seconds
    return {"wall": wall, "matmul": matmul, "other_aten": other, "outside_aten": max(0.0, wall - matmul - other)}


def time_recipe(recipe: Path, stage: int, batch_size: int, steps: int, profile_it: bool) -> dict:
    """Median seconds per step (steps per mode, after one warm-up step per mode), the mean analytic
    FLOPs of a step, and optionally the profiler split of a single+two pair of steps."""
    device = torch.device("cpu")
    cfg = load_config(recipe, [f"data.batch_size={batch_size} run.global_batch_size={batch_size} "
                               "run.grad_accum=1 run.precision=fp32"])
    torch.manual_seed(0)
    engine, _, stage = build_engine(cfg, str(DS_CONFIGS[stage]), 1, device)
    text_len = cfg.data.max_text_len
    batch = synthetic_batch(cfg, batch_size, text_len, device)
    for step in range(2):  # warm-up: optimizer state, ZeRO-3's trace
        _engine_step(engine, stage, batch, step, device)
    times, step = [], 2
    for _ in range(steps * 2):
        start = time.perf_counter()
        _engine_step(engine, stage, batch, step, device)
        times.append(time.perf_counter() - start)
        step += 1
    out = {"seconds": statistics.median(times), "min": min(times), "max": max(times)}
    if profile_it:
        state = {"step": step}

        def two_steps() -> None:
            for _ in range(2):
                _engine_step(engine, stage, batch, state["step"], device)
                state["step"] += 1
        out["split"] = _profile_split(two_steps)
    num_mlm = int((batch["mlm_labels"] != -100).sum())
    out["flops"] = statistics.mean(step_flops(cfg.model, cfg.objectives, engine.module.active(m), m, batch_size,
                                              text_len, num_mlm).total for m in MODES)
    out["text_len"] = text_len
    del engine
    return out


def _split_cells(split: dict) -> str:
    wall = split["wall"]
    return ", ".join(f"{name} {split[name] / wall:.0%}" for name in ("matmul", "other_aten", "outside_aten"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="fewer steps, no 4M step")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per mode (default 1 4M, 10 tiny)")
    args = parser.parse_args(argv)
    ensure_distributed()
    device = torch.device("cpu")
    threads = torch.get_num_threads()
    # On a shared machine one probe can read low: probe before and after every case, divide by the best.
    probes = [measure_matmul_flops(device, torch.float32)]
    done: list[tuple[str, int, int, int, dict, float]] = []  # name, stage, batch, steps, timings, peak RSS

    def rows() -> list[tuple[str, ...]]:
        probe = max(probes)
        out = [("matmul probe", f"{PROBE_SIZE['cpu']}^3 fp32 matmul, best repetition in 1 s",
                f"{probe / 1e9:.1f} GFLOP/s", "-", "-",
                f"{threads} torch threads; best of {len(probes)} probes "
                f"({', '.join(f'{p / 1e9:.0f}' for p in probes)}), the MFU divisor")]
        by_case = {}
        for name, stage, batch_size, steps, r, rss in done:
            by_case[(name, stage)] = r
            out.append((name, f"ZeRO-{stage}, micro-batch {batch_size}, L={r['text_len']}, median of {2 * steps}",
                        f"{r['seconds'] * 1e3:.0f} ms/step, {r['flops'] / 1e9:.1f} GFLOP/step "
                        f"({r['flops'] / r['seconds'] / 1e9:.1f} GFLOP/s)",
                        f"{r['flops'] / (r['seconds'] * probe):.1%}", _split_cells(r["split"]),
                        f"range {r['min'] * 1e3:.0f}-{r['max'] * 1e3:.0f} ms, peak RSS {rss:.1f} GiB"))
            z3, z0 = by_case.get((TINY, 3)), by_case.get((TINY, 0))
            if name == TINY and stage == 0 and z3 and z0:
                out.append(("tiny step: ZeRO-3 over ZeRO-0", "same recipe and batch, same process",
                            f"+{(z3['seconds'] - z0['seconds']) * 1e3:.0f} ms/step", "-",
                            f"{(z3['seconds'] - z0['seconds']) / z3['seconds']:.0%} of the ZeRO-3 step", "-"))
        return out

    def write() -> str:  # after every case, so a run cut short keeps what it measured
        lines = [f"# Hot path on CPU: MFU against the matmul probe ({time.strftime('%Y-%m')})", "",
                 f"Hardware: {machine_line(device)}", "",
                 f"Command: `python bench/bench_hotpath.py --out {args.out}{' --quick' if args.quick else ''}`", "",
                 "| row | case | step | MFU (vs probe) | where the time goes (profiled single+two steps) | note |",
                 "|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows()]
        text = "\n".join(lines) + "\n"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        return text

    cases = [(TINY, RECIPES["tiny"], 3, None, args.steps or (3 if args.quick else 10)),
             (TINY, RECIPES["tiny"], 0, None, args.steps or (3 if args.quick else 10))]
    if not args.quick:
        cases.append(("4M step (ViT-B/16 + BERT-base, 256 px)", RECIPES["4m"], 0, 8, args.steps or 1))
    for name, recipe, stage, batch_size, steps in cases:
        batch_size = batch_size or load_config(recipe, []).data.batch_size
        r = time_recipe(recipe, stage, batch_size, steps, profile_it=True)
        probes.append(measure_matmul_flops(device, torch.float32))
        done.append((name, stage, batch_size, steps, r, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20))
        print(rows()[-1], file=sys.stderr, flush=True)
        write()
    print(write())
    return 0


if __name__ == "__main__":
    sys.exit(main())
