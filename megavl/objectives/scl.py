"""Semantic completion learning (SCL; Ji et al., CVPR 2023, arXiv 2211.13437, code IIGROUP/SCL).

The global feature computed from MASKED data must recover the missing semantics: it is pulled towards
a global feature of the same sample computed from data where that modality is INTACT (a detached
target) and pushed from the other samples of the (gathered) batch.

What IIGROUP/SCL's released code does (`scl/modules/objectives.py`, `compute_scl`), our default
`objectives.scl.targets: cross`: two fusion passes with gradients,
    pass A = masked image (its own ratio, 0.8) + intact text,
    pass B = intact image + masked text ([MASK]-only, its own ratio `mtm_ratio` 0.4),
and each modality's target comes from the OTHER pass, where that modality is intact:
    vision: query = image global of A, target = sg(image global of B)
    text:   query = text global of B,  target = sg(text global of A)
No third (intact/intact) fusion pass is needed. `targets: intact` instead takes both targets from the
intact image + intact text fusion (the ITM positives when ITM runs, else a no-grad fusion pass).

Loss per modality: symmetric InfoNCE at a fixed temperature (0.03 in our recipes; `msm_temp` in SCL).
IIGROUP/SCL's NormSoftmaxLoss SUMS the two directions; `symmetric_nce` AVERAGES them (as our ITC), so
SCL's loss is 2x ours at the same weight. With image ids, every sample of the same image is a
positive (ALBEF retrieval's `idx` targets): five COCO captions of one picture are not negatives.
Clips of T frames: the global features are clip-level, the fused [CLS] of the clip (the vision
tower's clip token, mean of the frame [CLS] tokens, through the fusion), masked by a tube mask (the
same positions in every frame, SCL's own video masking); one NCE per modality as for images.
IIGROUP/SCL's video code (`compute_scl_video`) instead keeps the T frame [CLS] tokens through its
fusion and averages T frame-wise vision NCEs; our fusion sees one clip [CLS] (as ITC, ITM and
retrieval do), so there is no fused per-frame global to contrast.
Shapes: B batch (gather across ranks before calling and pass this rank's `rows`), E width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .itc import itc_loss

SCL_TARGETS = ("cross", "intact")


def symmetric_nce(query: torch.Tensor, target: torch.Tensor, temperature: float,
                  image_ids: torch.Tensor | None = None, rows: slice | None = None) -> torch.Tensor:
    """Symmetric in-batch InfoNCE between normalised `query` (N, E) and the DETACHED normalised `target` (N, E).

        q = query / |query|,  k = sg(target / |target|),  s = q k^T / T
        NCE = 1/2 [ mean_{i in rows} CE(s[i], y[i]) + mean_{j in rows} CE(s^T[j], y^T[j]) ]
        y = I, or with image_ids (N,): y[i, j] = [id_i == id_j] / #{j: id_j == id_i}
    rows: the B pairs this call computes (this rank's, `local_rows`; default all), against all N
    columns, as `itc_loss`. Computed in at least float32.
    """
    acc = torch.promote_types(query.dtype, torch.float32)
    q = F.normalize(query.to(acc), dim=-1)
    k = F.normalize(target.detach().to(acc), dim=-1)
    return itc_loss(q, k, temperature, image_ids=image_ids, rows=rows)


def scl_loss(v_masked: torch.Tensor, v_target: torch.Tensor, t_masked: torch.Tensor, t_target: torch.Tensor,
             temperature: float = 0.03, image_ids: torch.Tensor | None = None,
             rows: slice | None = None) -> torch.Tensor:
    """L_SCL = NCE(v_m, v) + NCE(t_m, t), fixed temperature (0.03 in the paper).

    v_masked (B, E): fused image global feature from the masked image + intact text (pass A).
    v_target (B, E): fused image global feature with the image intact: from pass B (intact image +
                     masked text; `targets: cross`, IIGROUP/SCL) or from intact image + intact text.
    t_masked (B, E): fused text global feature from the intact image + masked text (pass B).
    t_target (B, E): fused text global feature with the text intact: from pass A or intact + intact.
    image_ids (B,) optional: same-image samples are positives. Features are L2-normalised here;
    the targets are detached here. rows: the pairs whose terms this call computes (this rank's of
    features gathered across ranks, the masked ones with gradient: `local_rows`), each against every
    pair; default all. Returns a scalar.
    """
    for name, x in (("v_target", v_target), ("t_masked", t_masked), ("t_target", t_target)):
        if x.shape != v_masked.shape:
            raise ValueError(f"{name} shape {tuple(x.shape)} differs from v_masked {tuple(v_masked.shape)}")
    if v_masked.dim() != 2:
        raise ValueError(f"SCL features must be (B, E); got {tuple(v_masked.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    return (symmetric_nce(v_masked, v_target, temperature, image_ids, rows)
            + symmetric_nce(t_masked, t_target, temperature, image_ids, rows))
