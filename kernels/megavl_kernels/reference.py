"""Plain PyTorch references for the masked-token ops: the semantics every kernel must match.

Shapes: B batch, N tokens (patches), K kept tokens, M masked tokens, D width.
"""
from __future__ import annotations

import torch


def gather_tokens_ref(x: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, N, D), ids (B, K) -> (B, K, D) = x[b, ids[b]] (+ pos[ids[b]] when pos (N, D) is given)."""
    index = ids.long().unsqueeze(-1).expand(-1, -1, x.shape[-1])
    out = torch.gather(x, 1, index)
    if pos is not None:
        out = out + pos[ids.long()]
    return out


def scatter_tokens_ref(kept: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """kept (B, K, D), ids_restore (B, N), mask_token (D,) -> (B, N, D) in original order.

    ids_restore[b, n] is the position of token n in the shuffled order (MAE); positions >= K
    are masked and receive the mask token.
    """
    B, K, D = kept.shape
    N = ids_restore.shape[1]
    padded = torch.cat([kept, mask_token.to(kept.dtype).expand(B, N - K, D)], dim=1)
    index = ids_restore.long().unsqueeze(-1).expand(-1, -1, D)
    return torch.gather(padded, 1, index)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, patch*patch*C), patch pixels in (p, q, c) order as MAE."""
    B, C, H, W = images.shape
    h, w = H // patch, W // patch
    x = images.reshape(B, C, h, patch, w, patch)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(B, h * w, patch * patch * C)


def masked_patch_targets_ref(images: torch.Tensor, ids_masked: torch.Tensor, patch: int,
                             norm_pix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Pixels of the masked patches, (B, M, patch*patch*C); per-patch normalised as MAE when norm_pix."""
    target = gather_tokens_ref(patchify(images, patch), ids_masked)
    if norm_pix and target.numel():
        # Statistics in fp32 for half types; fp64 stays fp64 (an fp32 detour would cost it precision).
        stats = target.to(torch.promote_types(target.dtype, torch.float32))
        mean = stats.mean(dim=-1, keepdim=True)
        var = stats.var(dim=-1, keepdim=True)  # unbiased, as MAE
        target = ((stats - mean) / (var + eps) ** 0.5).to(images.dtype)
    return target
