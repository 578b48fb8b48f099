"""Resuming a ZeRO-3 checkpoint of the 4M recipe's size on another world size: what each rank opens,
reads and holds, and how long it takes; the old path (before) beside the current one (after).

    python bench/bench_reshard.py [--recipe 4m|tiny] [--out benchmarks/reshard_cpu2core_202612.md]

The state is the recipe's real parameter and buffer set (ViT-B/16 + BERT-base + fusion + heads, the
EMA teacher, the ITC queues: names and shapes of `PretrainModule`, built once with random weights, no
hub), held by a module built under `deepspeed.zero.Init` so that no rank ever holds it whole. Real
ZeRO-3 engines (gloo, fp32, torch AdamW) on 4 ranks write a checkpoint with megavl's own
`checkpoint_save.save`; 2 ranks resume it (4 -> 2) and save again; 4 ranks resume that (2 -> 4).

Per case:
  readers   each new rank's reads alone, one rank at a time, in a fresh process, the page cache of the
            checkpoint dropped first (posix_fadvise DONTNEED): files opened, tensor bytes asked,
            bytes the kernel read from disk (/proc/self/io read_bytes, readahead included), peak
            memory above the start (VmHWM reset through /proc/self/clear_refs), seconds.
            before: rank 0 first runs DeepSpeed's ds_to_universal (2 workers, as megavl did; timed
            on its own, its files counted), then every rank torch.loads the full fp32 master and both
            Adam moments of every parameter, and re-assembles each teacher tensor from every old
            rank's shard file (one open per tensor per file).
            after: megavl's reads (ds_partitions.open_saved, zero3_shards.ShardFiles), the ranges
            of this rank's new ZeRO-3 partitions only.
  engines   the real resume into W' engines at once (reshard.load + checkpoint.load_module_state):
            slowest rank's seconds, and each rank's opens / bytes / peak memory.
  same world 4 -> 4 teacher reads alone (DeepSpeed's own loader reads each rank's optimizer file).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import REPO, RECIPES, machine_line  # noqa: E402

ZERO3 = REPO / "ds_configs/zero3.json"
MIB = 2 ** 20


# ------------------------------------------------------------------------------ the state's shapes
def model_shapes(recipe: str) -> dict:
    """Names/shapes of the recipe's PretrainModule: trained parameters, the teacher's, buffers."""
    from megavl.config import load_config
    from megavl.models.pretrained import without_init_files
    from megavl.tasks.curriculum import objectives_by_mode
    from megavl.tasks.pretrain import PretrainModule

    cfg = load_config(RECIPES[recipe], [])
    module = PretrainModule(without_init_files(cfg.model), cfg.objectives, objectives_by_mode(cfg.curriculum))
    return {"params": [(n, list(p.shape), p.requires_grad) for n, p in module.named_parameters()],
            "buffers": [(n, list(b.shape), str(b.dtype).removeprefix("torch.")) for n, b in module.named_buffers()]}


class _Node(torch.nn.Module):
    def __init__(self, params: list, buffers: list) -> None:
        super().__init__()
        for leaf, shape, grad in params:
            self.register_parameter(leaf, torch.nn.Parameter(torch.randn(shape) * 0.02, requires_grad=grad))
        for leaf, shape, dtype in buffers:
            self.register_buffer(leaf, torch.zeros(shape, dtype=getattr(torch, dtype)))


def build_holder(shapes: dict) -> torch.nn.Module:
    """A module with exactly these parameter and buffer names (call under zero.Init)."""
    # Every rank must build the same modules in the same order (zero.Init broadcasts each parameter
    # as it is made): module paths in order of first appearance, never a set's order.
    own_params, own_buffers, paths = defaultdict(list), defaultdict(list), {"": None}
    for kind, items in (("p", shapes["params"]), ("b", shapes["buffers"])):
        for name, shape, extra in items:
            parent, _, leaf = name.rpartition(".")
            (own_params if kind == "p" else own_buffers)[parent].append((leaf, shape, extra))
            parts = parent.split(".") if parent else []
            paths.update((".".join(parts[:i]), None) for i in range(len(parts) + 1))
    nodes = {p: _Node(own_params[p], own_buffers[p]) for p in sorted(paths, key=lambda p: (-p.count("."), p))}
    for path in list(paths)[1:]:
        parent, _, leaf = path.rpartition(".")
        nodes[parent].add_module(leaf, nodes[path])
    nodes[""].teacher_master = {}
    return nodes[""]


def ds_config(world: int) -> dict:
    cfg = json.loads(ZERO3.read_text())
    cfg.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, train_batch_size=world,
               gradient_clipping=1.0, bf16={"enabled": False})
    return cfg


# ---------------------------------------------------------------------------------- measuring
def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _disk_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def _drop_cache(folder: Path) -> None:
    for path in Path(folder).rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


class Meter:
    """Seconds, disk bytes read and peak memory above the start of a block: anonymous memory (what the
    block allocates), sampled every 2 ms, and all of it (VmHWM, which also counts the pages of
    memory-mapped files it touched: page cache, given back under pressure)."""

    def __enter__(self) -> "Meter":
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        self.rss0, self.anon0 = _status("VmRSS"), _status("RssAnon")
        self.anon_peak, self._done = self.anon0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.disk0, self.t0 = _disk_read(), time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.002):
            self.anon_peak = max(self.anon_peak, _status("RssAnon"))

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.disk = _disk_read() - self.disk0
        self._done.set()
        self._thread.join()
        self.anon_peak = max(self.anon_peak, _status("RssAnon"))
        self.peak = self.anon_peak - self.anon0
        self.peak_all = _status("VmHWM") - self.rss0


# --------------------------------------------------------------------------- the two read paths
def _partition(numel: int, world: int, rank: int) -> tuple[int, int]:
    size = math.ceil(numel / world)
    start = min(rank * size, numel)
    return start, min(start + size, numel)


def read_after(tag: Path, shapes: dict, rank: int, world: int, teacher_only: bool = False) -> dict:
    """megavl's reads for new rank `rank` of `world`: its ZeRO-3 ranges of every trained parameter's
    fp32 master and moments, the replicated state file, its ranges of the teacher shards."""
    from safetensors.torch import load_file

    from megavl.engine.ds_partitions import KEYS, open_saved
    from megavl.engine.zero3_shards import ShardFiles

    shards = sorted((tag / "megavl").glob("teacher_rank*.safetensors"), key=lambda p: int(p.stem[12:]))
    with open_saved(tag) as saved:
        for name, shape, grad in shapes["params"]:
            if grad and not teacher_only:
                start, stop = _partition(math.prod(shape), world, rank)
                for key in KEYS:
                    saved.read(name, key, start, stop)
        opt = saved.stats
    state = load_file(str(tag / "megavl/state.safetensors"))
    with ShardFiles(shards, home=rank * len(shards) // world) as files:
        for name, shape, _ in shapes["params"]:
            if name.startswith("teacher."):
                numel = math.prod(shape)
                files.read(f"teacher/{name[8:]}", *_partition(numel, world, rank), numel)
        teacher = files.stats
    state_bytes = sum(t.numel() * t.element_size() for t in state.values())
    return {"opens": opt.opens + teacher.opens + 1, "bytes": opt.bytes + teacher.bytes + state_bytes,
            "opt_bytes": opt.bytes, "teacher_bytes": teacher.bytes, "state_bytes": state_bytes,
            "teacher_opens": teacher.opens}


def convert_before(tag: Path) -> dict:
    """The old rank-0 step: DeepSpeed's universal conversion with 2 workers."""
    out = tag.parent / ".reshard" / tag.name
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag),
                    "--output_folder", str(out), "--num_extract_workers", "2", "--num_merge_workers", "2",
                    "--inject_missing_state"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed:\n{proc.stderr[-3000:]}")
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    files = sum(1 for p in out.rglob("*") if p.is_file())
    return {"seconds": seconds, "files_left": files, "written_mib": (after.ru_oublock - before.ru_oublock) * 512 / MIB,
            "peak_mib": after.ru_maxrss / 1024}


