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


def local_rows(batch: int) -> slice:
    """This rank's rows of a tensor of `batch` rows per rank gathered by `gather_features` (all of
    them when not distributed): the rows a contrastive loss computes on this rank (`itc_loss(rows=)`)."""
    if not is_distributed():
        return slice(0, batch)
    rank = dist.get_rank()
    return slice(rank * batch, (rank + 1) * batch)


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


ROW_SPLITS = ("fixed", "exact")


class RowPlan:
    """Who sends which rows to whom, so that every rank gets `x_global[wanted[rank]]` without an
    all-gather of every rank's whole tensor (and an all-reduce of its gradient).

    wanted_WR (W, R) long, on the tensors' device: row ids into the rank-ordered concatenation of
    all ranks' (B, ...) tensors, row r of it the ids rank r wants. Every rank passes the SAME wanted
    (ITM all-gathers each rank's draws), so no index exchange is needed. The exchange is one
    all_to_all_single forward and one backward (each row's gradient goes back to its owner, which
    sums every rank's gradient for a row, as the dense gather's backward does).

    splits="fixed" (no device-to-host copy): every rank sends every rank one slot of R rows, row k
    of the slot for rank d being x[wanted[d, k]] when this rank owns that row and a filler row
    otherwise; rank d keeps row k of the slot from the owner of wanted[d, k]. The sizes are R whatever
    the picks, so the plan is index arithmetic on the device and the host can queue the rest of the
    step while the device draws the ids. Per rank, for one (B, ...) tensor: (W-1) R rows sent and
    received forward, the same backward, buffers of W R rows.
    splits="exact": the plan is built on the host (one device-to-host copy of the W*R ids, which
    waits for the device to have drawn them) and moves only the picked remote rows, a row wanted
    twice by one rank once: about R (W-1)/W rows each way forward and backward (uniform picks),
    independent of W for fixed R. The dense gather moves about 3 (W-1) B rows and holds W B.
    rank/world default to this process group's.
    """

    def __init__(self, wanted_WR: torch.Tensor, batch: int, splits: str = "fixed", rank: int | None = None,
                 world: int | None = None) -> None:
        if splits not in ROW_SPLITS:
            raise ValueError(f"splits must be one of {ROW_SPLITS}; got {splits!r}")
        rank = dist.get_rank() if rank is None else rank
        world = dist.get_world_size() if world is None else world
        if wanted_WR.dim() != 2 or wanted_WR.shape[0] != world:
            raise ValueError(f"wanted must be (W={world}, R); got {tuple(wanted_WR.shape)}")
        wanted = wanted_WR.detach().long()
        if wanted.numel():  # a device-side assert: it does not read the ids on the host
            torch._assert_async(((wanted >= 0) & (wanted < world * batch)).all(),
                                f"wanted row ids must lie in [0, {world * batch})")
        self.rank, self.world, self.batch, self.rows, self.splits = rank, world, batch, wanted.shape[1], splits
        if splits == "fixed":
            owner = torch.div(wanted, batch, rounding_mode="floor")
            # Slot d, row k: the local row rank d wants at k if this rank owns it, else row 0 as filler
            # (rank d returns a zero gradient for it, so adding that back changes nothing).
            self.send_local = torch.where(owner == rank, wanted - rank * batch, torch.zeros_like(wanted)).flatten()
            self.send_splits = self.recv_splits = [self.rows] * world
            self.local_ids = None
            # Row k of what this rank receives: slot owner[rank, k], row k.
            self.take = owner[rank] * self.rows + torch.arange(self.rows, device=wanted.device)  # (R,)
        else:
            self._host_plan(wanted.cpu())

    def _host_plan(self, wanted: torch.Tensor) -> None:
        rank, world, batch = self.rank, self.world, self.batch
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
        self.take = position[torch.searchsorted(mine, wanted[rank])]  # (R,) into combined

    def gather(self, x: torch.Tensor, tag: str = "rows") -> torch.Tensor:
        """x (B, ...) this rank's rows -> (R, ...) = x_global[wanted[rank]]; gradients flow back to the
        owners' rows (the owner sums every rank's gradient for a row, as the dense gather's backward)."""
        if x.shape[0] != self.batch:
            raise ValueError(f"x has {x.shape[0]} rows; the plan was built for batch {self.batch}")
        received = _ExchangeRows.apply(x, self, tag) if x.requires_grad else _exchange(x, self, tag, forward=True)
        if self.local_ids is not None:  # exact splits: the local rows never left
            received = torch.cat([x[self.local_ids.to(x.device)], received])
        return received[self.take.to(x.device)]


def _exchange(x: torch.Tensor, plan: RowPlan, tag: str, forward: bool) -> torch.Tensor:
    """Forward: send x[send_local] split by send_splits, receive recv_splits rows. Backward (x is the
    gradient of the received rows): the reverse, returning the gradients owed to this rank's sent rows."""
    send_splits, recv_splits = (plan.send_splits, plan.recv_splits) if forward else (plan.recv_splits, plan.send_splits)
    payload = x[plan.send_local.to(x.device)] if forward else x
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, payload.contiguous(), output_split_sizes=recv_splits, input_split_sizes=send_splits)
    row = _row_bytes(x) if x.dim() > 1 else x.element_size()
    # A fixed-split slot to this rank itself is a local copy, not traffic.
    traffic.add(tag, (sum(send_splits) - send_splits[plan.rank]) * row, (sum(recv_splits) - recv_splits[plan.rank]) * row)
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
