"""megavl_kernels: fused token gather/scatter for the masked-image-modeling hot path.

Each op has a Triton kernel (gather.py, scatter.py, patch_targets.py), a plain PyTorch reference
(reference.py) and an autograd.Function; the functions exported here validate their inputs and
dispatch between them (ops.py, backend.py: CUDA -> Triton, CPU -> reference, ``MEGAVL_KERNELS``
= auto | triton | torch overrides). Importing this package never imports triton.
"""
from .ops import gather_tokens, masked_patch_targets, scatter_tokens
from .reference import gather_tokens_ref, masked_patch_targets_ref, patchify, scatter_tokens_ref

__all__ = [
    "gather_tokens", "scatter_tokens", "masked_patch_targets", "patchify",
    "gather_tokens_ref", "scatter_tokens_ref", "masked_patch_targets_ref",
]
