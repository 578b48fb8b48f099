"""One attention entry point for the whole model.

Legend: B batch, H heads, L query length, S key length, D head dim.
Backends: "sdpa" (torch scaled_dot_product_attention), "math" (the reference).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attention(q_BHLD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor,
              key_mask_BS: torch.Tensor | None = None, backend: str = "auto",
              dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v -> (B, H, L, D). key_mask_BS: bool, True = attend."""
    if backend == "math":
        scores = q_BHLD @ k_BHSD.transpose(-1, -2) / math.sqrt(q_BHLD.shape[-1])
        if key_mask_BS is not None:
            scores = scores.masked_fill(~key_mask_BS[:, None, None, :], float("-inf"))
        probs = scores.float().softmax(dim=-1).to(q_BHLD.dtype)
        probs = F.dropout(probs, p=dropout_p)
        return probs @ v_BHSD
    attn_mask = None if key_mask_BS is None else key_mask_BS[:, None, None, :]
    return F.scaled_dot_product_attention(q_BHLD, k_BHSD, v_BHSD, attn_mask=attn_mask, dropout_p=dropout_p)