def read_before(tag: Path, shapes: dict, rank: int, world: int, teacher_only: bool = False) -> dict:
    """The old reads of every rank: full fp32 + moments of every parameter from the converted folder,
    the state file, each teacher tensor re-assembled from every old shard file (one open each)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    del rank, world  # every rank read the same
    zero = tag.parent / ".reshard" / tag.name / "zero"
    shards = sorted((tag / "megavl").glob("teacher_rank*.safetensors"), key=lambda p: int(p.stem[12:]))
    opens = nbytes = teacher_opens = 0
    for name, _, grad in shapes["params"]:
        if grad and not teacher_only:
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                saved = torch.load(zero / name / f"{key}.pt", map_location="cpu", weights_only=True)
                value = saved["param"] if isinstance(saved, dict) else saved
                opens, nbytes = opens + 1, nbytes + value.numel() * value.element_size()
    state = load_file(str(tag / "megavl/state.safetensors"))
    nbytes += sum(t.numel() * t.element_size() for t in state.values())
    for name, _, grad in shapes["params"]:
        if name.startswith("teacher."):
            pieces = []
            for path in shards:
                with safe_open(str(path), framework="pt") as f:
                    pieces.append(f.get_tensor(f"teacher/{name[8:]}"))
                teacher_opens += 1
            nbytes += sum(p.numel() * p.element_size() for p in pieces)
    return {"opens": opens + teacher_opens + 1, "bytes": nbytes, "teacher_opens": teacher_opens}


def _reader(path: str, tag: str, shapes: dict, rank: int, world: int, teacher_only: bool, results) -> None:
    torch.set_num_threads(1)
    fn = read_after if path == "after" else read_before
    _drop_cache(Path(tag).parent)
    with Meter() as meter:
        out = fn(Path(tag), shapes, rank, world, teacher_only)
    results.put({**out, "seconds": meter.seconds, "disk": meter.disk, "peak": meter.peak, "peak_all": meter.peak_all})


def readers(path: str, tag: Path, shapes: dict, world: int, teacher_only: bool = False) -> list[dict]:
    """Each new rank's reads alone, in its own process, one after the other."""
    ctx = mp.get_context("spawn")
    out = []
    for rank in range(world):
        results = ctx.SimpleQueue()
        proc = ctx.Process(target=_reader, args=(path, str(tag), shapes, rank, world, teacher_only, results))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"{path} reader rank {rank} failed ({proc.exitcode})")
        out.append(results.get())
    return out


