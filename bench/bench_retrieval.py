"""Retrieval evaluation at scale: 2 ranks vs 1 rank, and the batched ITM re-rank vs a per-query loop.

Inputs: the tiny recipe's model (seed-0 weights, fp32) on N_img random 64 px images and 5 random
captions per image (24 tokens), ITM re-ranking of the top-k (k=16) both ways, two-stream fusion.

  ranks     `retrieval_scores` end to end (embedding + ITC + re-rank) in 1 gloo process vs 2, each
            rank one torch thread, its share of images and texts; the figure is the slowest rank's
            wall time of the call (process start-up and DeepSpeed excluded: a plain replicated model,
            so the row measures the sharding, not ZeRO-3's parameter gathers)
  ceiling   what this machine allows for a perfect split: the same batched re-rank work in 1 process
            vs 2 processes with half the queries each and no communication at all (the 2 vCPUs of a VM
            share the host core's caches and clock: the 2-rank row cannot beat this ratio here)
  re-rank   the re-ranking alone on the same gathered tokens, in this process: `pair_batch` pairs per
            fusion call vs a per-query loop (one fusion call of k pairs per query)
  ZeRO-3    the same two re-rankings on 2 gloo ranks inside a real ZeRO-3 engine, every fusion weight
            partitioned (`stage3_param_persistence_threshold` 0, as every ViT-B/BERT-base matrix is at
            the default 1e5): each fusion call gathers the fusion weights, so the loop's one call per
            query pays one gather of them per query; the queries are split over the ranks alike

  memory    per-rank peak resident memory of one evaluation above its start, before (padded all-gather,
            concatenation, reordering: retrieval_eval_before.py) vs after (row_blocks.py), at 2 and 4
            ranks, in copies of the gathered tokens

`python bench/bench_retrieval.py [--quick] [--images N]` prints the rows; run_all.py calls `rows`.
`python bench/bench_retrieval.py --memory [--images N] [--report FILE]` writes the memory table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megavl.config import OBJECTIVE_NAMES, load_config
from megavl.engine.launch import _free_port, init_distributed
from megavl.tasks import retrieval_eval
from megavl.tasks.retrieval_eval import retrieval_scores
from megavl.tasks.row_blocks import RowBlocks, gather_row_blocks

from harness import RECIPES, REPO, Row, sync

CAPTIONS_PER_IMAGE, TEXT_LEN, K, MODE, PAIR_BATCH = 5, 24, 16, "two", 512
FULL_IMAGES, CPU_IMAGES, QUICK_IMAGES = 1000, 200, 12  # the size; CPU default (about
# 6 ms of CPU per fused pair here: 1,000 images are ~10 min per side); --quick


def tiny_student(image_size: int = 64):
    from megavl.tasks.pretrain import PretrainModule

    cfg = load_config(RECIPES["tiny"], [f"data.max_text_len={TEXT_LEN}", "run.precision=fp32",
                                        f"model.vision.img_size={image_size}", f"data.image_size={image_size}"])
    torch.manual_seed(0)
    module = PretrainModule(cfg.model, cfg.objectives, {m: list(OBJECTIVE_NAMES) for m in ("single", "two")})
    return module.student.eval()


def synthetic_set(num_images: int, batch: int = 64, image_size: int = 64):
    """(image batches, text batches) with dense global indices over the whole set."""
    g = torch.Generator().manual_seed(0)
    num_texts = num_images * CAPTIONS_PER_IMAGE
    images = torch.randn(num_images, 3, image_size, image_size, generator=g)
    ids = torch.randint(1000, 5000, (num_texts, TEXT_LEN), generator=g)
    ids[:, 0] = 101
    mask = (torch.arange(TEXT_LEN)[None] < torch.randint(8, TEXT_LEN + 1, (num_texts,), generator=g)[:, None]).long()
    img = [{"images": images[s:s + batch], "index": torch.arange(s, min(s + batch, num_images))}
           for s in range(0, num_images, batch)]
    txt = [{"input_ids": ids[s:s + batch] * mask[s:s + batch], "attention_mask": mask[s:s + batch],
            "index": torch.arange(s, min(s + batch, num_texts))} for s in range(0, num_texts, batch)]
    return img, txt


def _share(batches: list[dict], rank: int, world: int) -> list[dict]:
    n = len(batches)
    return batches[rank * n // world:(rank + 1) * n // world]


def _rank_worker(rank: int, world: int, port: int, num_images: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = tiny_student()
    img, txt = synthetic_set(num_images)
    img, txt = _share(img, rank, world), _share(txt, rank, world)
    dist.barrier()
    start = time.perf_counter()
    retrieval_scores(model, img, txt, device=torch.device("cpu"), dtype=torch.float32, k=K, mode=MODE,
                     rerank="itm", pair_batch=PAIR_BATCH)
    results.put((rank, time.perf_counter() - start))
    dist.barrier()
    dist.destroy_process_group()


def time_ranks(world: int, num_images: int) -> float:
    """Slowest rank's seconds for one retrieval_scores call over `world` gloo processes."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_rank_worker, args=(world, _free_port(), num_images, results), nprocs=world,
                       join=True, start_method="spawn")
    return max(results.get()[1] for _ in range(world))


