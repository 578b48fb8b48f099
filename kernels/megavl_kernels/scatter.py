"""scatter_tokens in Triton: the MAE decoder input, kept tokens and mask tokens in original order.

out[b, n] = kept[b, r] if r < K else mask_token, with r = ids_restore[b, n]. One pass: each kept
row is read once, the mask token comes from cache, each output row is written once; the reference
writes and re-reads a (B, N, D) concatenation first.

Backward, one pass over grad_out: row n of grad_out goes to grad_kept[b, r] when r < K (a plain
store, no atomics: ids_restore is a permutation, so each kept slot is written exactly once) and
into a per-program fp32 partial sum when r >= K; the partials (a few rows per program, not
B*(N-K) atomics onto one (D,) vector) are then summed into grad_mask_token.
Importing this module imports triton: go through ``megavl_kernels`` instead.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .gather import accumulator_dtype
from .tiling import row_tiles


@triton.jit
def _scatter_fwd_kernel(kept_ptr, restore_ptr, mask_ptr, out_ptr, n_rows, N, K, D,
                        stride_kb, stride_kk, stride_kd, stride_rb, stride_rn, stride_md,
                        ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < D
    b = (rows // N).to(tl.int64)
    n = (rows % N).to(tl.int64)
    src = tl.load(restore_ptr + b * stride_rb + n * stride_rn, mask=row_ok, other=0).to(tl.int64)
    is_kept = row_ok & (src < K)
    kept = tl.load(kept_ptr + (b * stride_kb + src * stride_kk)[:, None] + cols[None, :] * stride_kd,
                   mask=is_kept[:, None] & col_ok[None, :], other=0)
    token = tl.load(mask_ptr + cols * stride_md, mask=col_ok, other=0).to(kept.dtype)
    vals = tl.where(is_kept[:, None], kept, token[None, :])
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], vals,
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _scatter_bwd_kernel(grad_out_ptr, restore_ptr, grad_kept_ptr, partial_ptr, n_rows, N, K, D,
                        stride_gb, stride_gn, stride_gd, stride_rb, stride_rn,
                        HAS_GRAD_KEPT: tl.constexpr, HAS_GRAD_MASK: tl.constexpr,
                        ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < D
    b = (rows // N).to(tl.int64)
    n = (rows % N).to(tl.int64)
    src = tl.load(restore_ptr + b * stride_rb + n * stride_rn, mask=row_ok, other=0).to(tl.int64)
    is_kept = row_ok & (src < K)
    ok = row_ok[:, None] & col_ok[None, :]
    grad = tl.load(grad_out_ptr + (b * stride_gb + n * stride_gn)[:, None] + cols[None, :] * stride_gd,
                   mask=ok, other=0)
    if HAS_GRAD_KEPT:
        tl.store(grad_kept_ptr + (b * K + src)[:, None] * D + cols[None, :],
                 grad.to(grad_kept_ptr.dtype.element_ty), mask=is_kept[:, None] & col_ok[None, :])
    if HAS_GRAD_MASK:
        masked = row_ok & (src >= K)
        acc = tl.where(masked[:, None], grad.to(partial_ptr.dtype.element_ty), 0)
        tl.store(partial_ptr + tl.program_id(0).to(tl.int64) * D + cols, tl.sum(acc, axis=0), mask=col_ok)


def scatter_forward(kept: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """kept (B, K, D), ids_restore (B, N), mask_token (D,) -> contiguous (B, N, D). Inputs already validated."""
    B, K, D = kept.shape
    N = ids_restore.shape[1]
    out = torch.empty(B, N, D, dtype=kept.dtype, device=kept.device)
    if out.numel() == 0:
        return out
    t = row_tiles(B * N, D)
    _scatter_fwd_kernel[t.grid](
        kept, ids_restore, mask_token, out, B * N, N, K, D, *kept.stride(), *ids_restore.stride(),
        mask_token.stride(0), ROWS=t.ROWS, BLOCK_D=t.BLOCK_D, num_warps=t.num_warps)
    return out


def scatter_backward(grad_out: torch.Tensor, ids_restore: torch.Tensor, K: int, mask_dtype: torch.dtype,
                     need_kept: bool, need_mask: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """grad_out (B, N, D) -> (grad_kept (B, K, D) or None, grad_mask_token (D,) or None)."""
    B, N, D = grad_out.shape
    dev = grad_out.device
    # zeros, not empty: with check=False and a non-permutation, untouched slots stay 0, not garbage.
    grad_kept = torch.zeros(B, K, D, dtype=grad_out.dtype, device=dev) if need_kept else None
    grad_mask = torch.zeros(D, dtype=mask_dtype, device=dev) if need_mask else None
    if grad_out.numel() == 0 or not (need_kept or need_mask):
        return grad_kept, grad_mask
    t = row_tiles(B * N, D)
    acc = accumulator_dtype(mask_dtype if mask_dtype == torch.float64 else grad_out.dtype)
    partial = torch.empty(t.grid[0] if need_mask else 1, D, dtype=acc, device=dev)
    _scatter_bwd_kernel[t.grid](
        grad_out, ids_restore, grad_kept if need_kept else partial, partial, B * N, N, K, D,
        *grad_out.stride(), *ids_restore.stride(), HAS_GRAD_KEPT=need_kept, HAS_GRAD_MASK=need_mask,
        ROWS=t.ROWS, BLOCK_D=t.BLOCK_D, num_warps=t.num_warps)
    if need_mask:
        grad_mask = partial.sum(0).to(mask_dtype)
    return grad_kept, grad_mask


class ScatterTokens(torch.autograd.Function):
    """Autograd wrapper: forward = scatter_forward, backward = scatter_backward."""

    @staticmethod
    def forward(ctx, kept: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids_restore)
        ctx.K = kept.shape[1]
        ctx.mask_dtype = mask_token.dtype
        return scatter_forward(kept, ids_restore, mask_token)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (ids_restore,) = ctx.saved_tensors
        grad_kept, grad_mask = scatter_backward(grad_out, ids_restore, ctx.K, ctx.mask_dtype,
                                                ctx.needs_input_grad[0], ctx.needs_input_grad[2])
        return grad_kept, None, grad_mask

