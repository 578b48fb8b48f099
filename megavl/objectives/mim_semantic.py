"""Semantic masked image modelling: cross-entropy from a centred, sharpened EMA teacher to the student.

SemMIM (Liu et al., LREC-COLING 2024, arXiv 2403.00249) has no public code; following its abstract and
the iBOT/DINO pattern (Zhou et al. ICLR 2022; Caron et al. ICCV 2021) it distils teacher distributions
over a shared K-dim projection space into the student, on the global token (agreement) and on masked
patches (MIM). UNVERIFIED for SemMIM: temperatures (student 0.1, teacher 0.04-0.07) and the centre
momentum 0.9 are iBOT's defaults; they are arguments here, the recipe config picks them.

Shapes: (...) any token layout, e.g. (B,) for [CLS] or (B, M) for masked patches; K prototypes.

Clips of T frames (tasks/pretrain.py): the teacher scores the INTACT clip fused with the text;
its targets are its prototype distributions at every masked (frame, position) pair, (B*T, M, K)
(the tube mask masks the same M positions in each frame), and at the clip [CLS] (mean of the frame
[CLS] tokens), (B, K). The student predicts the former from the per-frame decoder states and the
latter from the fused clip [CLS] of the masked pass. The patch term is the plain mean over the
B*T*M pairs (= the mean over frames of per-frame means, M being equal), the agreement term the
mean over the B clips; the centres average over all those tokens. T = 1 is the image objective.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import all_reduce_mean


def semantic_mim_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, center: torch.Tensor,
                      student_temp: float, teacher_temp: float,
                      weights: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher-to-student cross-entropy, averaged over tokens (optionally weighted).

    student_logits (..., K), teacher_logits (..., K), center (K,), weights (...) >= 0 or None (e.g. a
    float/bool mask of the masked patches, iBOT's `mask`).

        p_t = softmax((teacher - center) / teacher_temp)        (no gradient)
        l   = -sum_k p_t[k] * log_softmax(student / student_temp)[k]     per token
        L   = sum(w * l) / sum(w)   (plain mean over tokens when weights is None; 0 when sum(w) = 0)

    Computed in at least float32. Returns a scalar with gradient w.r.t. student_logits only.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() < 1:
        raise ValueError(f"student and teacher logits must share a shape (..., K); got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    K = student_logits.shape[-1]
    if center.shape != (K,):
        raise ValueError(f"center must be ({K},); got {tuple(center.shape)}")
    if student_temp <= 0 or teacher_temp <= 0:
        raise ValueError(f"temperatures must be > 0; got student {student_temp}, teacher {teacher_temp}")
    acc = torch.promote_types(student_logits.dtype, torch.float32)
    with torch.no_grad():
        p_teacher = F.softmax((teacher_logits.detach().to(acc) - center.to(acc)) / teacher_temp, dim=-1)
    per_token = -(p_teacher * F.log_softmax(student_logits.to(acc) / student_temp, dim=-1)).sum(dim=-1)
    if weights is None:
        if per_token.numel() == 0:
            raise ValueError("no tokens to score")
        return per_token.mean()
    if weights.shape != per_token.shape:
        raise ValueError(f"weights must be {tuple(per_token.shape)}; got {tuple(weights.shape)}")
    weights = weights.to(per_token.dtype)
    denom = weights.sum()
    # where() instead of a host-side check: no sync, and an all-zero weight map gives 0 with a grad path.
    return (weights * per_token).sum() / torch.where(denom > 0, denom, torch.ones_like(denom))


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float = 0.9) -> torch.Tensor:
    """DINO/iBOT centre update, returned as a new tensor (the caller stores it in its buffer).

    center (K,), teacher_logits (..., K): all tokens of this rank.

        batch_mean = mean over ranks of (mean over this rank's tokens of teacher_logits)
        new_center = momentum * center + (1 - momentum) * batch_mean

    The cross-rank average is over world (equal token counts per rank give the global token mean, as
    DINO's all_reduce / (len * world)). No-op averaging when torch.distributed is not initialised.
    """
    K = center.shape[-1]
    if center.dim() != 1 or teacher_logits.shape[-1] != K or teacher_logits.numel() == 0:
        raise ValueError(f"center (K,) and non-empty teacher_logits (..., K) needed; got "
                         f"{tuple(center.shape)} and {tuple(teacher_logits.shape)}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1]; got {momentum}")
    acc = torch.promote_types(center.dtype, torch.float32)
    batch_mean = teacher_logits.detach().to(acc).reshape(-1, K).mean(dim=0)
    batch_mean = all_reduce_mean(batch_mean)
    return (center.to(acc) * momentum + batch_mean * (1.0 - momentum)).to(center.dtype)