# ----------------------------------------------------------------------------------- engines
def _engine_worker(rank: int, world: int, port: int, shapes: dict, job: dict, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import deepspeed

    from megavl.engine import checkpoint, checkpoint_save, reshard
    from megavl.engine.launch import init_distributed

    init_distributed()
    config = ds_config(world)
    with deepspeed.zero.Init(config_dict_or_path=config):
        module = build_holder(shapes)
    trained = [p for p in module.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(trained, lr=1e-4), config=config)
    opt, gen = engine.optimizer, torch.Generator().manual_seed(rank)
    for flat in opt.fp32_partitioned_groups_flat:  # Adam's state as after training (created at the first step)
        opt.optimizer.state[flat] = {"step": torch.tensor(100.0), "exp_avg": torch.randn(flat.shape, generator=gen),
                                     "exp_avg_sq": torch.rand(flat.shape, generator=gen)}
    step, report = 100, {"rank": rank}
    if job.get("load"):
        tag = Path(job["load"])
        named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
        torch.distributed.barrier()
        with Meter() as meter:
            step, opt = reshard.load(engine, named, tag, rank, 3)
            teacher = checkpoint.load_module_state(engine.module, tag, rank, job["old_world"])
            torch.distributed.barrier()
        report.update(seconds=meter.seconds, peak=meter.peak, peak_all=meter.peak_all, opens=opt.opens + teacher.opens,
                      bytes=opt.bytes + teacher.bytes)
    if job.get("save"):
        info = checkpoint_save.SaveInfo(run_id="bench", world_size=world, zero_stage=3, keep=5, config_yaml="")
        start = time.perf_counter()
        checkpoint_save.save(engine, engine.module, Path(job["save"]), step + 1, rank, {"data": {}}, info)
        report["save_seconds"] = time.perf_counter() - start
    results.put(report)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def engines(world: int, shapes: dict, job: dict) -> list[dict]:
    from megavl.engine.launch import _free_port

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_engine_worker, args=(world, _free_port(), shapes, job, results), nprocs=world, join=True,
                       start_method="spawn")
    return sorted((results.get() for _ in range(world)), key=lambda r: r["rank"])


