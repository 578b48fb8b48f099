"""The public ops: validate once, then run the Triton kernel or the PyTorch reference.

Every op takes keyword-only ``check`` (range/permutation checks on the indices; one host sync,
see checks.py) and ``backend`` (None reads ``$MEGAVL_KERNELS``; see backend.py). Both backends
return freshly allocated, contiguous outputs with the same values; gradients agree up to
summation order.
"""
from __future__ import annotations

import torch

from .backend import resolve_backend
from .checks import check_gather, check_patch_targets, check_scatter
from .reference import gather_tokens_ref, masked_patch_targets_ref, scatter_tokens_ref


def gather_tokens(x: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor | None = None, *,
                  check: bool = True, backend: str | None = None) -> torch.Tensor:
    """Kept tokens of x, with their position embeddings added in the same pass.

    x (B, N, D) float, ids (B, K) int32/int64 in [0, N) (repeats allowed), pos (N, D) or None
    -> (B, K, D) with out[b, k] = x[b, ids[b, k]] (+ pos[ids[b, k]]).
    Differentiable in x and pos; repeated ids accumulate their gradients.
    """
    check_gather(x, ids, pos, check)
    if resolve_backend(x.device, backend) == "torch":
        return gather_tokens_ref(x, ids, pos)
    from .gather import GatherTokens

    return GatherTokens.apply(x, ids, pos)


def scatter_tokens(kept: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, *,
                   check: bool = True, backend: str | None = None) -> torch.Tensor:
    """The MAE decoder input: kept tokens back in original order, mask tokens elsewhere.

    kept (B, K, D), ids_restore (B, N) a permutation of [0, N) per row, mask_token (D,)
    -> (B, N, D) with out[b, n] = kept[b, r] if r < K else mask_token, r = ids_restore[b, n].
    Differentiable in kept and mask_token (its gradient sums over all masked positions).
    """
    check_scatter(kept, ids_restore, mask_token, check)
    if resolve_backend(kept.device, backend) == "torch":
        return scatter_tokens_ref(kept, ids_restore, mask_token)
    from .scatter import ScatterTokens

    return ScatterTokens.apply(kept, ids_restore, mask_token)


def masked_patch_targets(images: torch.Tensor, ids_masked: torch.Tensor, patch: int, norm_pix: bool = True,
                         eps: float = 1e-6, *, check: bool = True, backend: str | None = None) -> torch.Tensor:
    """MAE reconstruction targets: pixels of the masked patches, read straight from the images.

    images (B, C, H, W), ids_masked (B, M) patch indices in row-major patch order
    -> (B, M, patch*patch*C) in patchify's (p, q, c) order; with norm_pix each row is
    (x - mean) / sqrt(var + eps) over the patch (unbiased var, as MAE). Never carries a gradient.
    """
    check_patch_targets(images, ids_masked, patch, check)
    if resolve_backend(images.device, backend) == "torch":
        with torch.no_grad():
            return masked_patch_targets_ref(images, ids_masked, patch, norm_pix, eps)
    from .patch_targets import MaskedPatchTargets

    return MaskedPatchTargets.apply(images, ids_masked, patch, norm_pix, eps)
