"""Cross-rank helpers for contrastive losses: gather features, average statistics.

Shapes: B local batch, W world size. Every helper is the identity (or a no-op average over one
rank) when torch.distributed is not initialised, so losses run unchanged in a notebook.

Pattern from OpenCLIP (`loss.py`, `gather_features`): the gathered tensor keeps the autograd graph
of the LOCAL slice; with `with_grad=True` gradients also flow back to the other ranks' slices
(all_gather's backward is a reduce-scatter of the incoming gradients).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when torch.distributed is available, initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice.

    Each rank computes a loss on the full gathered batch; the total objective is the sum of all
    ranks' losses, so the gradient of this rank's slice is the sum over ranks of their gradients
    w.r.t. that slice: a reduce-scatter (here all_reduce + take the local slice, which works on gloo).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        ctx.rank, ctx.batch = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        local = x.numel() * x.element_size()
        traffic.add("gather", (world - 1) * local, (world - 1) * local)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        world, full = dist.get_world_size(), grad.numel() * grad.element_size()
        ring = 2 * (world - 1) * full // world  # a ring all-reduce sends (and receives) this much per rank
        traffic.add("gather/grad", ring, ring)
        return grad[ctx.rank * ctx.batch:(ctx.rank + 1) * ctx.batch]


def gather_features(x: torch.Tensor, with_grad: bool = True) -> torch.Tensor:
    """Concatenate `x` (B, ...) from all ranks in rank order -> (W*B, ...).

    with_grad=True: gradients flow to every rank's slice, summed across ranks in backward. Every rank
    computes the same global loss L, so the local slice receives W * dL/dx_local; the W-rank gradient
    averaging of DeepSpeed/DDP then yields exactly dL/dtheta (as OpenCLIP with gather_with_grad).
    Backward uses all_reduce, not reduce_scatter, because gloo has no reduce_scatter.
    with_grad=False: the other ranks' slices are constants; the local slice is put back in place so
    it keeps its own autograd graph (OpenCLIP's `local_loss=False, gather_with_grad=False`).
    All ranks must pass the same shape. Identity when not distributed.
    """
    if not is_distributed():
        return x
    if with_grad:
        return _AllGatherWithGrad.apply(x)
    world, rank = dist.get_world_size(), dist.get_rank()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    local = x.numel() * x.element_size()
    traffic.add("gather", (world - 1) * local, (world - 1) * local)
    parts[rank] = x
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of `x` over ranks, detached (`x.detach()` when not distributed)."""
    if not is_distributed():
        return x.detach()
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


# ------------------------------------------------------------------------ selected-row exchange
class Traffic:
    """Bytes this rank sent and received through the collectives of this module, by tag.

    Counted where the collective is issued (payload only, not the small index plans), so a benchmark
    can read what one step moved. The dense gather counts what a ring algorithm moves: all_gather
    sends and receives (W-1)/W of the gathered tensor, all_reduce 2(W-1)/W of it each way."""

    def __init__(self) -> None:
        self.sent: dict[str, int] = {}
        self.received: dict[str, int] = {}

    def add(self, tag: str, sent: int, received: int) -> None:
        self.sent[tag] = self.sent.get(tag, 0) + sent
        self.received[tag] = self.received.get(tag, 0) + received

    def reset(self) -> None:
        self.sent.clear()
        self.received.clear()


traffic = Traffic()


def _row_bytes(x: torch.Tensor) -> int:
    return (x.numel() // max(1, x.shape[0])) * x.element_size()


class RowPlan:
    """Who sends which rows to whom, so that every rank gets `x_global[wanted[rank]]` while moving
    only the rows it picked (not every rank's whole tensor).

    wanted_WR (W, R) long: row ids into the rank-ordered concatenation of all ranks' (B, ...) tensors,
    row r of it the ids rank r wants. Every rank passes the SAME wanted (the ITM negatives are drawn
    alike on every rank), so no index exchange is needed; the plan is built on the host (one small
    device-to-host copy of the W*R ids). A row wanted twice by one rank is sent once.

    Per rank and step, for one (B, ...) tensor: received <= R rows (the wanted rows that live on other
    ranks; R (W-1)/W on average for uniform picks) and, in backward, the same rows' gradients sent back;
    sent = the rows others want from this rank (R (W-1)/W on average). Independent of W for fixed R,
    where all_gather + all_reduce of the dense tensor moves about 3 (W-1) B rows.
    """

    def __init__(self, wanted_WR: torch.Tensor, batch: int) -> None:
        rank, world = dist.get_rank(), dist.get_world_size()
        wanted = wanted_WR.detach().to("cpu", torch.long)
        if wanted.dim() != 2 or wanted.shape[0] != world:
            raise ValueError(f"wanted must be (W={world}, R); got {tuple(wanted.shape)}")
        if wanted.numel() and (int(wanted.min()) < 0 or int(wanted.max()) >= world * batch):
            raise IndexError(f"wanted row ids must lie in [0, {world * batch})")
        self.rank, self.world, self.batch = rank, world, batch
        # Unique rows per requesting rank, sorted: grouped by owner in rank order (all_to_all's order).
        uniques = [torch.unique(wanted[r], sorted=True) for r in range(world)]
        owners = [u // batch for u in uniques]
        # What this rank sends: for each destination d != rank, the local ids of its rows d wants.
        send_local = [uniques[d][owners[d] == rank] - rank * batch if d != rank else torch.empty(0, dtype=torch.long)
                      for d in range(world)]
        self.send_splits = [len(s) for s in send_local]
        self.send_local = torch.cat(send_local)
        mine, mine_owner = uniques[rank], owners[rank]
        self.recv_splits = [int((mine_owner == q).sum()) if q != rank else 0 for q in range(world)]
        is_local = mine_owner == rank
        self.local_ids = mine[is_local] - rank * batch
        # combined = [local rows ; received rows (in owner order)]; position of every unique row in it.
        position = torch.empty(len(mine), dtype=torch.long)
        position[is_local] = torch.arange(int(is_local.sum()))
        position[~is_local] = int(is_local.sum()) + torch.arange(int((~is_local).sum()))
        inverse = torch.searchsorted(mine, wanted[rank])
        self.take = position[inverse]  # (R,) into combined

    def gather(self, x: torch.Tensor, tag: str = "rows") -> torch.Tensor:
        """x (B, ...) this rank's rows -> (R, ...) = x_global[wanted[rank]]; gradients flow back to the
        owners' rows (the owner sums every rank's gradient for a row, as the dense gather's backward)."""
        if x.shape[0] != self.batch:
            raise ValueError(f"x has {x.shape[0]} rows; the plan was built for batch {self.batch}")
        dev = x.device
        received = _ExchangeRows.apply(x, self, tag) if x.requires_grad else _exchange(x, self, tag, forward=True)
        combined = torch.cat([x[self.local_ids.to(dev)], received])
        return combined[self.take.to(dev)]


def _exchange(x: torch.Tensor, plan: RowPlan, tag: str, forward: bool) -> torch.Tensor:
    """Forward: send x[send_local] split by send_splits, receive recv_splits rows. Backward (x is the
    gradient of the received rows): the reverse, returning the gradients owed to this rank's sent rows."""
    send_splits, recv_splits = (plan.send_splits, plan.recv_splits) if forward else (plan.recv_splits, plan.send_splits)
    payload = x[plan.send_local.to(x.device)] if forward else x
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, payload.contiguous(), output_split_sizes=recv_splits, input_split_sizes=send_splits)
    row = _row_bytes(x) if x.dim() else x.element_size()
    traffic.add(tag, sum(send_splits) * row, sum(recv_splits) * row)
    return out


class _ExchangeRows(torch.autograd.Function):
    """The remote rows of a RowPlan, with the rows' gradients returned to their owners in backward.

    all_to_all_single with per-rank split sizes (gloo supports it in torch >= 2.x, as NCCL does;
    all_to_all of a tensor list with unequal sizes is refused by gloo)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: RowPlan, tag: str) -> torch.Tensor:  # type: ignore[override]
        ctx.plan, ctx.tag, ctx.shape = plan, tag, x.shape
        return _exchange(x.detach(), plan, tag, forward=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        plan = ctx.plan
        grad_sent = _exchange(grad.contiguous(), plan, f"{ctx.tag}/grad", forward=False)
        grad_x = grad.new_zeros(ctx.shape)
        grad_x.index_add_(0, plan.send_local.to(grad.device), grad_sent)
        return grad_x, None, None

