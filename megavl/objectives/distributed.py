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
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
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