# ------------------------------------------------------------------------------------ the report
def state_sizes(shapes: dict, tag: Path) -> dict:
    trained = [math.prod(s) for _, s, g in shapes["params"] if g]
    teacher = [math.prod(s) for n, s, _ in shapes["params"] if n.startswith("teacher.")]
    return {"P": sum(trained), "n": len(trained), "Pt": sum(teacher), "nt": len(teacher),
            "S": (tag / "megavl/state.safetensors").stat().st_size}


def after_bytes(z: dict, new: int) -> float:
    """Per rank: its 1/W' of 12 B x P (fp32 master + 2 moments) and of the teacher's 4 B x Pt, plus the
    replicated state file (buffers: the ITC queues, centres)."""
    return (12 * z["P"] + 4 * z["Pt"]) / new + z["S"]


def after_opens(old: int, new: int) -> int:
    """Per rank, at most: the parameter shapes, the state file, and for the optimizer and the teacher
    each the old files its new partitions overlap (ceil(W/W') + 1, at most W)."""
    return 2 + 2 * min(old, math.ceil(old / new) + 1)


def before_bytes(z: dict) -> float:
    return 12 * z["P"] + 4 * z["Pt"] + z["S"]


def before_opens(z: dict, old: int) -> int:
    return 3 * z["n"] + old * z["nt"] + 1


def _worst(rows: list[dict], key: str) -> float:
    return max(r[key] for r in rows)


