"""masked_patch_targets in Triton: MAE's pixel targets read straight from the images.

One program per masked patch (b, m): it loads the patch's C x p x p pixels in image order
(c, i, j), where j runs along W so the loads are contiguous runs of p pixels, optionally normalises
them by the patch's own mean and unbiased variance (in fp32), transposes the tile in registers to
patchify's (i, j, c) order and writes one contiguous output row. The reference materialises all
N patches (a full copy of the images) and then gathers M of them; this reads only the masked
pixels and writes only the output. Targets carry no gradient.
Importing this module imports triton: go through ``megavl_kernels`` instead.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiling import next_power_of_2

MAX_TILE = 1 << 16  # elements of one patch tile (C x p x p, rounded up to powers of two)


@triton.jit
def _patch_targets_kernel(img_ptr, ids_ptr, out_ptr, M, C, P, patches_w, eps,
                          stride_b, stride_c, stride_h, stride_w, stride_ib, stride_im,
                          NORM: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // M
    tok = tl.load(ids_ptr + b * stride_ib + (row % M) * stride_im).to(tl.int64)
    top = (tok // patches_w) * P
    left = (tok % patches_w) * P
    c = tl.arange(0, BLOCK_C)
    i = tl.arange(0, BLOCK_P)
    j = tl.arange(0, BLOCK_P)
    # Image order (c, i, j): contiguous along j.
    ok = (c[:, None, None] < C) & (i[None, :, None] < P) & (j[None, None, :] < P)
    src = (img_ptr + b * stride_b + c[:, None, None] * stride_c + (top + i)[None, :, None] * stride_h
           + (left + j)[None, None, :] * stride_w)
    pix = tl.load(src, mask=ok, other=0.0).to(ACC)
    if NORM:
        count = C * P * P
        mean = tl.sum(pix) / count
        diff = tl.where(ok, pix - mean, 0.0)
        var = tl.sum(diff * diff) / (count - 1)  # unbiased, as torch.var in MAE
        pix = diff / tl.sqrt(var + eps)
    # Patch order (i, j, c), as patchify: contiguous along the whole output row.
    pix = tl.permute(pix, (1, 2, 0))
    ok_out = (i[:, None, None] < P) & (j[None, :, None] < P) & (c[None, None, :] < C)
    dst = out_ptr + row * (C * P * P) + (i[:, None, None] * P + j[None, :, None]) * C + c[None, None, :]
    tl.store(dst, pix.to(out_ptr.dtype.element_ty), mask=ok_out)


def patch_targets_forward(images: torch.Tensor, ids_masked: torch.Tensor, patch: int, norm_pix: bool,
                          eps: float) -> torch.Tensor:
    """images (B, C, H, W), ids_masked (B, M) -> (B, M, patch*patch*C). Inputs already validated."""
    B, C, _, W = images.shape
    M = ids_masked.shape[1]
    out = torch.empty(B, M, patch * patch * C, dtype=images.dtype, device=images.device)
    if out.numel() == 0:
        return out
    block_c, block_p = next_power_of_2(C), next_power_of_2(patch)
    if block_c * block_p * block_p > MAX_TILE:
        raise ValueError(f"a {C}x{patch}x{patch} patch is too large for one Triton program "
                         f"(> {MAX_TILE} elements); use the torch backend")
    acc = tl.float64 if images.dtype == torch.float64 else tl.float32
    num_warps = 4 if block_c * block_p * block_p <= 2048 else 8
    _patch_targets_kernel[(B * M,)](
        images, ids_masked, out, M, C, patch, W // patch, eps, *images.stride(), *ids_masked.stride(),
        NORM=norm_pix, ACC=acc, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps)
    return out


class MaskedPatchTargets(torch.autograd.Function):
    """Autograd wrapper that marks the targets non-differentiable (a loss target, never trained)."""

    @staticmethod
    def forward(ctx, images: torch.Tensor, ids_masked: torch.Tensor, patch: int, norm_pix: bool,
                eps: float) -> torch.Tensor:
        out = patch_targets_forward(images, ids_masked, patch, norm_pix, eps)
        ctx.mark_non_differentiable(out)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        raise RuntimeError("masked_patch_targets produces loss targets and has no gradient")
