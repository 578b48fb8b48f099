"""gather_tokens in Triton: out[b, k] = x[b, ids[b, k]] (+ pos[ids[b, k]]), one memory pass.

Forward reads each kept row of x (and of pos) once and writes the output once, where
``torch.gather`` + ``pos[ids]`` + add would write and re-read two intermediates. Backward
scatter-adds grad_out into grad_x (and grad_pos, summed over the batch) with fp32 atomics, so
repeated ids accumulate; atomics make the low bits of the gradient order-dependent (not bitwise
deterministic). Importing this module imports triton: go through ``megavl_kernels`` instead.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .tiling import row_tiles


@triton.jit
def _gather_fwd_kernel(x_ptr, ids_ptr, pos_ptr, out_ptr, n_rows, K, D,
                       stride_xb, stride_xn, stride_xd, stride_ib, stride_ik, stride_pn, stride_pd,
                       HAS_POS: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    b = (rows // K).to(tl.int64)
    k = (rows % K).to(tl.int64)
    tok = tl.load(ids_ptr + b * stride_ib + k * stride_ik, mask=row_ok, other=0).to(tl.int64)
    ok = row_ok[:, None] & (cols[None, :] < D)
    vals = tl.load(x_ptr + (b * stride_xb + tok * stride_xn)[:, None] + cols[None, :] * stride_xd, mask=ok)
    if HAS_POS:
        # Add in fp32 (fp64 for fp64), round once to x's dtype: what torch does for x + pos.
        pos = tl.load(pos_ptr + (tok * stride_pn)[:, None] + cols[None, :] * stride_pd, mask=ok)
        vals = (vals.to(ACC) + pos.to(ACC)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], vals, mask=ok)


@triton.jit
def _gather_bwd_kernel(grad_out_ptr, ids_ptr, grad_x_ptr, grad_pos_ptr, n_rows, K, N, D,
                       stride_gb, stride_gk, stride_gd, stride_ib, stride_ik,
                       HAS_GRAD_X: tl.constexpr, HAS_GRAD_POS: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    b = (rows // K).to(tl.int64)
    k = (rows % K).to(tl.int64)
    tok = tl.load(ids_ptr + b * stride_ib + k * stride_ik, mask=row_ok, other=0).to(tl.int64)
    ok = row_ok[:, None] & (cols[None, :] < D)
    grad = tl.load(grad_out_ptr + (b * stride_gb + k * stride_gk)[:, None] + cols[None, :] * stride_gd, mask=ok)
    if HAS_GRAD_X:
        dst = grad_x_ptr + (b * N + tok)[:, None] * D + cols[None, :]
        tl.atomic_add(dst, grad.to(grad_x_ptr.dtype.element_ty), mask=ok, sem="relaxed")
    if HAS_GRAD_POS:
        dst = grad_pos_ptr + tok[:, None] * D + cols[None, :]
        tl.atomic_add(dst, grad.to(grad_pos_ptr.dtype.element_ty), mask=ok, sem="relaxed")


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Atomics accumulate in fp32 (fp64 for fp64): bf16/fp16 atomics would round at every add."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gather_forward(x: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    """x (B, N, D), ids (B, K), pos (N, D) or None -> contiguous (B, K, D). Inputs already validated."""
    B, _, D = x.shape
    K = ids.shape[1]
    out = torch.empty(B, K, D, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    t = row_tiles(B * K, D)
    pos_arg = pos if pos is not None else x  # never read when HAS_POS is False
    _gather_fwd_kernel[t.grid](
        x, ids, pos_arg, out, B * K, K, D, *x.stride(), *ids.stride(), *pos_arg.stride()[-2:],
        HAS_POS=pos is not None, ACC=tl.float64 if x.dtype == torch.float64 else tl.float32, ROWS=t.ROWS, BLOCK_D=t.BLOCK_D, num_warps=t.num_warps)
    return out


def gather_backward(grad_out: torch.Tensor, ids: torch.Tensor, N: int, need_x: bool, need_pos: bool
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """grad_out (B, K, D) -> (grad_x (B, N, D) or None, grad_pos (N, D) or None), in grad_out's dtype."""
    B, K, D = grad_out.shape
    acc = accumulator_dtype(grad_out.dtype)
    dev = grad_out.device
    grad_x = torch.zeros(B, N, D, dtype=acc, device=dev) if need_x else None
    grad_pos = torch.zeros(N, D, dtype=acc, device=dev) if need_pos else None
    if grad_out.numel() and (need_x or need_pos):
        t = row_tiles(B * K, D)
        _gather_bwd_kernel[t.grid](
            grad_out, ids, grad_x if need_x else grad_pos, grad_pos if need_pos else grad_x,
            B * K, K, N, D, *grad_out.stride(), *ids.stride(),
            HAS_GRAD_X=need_x, HAS_GRAD_POS=need_pos, ROWS=t.ROWS, BLOCK_D=t.BLOCK_D, num_warps=t.num_warps)
    cast = (lambda g: None if g is None else g.to(grad_out.dtype))
    return cast(grad_x), cast(grad_pos)


class GatherTokens(torch.autograd.Function):
    """Autograd wrapper: forward = gather_forward, backward = atomic scatter-add."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.N = x.shape[1]
        ctx.has_pos = pos is not None
        return gather_forward(x, ids, pos)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (ids,) = ctx.saved_tensors
        need_pos = ctx.has_pos and ctx.needs_input_grad[2]
        grad_x, grad_pos = gather_backward(grad_out, ids, ctx.N, ctx.needs_input_grad[0], need_pos)
        return grad_x, None, grad_pos
