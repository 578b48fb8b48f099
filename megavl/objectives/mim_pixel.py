"""Pixel masked image modelling loss (MAE, He et al. CVPR 2022; MaskVLM's image reconstruction).

Shapes: B batch, M masked patches, P pixels per patch (patch*patch*C). The targets are the masked
patches' pixels, already per-patch normalised by `megavl_kernels.masked_patch_targets`, so this loss
only sees masked patches and needs no mask.

Clips of T frames (tube masking: the same M positions masked in every frame): what is predicted is
every masked patch of EVERY frame, from the decoder run per frame (tasks/pretrain.py); the
rows are the B*T frames (frame t of sample b at row b*T + t), targets are each frame's own pixels
at the masked positions, normalised per patch as for images. With equal M in every frame the loss
is the mean over the B*T*M (frame, position) patches, i.e. the mean over frames of the per-frame
image loss (T = 1: the image loss itself).
"""
from __future__ import annotations

import torch


def mim_pixel_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over masked patches of the per-patch mean squared error.

    pred (B, M, P) decoder outputs at the masked positions, target (B, M, P) (no gradient); for clips
    B is the number of frame rows B*T (see the module docstring).

        L = 1/(B*M) sum_{b,m} 1/P sum_p (pred[b,m,p] - target[b,m,p])^2

    With equal M per sample (MAE's fixed ratio) this is MAE's `(loss.mean(-1) * mask).sum() / mask.sum()`.
    Computed in at least float32 whatever the input dtype. An empty input raises (nothing to reconstruct).
    """
    if pred.dim() != 3 or pred.shape != target.shape:
        raise ValueError(f"pred and target must both be (B, M, P); got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.numel() == 0:
        raise ValueError(f"no masked patches / pixels to score: shape {tuple(pred.shape)}")
    acc = torch.promote_types(pred.dtype, torch.float32)
    err = (pred.to(acc) - target.detach().to(acc)) ** 2
    return err.mean(dim=-1).mean()