def per_query_loop_rerank(model, sim, img_tok, txt_tok, txt_mask, k: int, mode: str):
    """The ITM re-rank written the plain way: one fusion call of k pairs per query."""
    def itm_scores(i_idx, t_idx):
        fused = model.fuse(img_tok[i_idx], txt_tok[t_idx], txt_mask[t_idx], mode)
        logits = model.itm_head(fused.image_global, fused.text_global).float()
        return logits[:, 1] - logits[:, 0]

    i2t = torch.full_like(sim, float("-inf"))
    for i in range(sim.shape[0]):
        top = sim[i].topk(k).indices
        i2t[i, top] = itm_scores(torch.full_like(top, i), top)
    t2i = torch.full_like(sim, float("-inf"))
    for j in range(sim.shape[1]):
        top = sim[:, j].topk(k).indices
        t2i[top, j] = itm_scores(top, torch.full_like(top, j))
    return i2t, t2i


def _ceiling_worker(rank: int, world: int, num_images: int, results) -> None:
    """Batched re-rank of this process's 1/world of the text queries; no process group at all."""
    torch.set_num_threads(1)
    model = tiny_student()
    with torch.no_grad():
        sim, img_tok, txt_tok, txt_mask = _gathered_tokens(model, num_images, torch.device("cpu"))
        rows = sim.t()[rank::world]
        start = time.perf_counter()
        retrieval_eval._rerank(model, rows, False, *_blocks(img_tok, txt_tok, txt_mask), min(K, num_images), MODE,
                               "itm", PAIR_BATCH)
    results.put((rank, time.perf_counter() - start))


def time_ceiling(world: int, num_images: int) -> float:
    """Slowest process's seconds for its 1/world share of the text-query re-rank, all started at once."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_ceiling_worker, args=(world, num_images, results), nprocs=world, join=True,
                       start_method="spawn")
    return max(results.get()[1] for _ in range(world))


def _gathered_tokens(model, num_images: int, device: torch.device):
    """(sim, img_tok, txt_tok, txt_mask) of the whole synthetic set, embedded in this process."""
    img, txt = synthetic_set(num_images)
    _, img_tok, img_emb = retrieval_eval._embed_images(model, img, device, torch.float32)
    _, txt_tok, txt_mask, txt_emb = retrieval_eval._embed_texts(model, txt, device, torch.float32)
    return img_emb @ txt_emb.t(), img_tok, txt_tok, txt_mask


def _blocks(img_tok, txt_tok, txt_mask) -> tuple[RowBlocks, RowBlocks]:
    """The re-rank's inputs: every row already in this process."""
    return RowBlocks.whole(img_tok), RowBlocks.whole(txt_tok, txt_mask)


