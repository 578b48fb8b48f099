"""One rank of test_row_exchange.py: RowPlan's exchange vs the dense gather, forward and gradients.

Usage (env RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set): row_exchange_worker.py OUT_DIR
Writes OUT_DIR/rank{r}.json with the max abs differences and the bytes counted per tag.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megavl.objectives.distributed import RowPlan, gather_features, traffic


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    B, N, D, R = 5, 3, 4, 5
    gen = torch.Generator().manual_seed(1)  # the same wanted ids on every rank
    wanted = torch.randint(0, world * B, (world, R), generator=gen)
    wanted[rank, 0] = wanted[rank, 1]  # a row picked twice: sent once, its gradient counted twice
    wanted[:, 2] = 0  # rank 0's first row wanted by everyone (local on rank 0, remote elsewhere)
    wanted = wanted.clone()
    dist.broadcast(wanted, src=0)
    x0 = torch.randn(B, N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(10 + rank))
    weight = torch.randn(R, N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(20 + rank))
    mask = torch.randint(0, 2, (B, N), generator=torch.Generator().manual_seed(30 + rank))

    dense_x = x0.clone().requires_grad_(True)
    dense = gather_features(dense_x)[wanted[rank]]
    (dense * weight).sum().backward()

    traffic.reset()
    sparse_x = x0.clone().requires_grad_(True)
    plan = RowPlan(wanted, B)
    sparse = plan.gather(sparse_x, "test")
    (sparse * weight).sum().backward()
    sparse_mask = plan.gather(mask, "test/mask")
    dense_mask = gather_features(mask, with_grad=False)[wanted[rank]]

    remote_unique = len({int(i) for i in wanted[rank] if int(i) // B != rank})
    out = {"forward": float((sparse - dense).abs().max()), "grad": float((sparse_x.grad - dense_x.grad).abs().max()),
           "mask_equal": bool(torch.equal(sparse_mask, dense_mask)),
           "received": traffic.received.get("test", 0), "expected_received": remote_unique * N * D * 8,
           "grad_sent": traffic.sent.get("test/grad", 0), "grad_nonzero": float(sparse_x.grad.abs().sum())}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
