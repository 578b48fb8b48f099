"""Semantic completion learning (SCL; Ji et al., CVPR 2023, arXiv 2211.13437, code IIGROUP/SCL).

The global feature computed from MASKED data must recover the missing semantics: it is pulled towards
the global feature of the same sample computed from INTACT data (a detached target) and pushed from
other samples in the batch. Shapes: B batch (gather across ranks before calling), E width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .itc import itc_loss


def symmetric_nce(query: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric in-batch InfoNCE between normalised `query` (B, E) and the DETACHED normalised `target` (B, E).

        q = query / |query|,  k = sg(target / |target|),  s = q k^T / T
        NCE = 1/2 [ mean_i CE(s[i], i) + mean_j CE(s^T[j], j) ]
    """
    acc = torch.promote_types(query.dtype, torch.float32)
    q = F.normalize(query.to(acc), dim=-1)
    k = F.normalize(target.detach().to(acc), dim=-1)
    return itc_loss(q, k, temperature)


def scl_loss(v_masked: torch.Tensor, v_full: torch.Tensor, t_masked: torch.Tensor, t_full: torch.Tensor,
             temperature: float = 0.03) -> torch.Tensor:
    """L_SCL = NCE(v_m, v) + NCE(t_m, t), fixed temperature (0.03 in the paper).

    v_masked (B, E): fused image global feature from masked image + intact text (pass A).
    v_full (B, E):   fused image global feature from intact image + masked text (pass B); target.
    t_masked (B, E): fused text global feature from intact image + masked text (pass B).
    t_full (B, E):   fused text global feature from masked image + intact text (pass A); target.
    Features are L2-normalised here; v_full and t_full are detached here. Returns a scalar.
    """
    for name, x in (("v_full", v_full), ("t_masked", t_masked), ("t_full", t_full)):
        if x.shape != v_masked.shape:
            raise ValueError(f"{name} shape {tuple(x.shape)} differs from v_masked {tuple(v_masked.shape)}")
    if v_masked.dim() != 2:
        raise ValueError(f"SCL features must be (B, E); got {tuple(v_masked.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    return symmetric_nce(v_masked, v_full, temperature) + symmetric_nce(t_masked, t_full, temperature)
