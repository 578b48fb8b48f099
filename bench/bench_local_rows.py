"""Contrastive losses per rank: peak memory of each rank's rows against the gathered columns vs the
whole gathered batch on every rank, at world 2 and 4, and the formula at 64.

Real gloo ranks (torch.multiprocessing), ALBEF's per-GPU shapes: B=64 pairs per rank, embeddings of
256, a queue of 65,536, SCL on fusion globals of 768. Each side runs forward + backward of:
  ITC            itc_loss on features gathered with gradient: rows=None (every rank all W*B rows)
                 vs rows=local_rows(B);
  ITC queue      itc_distill_loss with momentum features, queue and same-image positives: gathered
                 online features and all rows vs this rank's online features and rows;
  SCL            scl_loss, both modalities, same-image positives;
  ITM sampling   the hard-negative draws: the W*B x W*B similarities vs this rank's B x W*B.
Memory is measured by a TorchDispatchMode that adds every op output's storage when it is created
(gathers, logits, softmax, saved activations, gradients) and removes it when the storage is freed:
the peak of the bytes the loss itself holds at once, inputs (features, queue) excluded. Reported:
the largest rank's peak.

    python bench/bench_local_rows.py
"""
from __future__ import annotations

import gc
import os
import weakref

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from megavl.engine.launch import _free_port
from megavl.objectives.distributed import gather_features, local_rows
from megavl.objectives.itc import itc_distill_loss, itc_loss
from megavl.objectives.itm import sample_hard_negatives
from megavl.objectives.scl import scl_loss

from harness import Row

B, EMBED, FUSION, QUEUE, TEMP = 64, 256, 768, 65536, 0.07
CASES = ("ITC", "ITC queue + distillation", "SCL", "ITM sampling")
MIB = 2 ** 20


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created by ops inside the block that are still alive, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self._seen:
                    self._seen.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, nbytes)
        return out


def _unit(rows: int, width: int, g: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(rows, width, generator=g), dim=-1)


def _case(name: str, local: bool, rank: int, world: int):
    """(loss closure, leaf tensors) for one side of one case on this rank."""
    g = torch.Generator().manual_seed(rank)
    gq = torch.Generator().manual_seed(0)  # the queue is the same on every rank
    rows = local_rows(B) if local else None
    ids = torch.arange(B) // 2 + rank * B
    if name == "ITC":
        img, txt = _unit(B, EMBED, g).requires_grad_(), _unit(B, EMBED, g).requires_grad_()
        return lambda: itc_loss(gather_features(img), gather_features(txt), TEMP, rows=rows), [img, txt]
    if name == "ITC queue + distillation":
        img, txt = _unit(B, EMBED, g).requires_grad_(), _unit(B, EMBED, g).requires_grad_()
        img_m, txt_m = _unit(B, EMBED, g), _unit(B, EMBED, g)
        img_q, txt_q, qids = _unit(QUEUE, EMBED, gq), _unit(QUEUE, EMBED, gq), torch.full((QUEUE,), -1)

        def loss():
            ids_all = gather_features(ids, with_grad=False)
            im, tm = gather_features(img_m, with_grad=False), gather_features(txt_m, with_grad=False)
            online = (img, txt) if local else (gather_features(img), gather_features(txt))
            return itc_distill_loss(*online, im, tm, img_q, txt_q, TEMP, 0.4, ids_all, qids, rows=rows)
        return loss, [img, txt]
    if name == "SCL":
        vm, tm = torch.randn(B, FUSION, generator=g).requires_grad_(), torch.randn(B, FUSION, generator=g).requires_grad_()
        v, t = torch.randn(B, FUSION, generator=g), torch.randn(B, FUSION, generator=g)
        return (lambda: scl_loss(gather_features(vm), gather_features(v, with_grad=False), gather_features(tm),
                                 gather_features(t, with_grad=False), 0.03,
                                 gather_features(ids, with_grad=False), rows=rows)), [vm, tm]
    img, txt = _unit(B, EMBED, g), _unit(B, EMBED, g)

    def draw():  # the negatives' ids, as itm_pairs draws them (text negatives, then image negatives)
        ids_all = gather_features(ids, with_grad=False)
        img_all, txt_all = gather_features(img, with_grad=False), gather_features(txt, with_grad=False)
        draws = torch.rand(2, world * B, generator=torch.Generator().manual_seed(1))
        if local:
            mine = local_rows(B)
            pair = (img @ txt_all.t() / TEMP, txt @ img_all.t() / TEMP, ids, draws[:, mine])
        else:
            sim = img_all @ txt_all.t() / TEMP
            pair = (sim, sim.t(), ids_all, draws)
        neg_txt = sample_hard_negatives(pair[0], pair[2], ids_all, uniform=pair[3][0])
        neg_img = sample_hard_negatives(pair[1], pair[2], ids_all, uniform=pair[3][1])
        return (neg_txt.sum() + neg_img.sum()).float().requires_grad_()
    return draw, []


def _worker(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = {}
    for name in CASES:
        for local in (False, True):
            loss_fn, leaves = _case(name, local, rank, world)
            gc.collect()
            with LiveBytes() as meter:  # the leaves' gradients are created inside: they count
                loss_fn().backward()
            del leaves
            out[(name, local)] = meter.peak
            dist.barrier()
    results.put((rank, out))
    dist.barrier()
    dist.destroy_process_group()


def measure(world: int) -> dict[tuple[str, bool], int]:
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world, _free_port(), results), nprocs=world, join=True, start_method="spawn")
    per_rank = [results.get()[1] for _ in range(world)]
    return {key: max(r[key] for r in per_rank) for key in per_rank[0]}


def _columns(name: str, world: int) -> int:
    return world * B + (QUEUE if name == "ITC queue + distillation" else 0)


def rows(device: torch.device, quick: bool) -> list[Row]:
    del device, quick  # memory does not depend on speed; always gloo CPU ranks
    out, at4 = [], {}
    for world in (2, 4):
        m = measure(world)
        for name in CASES:
            cols = _columns(name, world)
            out.append(Row(f"local rows: {name}", f"world {world}, B={B}/rank", "peak MiB of the loss per rank",
                           m[(name, True)] / MIB, m[(name, False)] / MIB, "all W*B rows on every rank", "",
                           note=f"B x {cols} logits vs {world * B} x {cols}"))
        at4 = m
    w = 64
    for name in CASES:
        # peak = a * columns + b * rows * columns: the column-sized part (gathered features, the queue
        # copied into the columns) and the logits-sized part (b / 4 fp32 matrices alive at once),
        # fitted to world 4's two sides (rows B and 4B, the same columns), evaluated at 64.
        cols4, cols64 = _columns(name, 4), _columns(name, w)
        b = (at4[(name, False)] - at4[(name, True)]) / (3 * B * cols4)
        a = at4[(name, True)] / cols4 - b * B
        out.append(Row(f"local rows: {name}", f"world {w} (formula), B={B}/rank", "peak MiB of the loss per rank",
                       (a * cols64 + b * B * cols64) / MIB, (a * cols64 + b * w * B * cols64) / MIB,
                       "all W*B rows on every rank", "",
                       note=f"{a:.0f} B x {cols64} columns + {b / 4:.1f} fp32 matrices of B x {cols64} "
                            f"vs {w * B} x {cols64} (fitted at world 4)"))
    return out


if __name__ == "__main__":
    for r in rows(torch.device("cpu"), False):
        print(r.as_dict())
