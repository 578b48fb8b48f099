"""ITM negatives: bytes a rank sends + receives per step to get its negatives' tokens, RowPlan's
exchange of the picked rows (exact splits: one host copy of the ids; fixed splits: none) vs a dense
all-gather with gradients, at world 2 and 4.

Real gloo ranks (torch.multiprocessing), the 4M recipe's per-rank ITM shapes: B=8 rows of image
tokens (257 x 768) and text tokens (30 x 768) in bf16 plus the int64 text mask; hard negatives drawn
from random ITC similarities exactly as PretrainModule._fused_pass draws them (one generator, every
rank draws for the global batch). Bytes are counted inside the collectives' wrappers
(`megavl.objectives.distributed.traffic`), forward and backward. Reported: the largest rank's.

    python bench/bench_itm_exchange.py
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megavl.engine.launch import _free_port
from megavl.objectives.distributed import RowPlan, gather_features, traffic
from megavl.objectives.itm import sample_hard_negatives

from harness import Row

B, N_IMAGE, L_TEXT, WIDTH, EMBED = 8, 257, 30, 768, 256


def _worker(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(rank)
    img = torch.randn(B, N_IMAGE, WIDTH, generator=g).bfloat16()
    txt = torch.randn(B, L_TEXT, WIDTH, generator=g).bfloat16()
    mask = torch.ones(B, L_TEXT, dtype=torch.long)
    emb_i, emb_t = torch.randn(B, EMBED, generator=g), torch.randn(B, EMBED, generator=g)
    ids = torch.arange(B) + rank * B
    ids_all = gather_features(ids, with_grad=False)
    sim = gather_features(emb_i, with_grad=False) @ gather_features(emb_t, with_grad=False).t() / 0.07
    gen = torch.Generator().manual_seed(0)
    neg_txt = sample_hard_negatives(sim, ids_all, ids_all, generator=gen).view(world, B)
    neg_img = sample_hard_negatives(sim.t(), ids_all, ids_all, generator=gen).view(world, B)
    out = {}
    for side in ("dense", "exact", "fixed"):
        x_img, x_txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        traffic.reset()
        if side == "dense":
            mine = slice(rank * B, (rank + 1) * B)
            rows_img = gather_features(x_img)[neg_img[rank]]
            rows_txt = gather_features(x_txt)[neg_txt[rank]]
            rows_mask = gather_features(mask, with_grad=False)[neg_txt[rank]]
            del mine
        else:
            img_plan, txt_plan = RowPlan(neg_img, B, side), RowPlan(neg_txt, B, side)
            rows_img, rows_txt = img_plan.gather(x_img), txt_plan.gather(x_txt)
            rows_mask = txt_plan.gather(mask)
        (rows_img.float().sum() + rows_txt.float().sum() + rows_mask.sum() * 0).backward()
        out[side] = sum(traffic.sent.values()) + sum(traffic.received.values())
    results.put((rank, out))
    dist.barrier()
    dist.destroy_process_group()


def measure(world: int) -> dict[str, int]:
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world, _free_port(), results), nprocs=world, join=True, start_method="spawn")
    per_rank = [results.get()[1] for _ in range(world)]
    return {side: max(r[side] for r in per_rank) for side in ("dense", "exact", "fixed")}


def row_bytes() -> tuple[int, int]:
    """Bytes of one row of image tokens, and of one row of text tokens plus its mask."""
    return N_IMAGE * WIDTH * 2, L_TEXT * WIDTH * 2 + L_TEXT * 8


def rows(device: torch.device, quick: bool) -> list[Row]:
    del device, quick  # bytes do not depend on speed; always gloo CPU ranks
    image, text = row_bytes()
    out = []
    for world in (2, 4):
        m = measure(world)
        for side, what in (("exact", "exact splits (host copy)"), ("fixed", "fixed splits (no host copy)")):
            out.append(Row("ITM negatives", f"world {world}, B={B}/rank, 257x768 + 30x768 bf16, {what}",
                           "MB sent+received per rank", m[side] / 1e6, m["dense"] / 1e6,
                           "dense all-gather + all-reduce", "", note="counted in the collectives, fwd + bwd, largest rank"))
    w = 64
    exact = 4 * B * (w - 1) / w * (image + text)  # fwd rows in + out, bwd gradients in + out
    fixed = 4 * B * (w - 1) * (image + text)  # a slot of B rows to and from every other rank, fwd and bwd
    dense = 6 * (w - 1) * B * (image + text)  # ring all-gather 2(W-1)B rows, all-reduce 4(W-1)B rows
    for value, what, how in ((exact, "exact splits", "~4B(W-1)/W rows <= 4B (uniform picks)"),
                             (fixed, "fixed splits", "4B(W-1) rows")):
        out.append(Row("ITM negatives", f"world {w} (formula), B={B}/rank, {what}", "MB sent+received per rank",
                       value / 1e6, dense / 1e6, "dense all-gather + all-reduce", "",
                       note=f"{how}, dense 6(W-1)B rows; row = {image} B image, {text} B text+mask"))
    return out


if __name__ == "__main__":
    for r in rows(torch.device("cpu"), False):
        print(r.as_dict())