def case_table(name: str, old: int, new: int, z: dict, conv: dict, before: list, after: list, eng: list) -> list[str]:
    goal = 1.2 * 12 * z["P"] / new + 4 * z["Pt"] / new
    lines = [f"### {name}: {old} -> {new} ranks", "",
             "| per rank (worst rank) | before | after | after / before | goal |", "|---|---|---|---|---|"]

    def row(label, b, a, fmt="{:.1f}", goal_text=""):
        ratio = f"{a / b:.3f}x" if b else ""
        lines.append(f"| {label} | {fmt.format(b) if b is not None else '-'} | {fmt.format(a)} | {ratio} | {goal_text} |")

    row("rank 0's conversion, s (the others wait)", conv["seconds"], 0.0, goal_text="none: no conversion")
    row("files the conversion writes (left after merging)", conv["files_left"], 0, "{:.0f}")
    row("files opened", _worst(before, "opens"), _worst(after, "opens"), "{:.0f}")
    row("  of which optimizer files (+ the shapes file after)", _worst(before, "opens") - _worst(before, "teacher_opens") - 1,
        max(r["opens"] - r["teacher_opens"] - 1 for r in after), "{:.0f}", f"<= old world ({old}) + 1")
    row("  of which teacher shard files", _worst(before, "teacher_opens"), _worst(after, "teacher_opens"), "{:.0f}",
        f"<= old world ({old})")
    row("tensor bytes read, MiB", _worst(before, "bytes") / MIB, _worst(after, "bytes") / MIB,
        goal_text=f"<= {goal / MIB:.0f} + state file {z['S'] / MIB:.0f}")
    row("  of which the optimizer state, MiB", 12 * z["P"] / MIB, _worst(after, "opt_bytes") / MIB,
        goal_text=f"<= 1.2 x 12P/W' = {1.2 * 12 * z['P'] / new / MIB:.0f}")
    row("  of which the teacher, MiB", 4 * z["Pt"] / MIB, _worst(after, "teacher_bytes") / MIB,
        goal_text=f"share 4Pt/W' = {4 * z['Pt'] / new / MIB:.0f}")
    row("bytes from disk (cache dropped), MiB", _worst(before, "disk") / MIB, _worst(after, "disk") / MIB)
    row("peak memory above start (allocated), MiB", _worst(before, "peak") / MIB, _worst(after, "peak") / MIB)
    row("peak memory above start (+ mapped file pages), MiB", _worst(before, "peak_all") / MIB,
        _worst(after, "peak_all") / MIB)
    row("seconds, one rank alone", _worst(before, "seconds"), _worst(after, "seconds"))
    before_total = conv["seconds"] + _worst(before, "seconds")
    row("resume wall, s: conversion + slowest rank's reads", before_total, _worst(eng, "seconds"),
        goal_text="after: the real resume of W' engines at once, injection included")
    row("resume, peak memory per rank in the engine (allocated), MiB", None, _worst(eng, "peak") / MIB)
    row("resume, peak memory per rank in the engine (+ mapped file pages), MiB", None, _worst(eng, "peak_all") / MIB)
    lines += ["", f"Formula check: after, bytes per rank predicted {after_bytes(z, new) / MIB:.1f} MiB, measured "
              f"{_worst(after, 'bytes') / MIB:.1f} MiB; opens predicted <= {after_opens(old, new)}, measured "
              f"{_worst(after, 'opens'):.0f}. Before: bytes {before_bytes(z) / MIB:.1f} MiB predicted, "
              f"{_worst(before, 'bytes') / MIB:.1f} measured; opens {before_opens(z, old)} predicted, "
              f"{_worst(before, 'opens'):.0f} measured.", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="4m", choices=sorted(RECIPES))
    parser.add_argument("--out", default=str(REPO / "benchmarks/reshard_cpu2core_202612.md"))
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_reshard_"))
    started = time.perf_counter()
    try:
        shapes = model_shapes(args.recipe)
        four, two = work / "w4" / "checkpoints", work / "w2" / "checkpoints"
        log = lambda msg: print(f"[{time.perf_counter() - started:6.0f} s] {msg}", flush=True)  # noqa: E731
        engines(4, shapes, {"save": str(four)})
        tag4 = four / (four / "latest").read_text().strip()
        z = state_sizes(shapes, tag4)
        log(f"4-rank checkpoint written: P {z['P'] / 1e6:.1f}M trained, teacher {z['Pt'] / 1e6:.1f}M")
        same = {"before": readers("before", tag4, shapes, 4, teacher_only=True),
                "after": readers("after", tag4, shapes, 4, teacher_only=True)}
        conv42 = convert_before(tag4)
        log(f"4 -> 2 conversion {conv42['seconds']:.0f} s")
        before42, after42 = readers("before", tag4, shapes, 2), readers("after", tag4, shapes, 2)
        shutil.rmtree(four / ".reshard", ignore_errors=True)
        eng42 = engines(2, shapes, {"load": str(tag4), "old_world": 4, "save": str(two)})
        log("4 -> 2 done")
        tag2 = two / (two / "latest").read_text().strip()
        conv24 = convert_before(tag2)
        before24, after24 = readers("before", tag2, shapes, 4), readers("after", tag2, shapes, 4)
        shutil.rmtree(two / ".reshard", ignore_errors=True)
        eng24 = engines(4, shapes, {"load": str(tag2), "old_world": 2})
        log("2 -> 4 done")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    write_report(Path(args.out), args.recipe, z, same, (conv42, before42, after42, eng42),
                 (conv24, before24, after24, eng24), time.perf_counter() - started)


