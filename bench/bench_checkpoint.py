"""Checkpoint cost under ZeRO-3: bytes on disk at 1, 2 and 4 ranks, and the save time a signal must cover.

Each case is a real DeepSpeed ZeRO-3 engine (ds_configs/zero3.json, fp32) in gloo processes, with the
4M recipe's ITC queue (objectives.itc.queue_size x model.embed_dim, 65,536 x 256: two 64 MiB fp32
queues and their ids) and SemMIM centres (model.num_prototypes 8,192), the tiny towers or (`--model
small`) ViT-S-sized ones: 384 wide, 6 + 6 + 3 layers, 44M trained parameters. After two training
steps (AdamW has its moments) a complete checkpoint (DeepSpeed's files, megavl's state, the marker)
is written `REPS` times.

--table bytes: bytes split into DeepSpeed's optimizer partitions (`*optim_states.pt`: their total is
the same at any world size, one file per rank) and everything else (model states, teacher, queues,
centres, RNG, marker), which must not grow with the world size. "before" registers the queues and
centres as persistent buffers again (in each rank's `zero_pp_rank_*_model_states.pt`), as megavl
did before they were saved once only.

--table save: the time a stop signal must cover, from the ranks' agreement on the signal (the
all-reduce of `StopFlag.agreed`, every rank released from one barrier) to the tag being complete on
every rank (the last rank's return from the save), per GB of the tag's bytes, with each rank's
phases on one clock (time.perf_counter, CLOCK_MONOTONIC: one axis for all processes of a machine).
"before" is bench/checkpoint_save_before.py (megavl's files after DeepSpeed's, no fsync), "after" is
`checkpoint_save.save`; both sides run on the same engines, alternating rep by rep, each into its own
directory (keep 1, so every save after the first also prunes one tag), after one warm-up save each,
every save starting from a synced page cache (os.sync(), as minutes of training between saves leave it).

    python bench/bench_checkpoint.py [--table bytes|save] [--model tiny|small] [--worlds 1 2 4] [--out FILE]
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
from megavl.engine import checkpoint_save
from megavl.engine.launch import _free_port, init_distributed
from megavl.engine.step import build_engine, step_generator
from megavl.engine.stop import StopFlag

from checkpoint_save_before import save_before
from harness import DS_CONFIGS, RECIPES, Row, machine_line, synthetic_batch

GLOBAL_BATCH = 8
REPS = 5
QUEUE_4M = {"queue": 65536, "embed": 256, "prototypes": 8192}  # configs/pretrain_4m.yaml
QUICK = {"queue": 4096, "embed": 256, "prototypes": 1024}
ONCE = ("image_queue", "text_queue", "queue_image_ids", "queue_ptr", "center_global", "center_patch")
MODELS = {"tiny": [],
          "small": ["model.vision.width=384 model.vision.depth=6 model.vision.heads=6 model.vision.mlp_ratio=4.0",
                    "model.text.width=384 model.text.depth=6 model.text.heads=6 model.text.intermediate=1536",
                    "model.fusion.width=384 model.fusion.depth=3 model.fusion.heads=6 model.fusion.mlp_ratio=4.0",
                    "model.decoder.width=256 model.decoder.depth=1 model.decoder.heads=8"]}
SAVES = {"before": save_before, "after": checkpoint_save.save}


def _worker(rank: int, world: int, port: int, out: str, case: dict, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = init_distributed()
    micro, shape = GLOBAL_BATCH // world, case["shape"]
    cfg = load_config(RECIPES["tiny"], [f"data.batch_size={micro} run.global_batch_size={GLOBAL_BATCH}",
                                        "run.grad_accum=1 run.precision=fp32",
                                        f"objectives.itc.queue_size={shape['queue']}",
                                        f"model.embed_dim={shape['embed']} model.num_prototypes={shape['prototypes']}",
                                        *MODELS[case["model"]]])
    torch.manual_seed(0)
    engine, _, stage = build_engine(cfg, str(DS_CONFIGS[3]), world, info.device)
    if case["persistent_buffers"]:  # the buffers in the state dict again, as they were registered before
        for module in engine.module.modules():
            module._non_persistent_buffers_set.difference_update(ONCE)
    batch = synthetic_batch(cfg, micro, 24, info.device, seed=rank)
    for step, mode in enumerate(("single", "two")):
        total, _ = engine(batch, mode, step_generator(0, step, 0, info.device))
        engine.backward(total)
        engine.step()
    save_info = checkpoint_save.SaveInfo(run_id="bench", world_size=world, zero_stage=stage, keep=1, config_yaml="")
    flag = StopFlag()
    flag.requested = rank == 0  # the signal reached one rank
    records = []
    for rep in range(-1, REPS):  # rep -1: a warm-up save per side (first touch of the page cache), not counted
        for side in (case["sides"] if rep % 2 == 0 else case["sides"][::-1]):
            if rank == 0:
                os.sync()  # each save starts clean: neither side inherits the other's unwritten pages
            torch.distributed.barrier()
            timeline = []
            start = time.perf_counter()
            assert flag.agreed(info.device)
            timeline.append(("stop agreed", start, time.perf_counter()))
            SAVES[side](engine, engine.module, Path(out) / side, 3 + rep, rank, {"data": {}}, save_info,
                        timeline=timeline)
            records.append({"side": side, "rep": rep, "start": start, "timeline": timeline})
    results.put((rank, records))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _tag_bytes(side_dir: Path) -> dict[str, int]:
    tag = side_dir / (side_dir / "latest").read_text().strip()
    files = [p for p in tag.rglob("*") if p.is_file()]
    optim = sum(p.stat().st_size for p in files if p.name.endswith("optim_states.pt"))
    models = sum(p.stat().st_size for p in files if p.name.endswith("model_states.pt"))
    total = sum(p.stat().st_size for p in files)
    return {"optim": optim, "model_states": models, "rest": total - optim, "total": total}


def run_case(world: int, shape: dict, model: str = "tiny", persistent_buffers: bool = False,
             sides: tuple[str, ...] = ("after",)) -> dict[str, dict]:
    """Per side: bytes of its newest tag, the median complete save (the first rank's start to the last
    rank's release from the save's final barrier) and that rep's per-rank timelines, each phase's
    median per rank, DeepSpeed's share."""
    out = tempfile.mkdtemp(prefix=f"bench_ckpt_w{world}_")
    try:
        case = {"shape": shape, "model": model, "persistent_buffers": persistent_buffers, "sides": list(sides)}
        ctx = mp.get_context("spawn")
        results = ctx.SimpleQueue()
        mp.start_processes(_worker, args=(world, _free_port(), out, case, results), nprocs=world, join=True,
                           start_method="spawn")
        by_rank = dict(results.get() for _ in range(world))
        runs = {}
        for side in sides:
            reps = []
            for rep in range(REPS):
                rows = {r: next(x for x in by_rank[r] if x["side"] == side and x["rep"] == rep) for r in by_rank}
                t0 = min(x["start"] for x in rows.values())
                done = [b for x in rows.values() for name, _, b in x["timeline"] if name == "barrier: complete"]
                reps.append({"seconds": max(done) - t0,
                             "timelines": {r: [(name, a - t0, b - t0) for name, a, b in x["timeline"]]
                                           for r, x in rows.items()}})
            median = sorted(reps, key=lambda x: x["seconds"])[len(reps) // 2]
            phases = {r: {name: statistics.median(b - a for rep in reps for n, a, b in rep["timelines"][r]
                                                  if n == name)
                          for name, _, _ in median["timelines"][r]} for r in by_rank}
            runs[side] = {**_tag_bytes(Path(out) / side), "seconds": median["seconds"],
                          "timelines": median["timelines"], "phases": phases,
                          "deepspeed_seconds": max(p["DeepSpeed's files"] for p in phases.values())}
        return runs
    finally:
        shutil.rmtree(out, ignore_errors=True)


def measure(world: int, shape: dict, before: bool = False) -> dict[str, float]:
    """The bytes table's case: today's save, with the queues and centres in the state dict if `before`."""
    return run_case(world, shape, persistent_buffers=before)["after"]


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


def bytes_report(worlds: list[int], shape: dict, model: str) -> str:
    mib, gb = 2 ** 20, 1e9
    runs = {(w, before): run_case(w, shape, model, persistent_buffers=before)["after"]
            for w in worlds for before in (True, False)}
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


# Rank 0's phases, grouped into the columns of the save table (the others are in the timelines).
COLUMNS = {
    "stop agreed": ("stop agreed",),
    "DeepSpeed's files": ("DeepSpeed's files",),
    "megavl's files on the path": ("megavl's files, after DeepSpeed's", "megavl's CPU copies",
                                   "waiting for megavl's files"),
    "fsync": ("fsync this rank's files",),
    "barriers, broadcast": ("tag directory", "barrier: start", "barrier: every rank's files", "barrier: complete"),
    "marker": ("marker", "marker, prune"),
}


def save_report(worlds: list[int], shape: dict, model: str) -> str:
    gb = 1e9
    runs = {w: run_case(w, shape, model, sides=("before", "after")) for w in worlds}
    head = ("| ranks | side | GB | complete save s | s per GB | " + " | ".join(f"rank 0: {c} s" for c in COLUMNS)
            + " | rank 0: megavl's files beside DeepSpeed's s | rank 0: prune after complete s |")
    lines = [head, "|" + "---|" * (7 + len(COLUMNS))]
    for w in worlds:
        for side in ("before", "after"):
            r = runs[w][side]
            phases = r["phases"][0]
            cells = [sum(phases.get(name, 0.0) for name in names) for names in COLUMNS.values()]
            beside = phases.get("megavl's files, beside DeepSpeed's")
            prune = phases.get("prune, after complete")
            lines.append(f"| {w} | {side} | {r['total'] / gb:.3f} | {r['seconds']:.2f} | {r['seconds'] / (r['total'] / gb):.2f} | "
                         + " | ".join(f"{c:.2f}" for c in cells)
                         + f" | {'' if beside is None else f'{beside:.2f}'} | {'' if prune is None else f'{prune:.2f}'} |")
    top = max(worlds)
    for side in ("before", "after"):
        timelines = runs[top][side]["timelines"]
        lines += ["", f"{top} ranks, {side}, the median save: each rank's phases, seconds since the first rank "
                  "left the barrier (start-end)", ""]
        names = [name for name, _, _ in timelines[0]]
        lines += ["| rank | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
        for rank in sorted(timelines):
            spans = {name: (a, b) for name, a, b in timelines[rank]}
            lines.append(f"| {rank} | " + " | ".join(f"{spans[n][0]:.2f}-{spans[n][1]:.2f}" if n in spans else ""
                                                      for n in names) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table", choices=("bytes", "save"), default="bytes")
    parser.add_argument("--model", choices=tuple(MODELS), default="tiny")
    parser.add_argument("--out", type=Path, default=None, help="markdown file for the table (default: print)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--quick", action="store_true", help="a 4,096-entry queue instead of the 4M recipe's")
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else QUEUE_4M
    started = time.monotonic()
    table = (bytes_report if args.table == "bytes" else save_report)(args.worlds, shape, args.model)
    text = (f"Machine: {machine_line(torch.device('cpu'))}\n\nCommand: `python bench/bench_checkpoint.py "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}` ({time.monotonic() - started:.0f} s)\n\n"
            f"ZeRO-3 (ds_configs/zero3.json), {args.model} towers, fp32, ITC queue {shape['queue']} x {shape['embed']}, "
            f"{shape['prototypes']} prototypes; median of {REPS} saves.\n\n{table}")
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