def _zero3_worker(rank: int, world: int, port: int, num_images: int, reps: int, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import json
    import tempfile

    from megavl.engine.step import build_engine

    info = init_distributed()
    ds = json.loads((REPO / "ds_configs/zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ds, f)
    cfg = load_config(RECIPES["tiny"], [f"data.max_text_len={TEXT_LEN}", "run.precision=fp32", "data.batch_size=8",
                                        f"run.global_batch_size={8 * world}", "run.grad_accum=1"])
    torch.manual_seed(0)
    engine, _, _ = build_engine(cfg, f.name, world, info.device)
    model = engine.module.student.eval()
    k = min(K, num_images)
    times: dict[str, list[float]] = {"loop": [], "batched": []}
    with torch.no_grad():
        sim, img_tok, txt_tok, txt_mask = _gathered_tokens(model, num_images, info.device)
        for _ in range(reps):
            for name, pair_batch in (("loop", k), ("batched", PAIR_BATCH)):  # pair_batch=k: one query per call
                dist.barrier()
                start = time.perf_counter()
                for rows, images_query in ((sim, True), (sim.t(), False)):
                    retrieval_eval._rerank(model, rows, images_query, *_blocks(img_tok, txt_tok, txt_mask), k,
                                           MODE, "itm", pair_batch)
                dist.barrier()
                times[name].append(time.perf_counter() - start)
    if rank == 0:
        results.put({name: statistics.median(t) for name, t in times.items()})
    dist.barrier()
    dist.destroy_process_group()


def time_rerank_zero3(num_images: int, reps: int = 2) -> tuple[float, float]:
    """(batched, loop) median wall seconds of the re-ranking on 2 ranks in a ZeRO-3 engine."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_zero3_worker, args=(2, _free_port(), num_images, reps, results), nprocs=2, join=True,
                       start_method="spawn")
    out = results.get()
    return out["batched"], out["loop"]


@torch.no_grad()
def time_rerank(num_images: int, device: torch.device, reps: int) -> tuple[float, float]:
    """(batched, loop) median seconds of the re-ranking phase on the same tokens, in this process;
    on CPU process CPU time (the machine is shared; one thread), on CUDA wall time with syncs."""
    model = tiny_student().to(device)
    sim, img_tok, txt_tok, txt_mask = _gathered_tokens(model, num_images, device)
    k = min(K, num_images)  # as retrieval_scores clamps it

    def batched():
        retrieval_eval._rerank(model, sim, True, *_blocks(img_tok, txt_tok, txt_mask), k, MODE, "itm", PAIR_BATCH)
        retrieval_eval._rerank(model, sim.t(), False, *_blocks(img_tok, txt_tok, txt_mask), k, MODE, "itm", PAIR_BATCH)

    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times: dict[str, list[float]] = {"loop": [], "batched": []}
    for _ in range(reps):  # interleaved: a neighbour's load hits both sides alike
        for name, fn in (("loop", lambda: per_query_loop_rerank(model, sim, img_tok, txt_tok, txt_mask, k, MODE)),
                         ("batched", batched)):
            sync(device)
            start = clock()
            fn()
            sync(device)
            times[name].append(clock() - start)
    times = {name: statistics.median(t) for name, t in times.items()}
    return times["batched"], times["loop"]


def rows(device: torch.device, quick: bool, num_images: int | None = None) -> list[Row]:
    n = num_images or (QUICK_IMAGES if quick else FULL_IMAGES if device.type == "cuda" else CPU_IMAGES)
    case = f"tiny, {n} images x {n * CAPTIONS_PER_IMAGE} texts, k={min(K, n)}, {MODE}-stream"
    out = []
    if device.type == "cpu":  # ranks = gloo processes on this machine's cores
        one, two = time_ranks(1, n), time_ranks(2, n)
        ceil_one, ceil_two = time_ceiling(1, n), time_ceiling(2, n)
        out.append(Row("retrieval eval", case, "s per eval (2 ranks vs 1)", two, one, "1 rank", "<= 0.6x",
                       note=f"gloo CPU ranks, 1 thread each, wall s of the slowest rank; "
                            f"{(n + n * CAPTIONS_PER_IMAGE) * min(K, n)} re-ranked pairs; this machine's ceiling "
                            f"for a perfect split (next row) {ceil_two / ceil_one:.2f}x"))
        out.append(Row("retrieval eval", case, "machine ceiling: re-rank s, 2 processes vs 1", ceil_two, ceil_one,
                       "1 process", "", note="the same compute split in two with no communication"))
    batched, loop = time_rerank(n, device, reps=1 if n >= 200 else 2)
    clock = "wall s" if device.type == "cuda" else "CPU s"
    return out + [
        Row("retrieval eval", case, f"re-rank {clock}, loop vs batched", loop, batched, f"batched, {PAIR_BATCH} pairs/call",
            ">= 5x", note="megavl column = the per-query loop (one call per query); ratio = speed-up of batching"),
    ] + ([] if device.type != "cpu" else [zero3_row(n, case)])


def zero3_row(n: int, case: str) -> Row:
    batched, loop = time_rerank_zero3(n, reps=1 if n >= 200 else 2)
    return Row("retrieval eval", case, "re-rank wall s in a ZeRO-3 engine, loop vs batched", loop, batched,
               f"batched, {PAIR_BATCH} pairs/call", ">= 5x",
               note="2 gloo ranks, fusion weights partitioned (persistence threshold 0); queries split over "
                    "the ranks on both sides; one fusion call per query gathers the fusion weights per query")


# ------------------------------------------------------------------------- memory: --memory
def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024


MEMORY_BATCH = 16  # small embedding and fused batches: the peak then measures the tokens, not activations
MEMORY_IMAGE_SIZE = 128  # 257 tokens per image: the tokens outweigh the score matrices, as at COCO-5k


@torch.no_grad()
def _gather_tokens_after(model, img, txt, *, device, dtype):
    """Embedding and the gathering of the tokens alone, as retrieval_scores does them."""
    img_index, img_tok, _ = retrieval_eval._embed_images(model, img, device, dtype)
    txt_index, txt_tok, txt_mask, _ = retrieval_eval._embed_texts(model, txt, device, dtype)
    return gather_row_blocks(img_index, img_tok), gather_row_blocks(txt_index, txt_tok, txt_mask)


def _peak_mib(fn, *args, **kwargs) -> float:
    """Peak resident memory of fn(*args) above the resident memory before it (VmHWM reset through
    /proc/self/clear_refs first); what fn returns is dropped before the next measurement."""
    base = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn(*args, **kwargs)
    return _status_mib("VmHWM") - base


def _memory_worker(rank: int, world: int, port: int, num_images: int, before: bool, results) -> None:
    """One rank's peak memory, (gathering the tokens, the whole retrieval_scores call)."""
    from retrieval_eval_before import gather_tokens_before, retrieval_scores_before

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = tiny_student(MEMORY_IMAGE_SIZE)
    img, txt = synthetic_set(num_images, batch=MEMORY_BATCH, image_size=MEMORY_IMAGE_SIZE)
    img, txt = _share(img, rank, world), _share(txt, rank, world)
    gather = gather_tokens_before if before else _gather_tokens_after
    score = retrieval_scores_before if before else retrieval_scores
    cpu = torch.device("cpu")
    dist.barrier()
    gathered = _peak_mib(gather, model, img, txt, device=cpu, dtype=torch.float32)
    dist.barrier()
    whole = _peak_mib(score, model, img, txt, device=cpu, dtype=torch.float32, k=1, mode=MODE, rerank="itm",
                      pair_batch=MEMORY_BATCH)
    results.put((rank, gathered, whole))
    dist.barrier()
    dist.destroy_process_group()


def gathered_mib(num_images: int) -> float:
    """One copy of every gathered token of the synthetic set: image tokens, text tokens and masks."""
    cfg = load_config(RECIPES["tiny"], [f"data.max_text_len={TEXT_LEN}"]).model
    image_tokens = 1 + (MEMORY_IMAGE_SIZE // cfg.vision.patch_size) ** 2
    texts = num_images * CAPTIONS_PER_IMAGE
    return (num_images * image_tokens * cfg.vision.width * 4 + texts * TEXT_LEN * (cfg.text.width * 4 + 8)) / 2**20


def memory_rows(num_images: int, worlds=(2, 4)) -> list[dict]:
    """Per-rank peak memory of the gathering and of one whole retrieval evaluation, before vs after."""
    one_copy = gathered_mib(num_images)
    out = []
    for world in worlds:
        row = {"world": world, "images": num_images, "texts": num_images * CAPTIONS_PER_IMAGE,
               "one_copy_mib": round(one_copy, 1)}
        for name, before in (("before", True), ("after", False)):
            ctx = mp.get_context("spawn")
            results = ctx.SimpleQueue()
            mp.start_processes(_memory_worker, args=(world, _free_port(), num_images, before, results),
                               nprocs=world, join=True, start_method="spawn")
            peaks = [results.get() for _ in range(world)]
            for i, phase in ((1, "gather"), (2, "whole")):
                peak = max(p[i] for p in peaks)
                row[f"{name}_{phase}_mib"], row[f"{name}_{phase}_copies"] = round(peak), round(peak / one_copy, 2)
        out.append(row)
    return out


def memory_report(num_images: int) -> str:
    from harness import machine_line

    lines = ["# Retrieval evaluation: per-rank peak memory of the gathered tokens, before vs after", "",
             f"- **Date:** {time.strftime('%Y-%m-%d')}.",
             f"- **Hardware:** {machine_line(torch.device('cpu'))}; load average {os.getloadavg()[0]:.1f}.",
             f"- **Command:** `cd bench && python bench_retrieval.py --memory --images {num_images} "
             "--report ../benchmarks/eval_memory_cpu2core_202612.md`", "",
             f"The tiny recipe's towers (fp32) at {MEMORY_IMAGE_SIZE} px ({1 + (MEMORY_IMAGE_SIZE // 8) ** 2} tokens "
             f"per image), {num_images} random images and {CAPTIONS_PER_IMAGE} captions each ({TEXT_LEN} tokens), "
             f"embedded {MEMORY_BATCH} per batch, "
             "on W gloo CPU ranks, each with its 1/W share. Each figure is the largest over the ranks of the peak "
             "resident memory (VmHWM, reset through /proc/self/clear_refs) minus the resident memory before, "
             "in MiB and in copies of every gathered token (image tokens, text tokens, masks):", "",
             "- **gather**: embedding this rank's share and gathering every rank's tokens to it;",
             f"- **whole call**: `retrieval_scores` with ITM re-ranking (k=1, {MEMORY_BATCH} pairs per fusion "
             "call): the gathering, the ITC similarity and the two score matrices (N_img x N_txt each; on a GPU "
             "the first moves to host memory before the second is made), the re-rank's activations.", "",
             "Before: a padded all-gather into W buffers, a concatenation and a reordering by index "
             "(`bench/retrieval_eval_before.py`). After: each rank's block broadcast into a buffer of its size, "
             "never concatenated (`megavl/tasks/row_blocks.py`).", "",
             "| W | images | texts | one copy (MiB) | gather, before | gather, after | whole call, before "
             "| whole call, after |", "|---|---|---|---|---|---|---|---|"]
    for r in memory_rows(num_images):
        cells = [f"{r[f'{side}_{phase}_mib']} MiB = {r[f'{side}_{phase}_copies']}x"
                 for phase in ("gather", "whole") for side in ("before", "after")]
        lines.append(f"| {r['world']} | {r['images']} | {r['texts']} | {r['one_copy_mib']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--memory", action="store_true", help="per-rank peak memory, before vs after")
    parser.add_argument("--report", default="", help="with --memory: write the markdown here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.memory:
        text = memory_report(args.images or 1000)
        print(text)
        if args.report:
            with open(args.report, "w") as f:
                f.write(text)
    else:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        for r in rows(dev, args.quick, args.images):
            print(r.as_dict())