def write_report(out: Path, recipe: str, z: dict, same: dict, c42: tuple, c24: tuple, seconds: float) -> None:
    conv = (c42[0], c24[0])
    # conversion seconds = a x fragment files + b x bytes, fitted on the two measured conversions
    files = [old * 3 * z["n"] + 3 * z["n"] for old in (4, 2)]
    per_file = (conv[0]["seconds"] - conv[1]["seconds"]) / (files[0] - files[1])
    per_byte = (conv[1]["seconds"] - per_file * files[1]) / (12 * z["P"])
    conv64 = per_file * (64 * 3 * z["n"] + 3 * z["n"]) + per_byte * 12 * z["P"]
    rate = 12 * z["P"] / 2 / max(_worst(c42[2], "seconds"), 1e-9)
    lines = [f"# Resume on another world size: the {recipe} recipe's ZeRO-3 state, before vs after", "",
             f"- **Date:** {time.strftime('%Y-%m-%d')}", f"- **Hardware:** {machine_line(torch.device('cpu'))}",
             f"- **Command:** `python bench/bench_reshard.py --recipe {recipe}` ({seconds / 60:.1f} min in all)",
             f"- **State:** {z['P'] / 1e6:.1f}M trained parameters in {z['n']} tensors (fp32 master + 2 Adam "
             f"moments = {12 * z['P'] / MIB:.0f} MiB), EMA teacher {z['Pt'] / 1e6:.1f}M in {z['nt']} tensors "
             f"({4 * z['Pt'] / MIB:.0f} MiB, fp32), state file (buffers: ITC queues, centres) {z['S'] / MIB:.0f} MiB.",
             "- **Before:** rank 0 converted with DeepSpeed's `ds_to_universal` while the others waited in a "
             "collective, then every rank read every parameter's full tensors, and re-assembled the teacher "
             "per tensor from every old shard file. **After:** each rank reads its own ranges straight from "
             "the saved files (megavl/engine/ds_partitions.py, zero3_shards.py).",
             "- Readers run one rank at a time, alone, the page cache dropped first; the engine rows are the "
             "real resume of all new ranks at once on the 2 shared cores.", ""]
    lines += case_table("Fewer ranks", 4, 2, z, *c42)
    lines += case_table("More ranks", 2, 4, z, *c24)
    sb, sa = same["before"], same["after"]
    lines += ["### Same world: 4 -> 4 ranks, the teacher's shards (DeepSpeed's own loader reads each rank's "
              "optimizer file)", "", "| per rank (worst rank) | before | after |", "|---|---|---|",
              f"| teacher files opened | {_worst(sb, 'teacher_opens'):.0f} | {_worst(sa, 'teacher_opens'):.0f} |",
              f"| teacher + state bytes, MiB | {_worst(sb, 'bytes') / MIB:.1f} | {_worst(sa, 'bytes') / MIB:.1f} |",
              f"| seconds, alone | {_worst(sb, 'seconds'):.2f} | {_worst(sa, 'seconds'):.2f} |", "",
              "## 64 ranks, extrapolated", "",
              "| per rank | before | after |", "|---|---|---|",
              f"| files opened, 64 -> 32 | {before_opens(z, 64)} | <= {after_opens(64, 32)} |",
              f"| bytes read, 64 -> 32, MiB | {before_bytes(z) / MIB:.0f} | {after_bytes(z, 32) / MIB:.0f} |",
              f"| bytes read, 32 -> 64, MiB | {before_bytes(z) / MIB:.0f} | {after_bytes(z, 64) / MIB:.0f} |",
              f"| conversion files, 64 -> 32 | {64 * 3 * z['n'] + 3 * z['n']} | 0 |",
              f"| conversion seconds, 64 -> 32 (fit: {per_file * 1e3:.2f} ms/file + "
              f"{per_byte * 1e9:.2f} s/GB) | {conv64:.0f} | 0 |",
              f"| reads at this disk's rate ({rate / MIB:.0f} MiB/s), 64 -> 32, s | "
              f"{before_bytes(z) / rate:.0f} | {after_bytes(z, 32) / rate:.1f} |", ""]
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
