"""One rank of test_row_exchange.py: the cross-rank pieces of ITC, SCL and ITM against one process.

- RowPlan's exchange (fixed and exact splits) vs the dense gather, forward and gradients, the bytes
  it moved, and the host reads (a device-to-host copy on an accelerator) building and using it made;
- each rank's rows of ITC (in-batch and with the queue + distillation, with and without same-image
  positives) and SCL, in float32 against the gathered columns, vs the float64 loss over the whole
  batch in one process: the mean of the ranks' losses and the gradients DeepSpeed would average;
- ITM negatives drawn by each rank for its rows (itm_pairs) vs the draws of one process over the
  global batch.

Usage (env RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set): row_exchange_worker.py OUT_DIR
Writes OUT_DIR/rank{r}.json with the max abs differences, the bytes counted per tag and the counts.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from megavl.objectives.distributed import RowPlan, all_reduce_mean, gather_features, local_rows, traffic
from megavl.objectives.itc import EMPTY_QUEUE_ID, itc_distill_loss, itc_loss
from megavl.objectives.itm import itm_pairs, sample_hard_negatives, sample_random_negatives
from megavl.objectives.scl import scl_loss

# Calls that read a tensor's values on the host: on an accelerator each is a device-to-host copy
# that waits for the device (unique and nonzero size their output from the values).
HOST_READS = {"__int__", "__float__", "__bool__", "__index__", "item", "tolist", "cpu", "numpy", "nonzero",
              "unique", "unique_consecutive", "masked_select"}


class HostReads(TorchFunctionMode):
    """Counts the calls in HOST_READS and indexing by a boolean tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        bool_index = name == "__getitem__" and torch.is_tensor(args[1]) and args[1].dtype == torch.bool
        if name in HOST_READS or bool_index:
            self.calls.append(name)
        return func(*args, **kwargs)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def _reldiff(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference, relative to the reference's largest magnitude where that exceeds 1 (the
    temperature's gradient is ~1/T^2: float32 resolves it to ~1e-7 of its size, not to 1e-6 absolute)."""
    return _maxdiff(got, ref) / max(1.0, float(ref.abs().max()))


def row_plan_checks(rank: int, world: int, splits: str) -> dict:
    B, N, D, R = 5, 3, 4, 5
    gen = torch.Generator().manual_seed(1)  # the same wanted ids on every rank
    wanted = torch.randint(0, world * B, (world, R), generator=gen)
    wanted[0, 0] = wanted[0, 1]  # a row picked twice: its gradient counted twice
    wanted[:, 2] = 0  # rank 0's first row wanted by everyone (local on rank 0, remote elsewhere)
    x0 = torch.randn(B, N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(10 + rank))
    weight = torch.randn(R, N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(20 + rank))
    mask = torch.randint(0, 2, (B, N), generator=torch.Generator().manual_seed(30 + rank))

    dense_x = x0.clone().requires_grad_(True)
    dense = gather_features(dense_x)[wanted[rank]]
    (dense * weight).sum().backward()

    traffic.reset()
    sparse_x = x0.clone().requires_grad_(True)
    with HostReads() as reads:
        plan = RowPlan(wanted, B, splits)
        sparse = plan.gather(sparse_x, "test")
        (sparse * weight).sum().backward()
        sparse_mask = plan.gather(mask, "test/mask")
    dense_mask = gather_features(mask, with_grad=False)[wanted[rank]]
    remote_unique = len({int(i) for i in wanted[rank] if int(i) // B != rank})
    return {"forward": float((sparse - dense).abs().max()), "grad": float((sparse_x.grad - dense_x.grad).abs().max()),
            "mask_equal": bool(torch.equal(sparse_mask, dense_mask)),
            "received": traffic.received.get("test", 0), "grad_sent": traffic.sent.get("test/grad", 0),
            "expected_received": (remote_unique if splits == "exact" else (world - 1) * R) * N * D * 8,
            "grad_nonzero": float(sparse_x.grad.abs().sum()), "host_reads": len(reads.calls)}


def _compare(out: dict, name: str, world: int, ref_fn, local_fn, tensors, trained: int) -> None:
    """ref_fn(*float64 global tensors, temp) vs local_fn(*float32 local rows, temp) on every rank; the
    first `trained` tensors and the temperature get gradients. Records the loss (mean over ranks, as
    logged), each trained tensor's gradient (x W: a rank's slice receives the sum over ranks of
    their local losses' gradients, W x the global loss's; DeepSpeed divides by W) and the
    temperature's gradient averaged over ranks; each relative to the reference's size where it is > 1."""
    mine = local_rows(tensors[0].shape[0] // world)
    ref = [t.clone().requires_grad_(i < trained) for i, t in enumerate(tensors)]
    temp_ref = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    loss_ref = ref_fn(*ref, temp_ref)
    loss_ref.backward()
    local = [t[mine].float().requires_grad_(i < trained) for i, t in enumerate(tensors)]
    temp = torch.tensor(0.1, requires_grad=True)
    loss = local_fn(*local, temp)
    loss.backward()
    out[f"{name}/loss"] = _reldiff(all_reduce_mean(loss), loss_ref)
    out[f"{name}/grad"] = max(_reldiff(x.grad, world * r.grad[mine]) for x, r in zip(local[:trained], ref))
    if temp.grad is not None:
        out[f"{name}/temperature_grad"] = _reldiff(all_reduce_mean(temp.grad), temp_ref.grad)


def local_rows_checks(rank: int, world: int) -> dict:
    B, E, Q = 3, 8, 5
    n = world * B
    g = torch.Generator().manual_seed(0)  # the same global batch on every rank

    def unit(rows: int) -> torch.Tensor:
        return F.normalize(torch.randn(rows, E, generator=g, dtype=torch.float64), dim=-1)

    img, txt, img_m, txt_m, img_q, txt_q = unit(n), unit(n), unit(n), unit(n), unit(Q), unit(Q)
    ids = torch.randint(0, n // 2 + 1, (n,), generator=g)  # repeated images, across ranks too
    queue_ids = torch.cat([ids[:2], torch.full((Q - 2,), EMPTY_QUEUE_ID)])
    scl = [torch.randn(n, E, generator=g, dtype=torch.float64) for _ in range(4)]
    rows, gf = local_rows(B), gather_features
    out: dict = {}
    for tag, positives in (("", None), ("/same_image", ids)):
        _compare(out, "itc" + tag, world, lambda i, t, T: itc_loss(i, t, T, image_ids=positives),
                 lambda i, t, T: itc_loss(gf(i), gf(t), T, image_ids=positives, rows=rows), [img, txt], 2)
        qids = queue_ids if positives is not None else None
        _compare(out, "itc_queue" + tag, world,
                 lambda i, t, im, tm, T: itc_distill_loss(i, t, im, tm, img_q, txt_q, T, 0.4, positives, qids),
                 lambda i, t, im, tm, T: itc_distill_loss(i, t, gf(im, False), gf(tm, False), img_q.float(),
                                                          txt_q.float(), T, 0.4, positives, qids, rows=rows),
                 [img, txt, img_m, txt_m], 2)
        # SCL: the masked features (first two) train, the targets are detached columns.
        _compare(out, "scl" + tag, world, lambda vm, tm, v, t, T: scl_loss(vm, v, tm, t, 0.1, positives),
                 lambda vm, tm, v, t, T: scl_loss(gf(vm), gf(v, False), gf(tm), gf(t, False), 0.1, positives,
                                                  rows=rows), scl, 2)
    return out


def itm_negatives_checks(rank: int, world: int) -> dict:
    """The rows itm_pairs picks on this rank are the one-process draws over the global batch."""
    B, E = 4, 6
    n = world * B
    g = torch.Generator().manual_seed(3)
    img_emb = F.normalize(torch.randn(n, E, generator=g, dtype=torch.float64), dim=-1)
    txt_emb = F.normalize(torch.randn(n, E, generator=g, dtype=torch.float64), dim=-1)
    ids = torch.arange(n) // 2  # two captions per image, pairs straddling ranks when B is odd
    temp = torch.tensor([0.1], dtype=torch.float64)
    mine = local_rows(B)
    row_id = torch.arange(n, dtype=torch.float64)[mine]
    tokens = row_id[:, None, None].expand(B, 2, 3).contiguous()  # each row's tokens name its global row
    out = {}
    for hard in (True, False):
        images, texts, masks, _ = itm_pairs(tokens, tokens, row_id.long()[:, None].expand(B, 4).contiguous(),
                                            ids[mine], img_emb[mine], txt_emb[mine], temp, hard=hard,
                                            generator=torch.Generator().manual_seed(5))
        draws = torch.rand(2, n, generator=torch.Generator().manual_seed(5))
        if hard:
            sim = img_emb @ txt_emb.t() / temp
            neg_txt = sample_hard_negatives(sim, ids, ids, uniform=draws[0])
            neg_img = sample_hard_negatives(sim.t(), ids, ids, uniform=draws[1])
        else:
            neg_txt = sample_random_negatives(ids, ids, uniform=draws[0])
            neg_img = sample_random_negatives(ids, ids, uniform=draws[1])
        out[f"itm_negatives_equal/hard={hard}"] = (
            torch.equal(images[B:2 * B, 0, 0].long(), neg_img[mine]) and torch.equal(texts[2 * B:, 0, 0].long(),
                                                                                    neg_txt[mine])
            and torch.equal(masks[2 * B:, 0], neg_txt[mine]) and bool((ids[neg_txt[mine]] != ids[mine]).all()))
    return out


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {"plan": {s: row_plan_checks(rank, world, s) for s in ("exact", "fixed")},
           "local_rows": local_rows_checks(rank, world), "itm": itm_negatives_checks(rank, world)}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
