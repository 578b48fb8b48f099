"""megavl_kernels: fused token gather/scatter for the masked-image-modeling hot path.

Each op has a Triton kernel, a plain PyTorch reference (reference.py) and an autograd.Function;
the functions exported here dispatch between them.
"""
from .reference import gather_tokens_ref, masked_patch_targets_ref, patchify, scatter_tokens_ref

# Until the Triton dispatcher lands, the public ops are the references.
gather_tokens = gather_tokens_ref
scatter_tokens = scatter_tokens_ref
masked_patch_targets = masked_patch_targets_ref

__all__ = ["gather_tokens", "scatter_tokens", "masked_patch_targets", "patchify"]
