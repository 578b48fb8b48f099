"""Masked language modelling loss (BERT, Devlin et al. 2019; as used by ALBEF, SCL, MaskVLM).

Masking itself happens in the data collate (megavl.data); this file only scores the predictions.
Clips of T frames: unchanged, the masked text is fused with the intact clip (its clip [CLS] and
all T*N patch tokens), so the tokens are predicted from every frame.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy over the masked tokens.

    logits (B, L, V) (any leading shape (..., V)); labels (B, L) token ids, `ignore_index` (-100)
    where the token was not masked.

        L = sum_{labels != -100} -log softmax(logits)[label]  /  max(1, #masked)

    A batch with no masked token returns 0 that is still connected to `logits` (zero gradient), so
    every rank runs the same backward graph. Computed in at least float32 whatever the logits dtype.
    """
    if logits.dim() < 2 or logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits (..., V) and labels (...) must share leading dims; got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    if labels.dtype.is_floating_point:
        raise TypeError(f"labels must be integer token ids; got {labels.dtype}")
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_logits = flat_logits.to(torch.promote_types(flat_logits.dtype, torch.float32))
    flat_labels = labels.reshape(-1).long()
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction="sum")
    count = (flat_labels != ignore_index).sum().clamp(min=1)
    return total / count
