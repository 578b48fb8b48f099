"""Input validation shared by every backend, so bad input fails the same way on CPU and CUDA.

Shape, dtype and device checks are free (metadata only). Range checks read the index tensors'
min/max (and, for ``scatter_tokens``, count each index once to prove a permutation). On CPU they
raise IndexError/ValueError with the offending values. On CUDA they never make the host wait: the
condition is computed on the device and enforced by ``torch._assert_async`` (a device-side assert
carrying the same message, reported at the next synchronisation), so the checks can stay on in the
training step (a steady-state step has no host sync; see tests/unit/engine/test_sync_free_step.py).
They run when ``check=True`` (the default); ``check=False`` skips even the small device kernels.
Without the check an out-of-range index is undefined behaviour in the Triton kernels.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be one of {FLOAT_DTYPES}, got {t.dtype}")


def _check_index(name: str, ids: torch.Tensor, batch: int, device: torch.device) -> None:
    if ids.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {ids.dtype}")
    if ids.dim() != 2 or ids.shape[0] != batch:
        raise ValueError(f"{name} must be (B={batch}, K), got shape {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but the data is on {device}")


def _check_range(name: str, ids: torch.Tensor, upper: int) -> None:
    """All of ids in [0, upper): one min/max reduction; a host sync on CPU only."""
    if ids.numel() == 0:
        return
    if ids.is_cuda:
        torch._assert_async(((ids >= 0) & (ids < upper)).all(), f"{name} must lie in [0, {upper})")
        return
    low, high = (int(v) for v in torch.stack(torch.aminmax(ids)).tolist())
    if low < 0 or high >= upper:
        raise IndexError(f"{name} must lie in [0, {upper}), found values in [{low}, {high}]")


def check_gather(x: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor | None, check: bool) -> None:
    """x (B, N, D) float, ids (B, K) int in [0, N), pos (N, D) of x's dtype and device."""
    if x.dim() != 3:
        raise ValueError(f"x must be (B, N, D), got shape {tuple(x.shape)}")
    _check_float("x", x)
    B, N, D = x.shape
    _check_index("ids", ids, B, x.device)
    if pos is not None:
        if tuple(pos.shape) != (N, D):
            raise ValueError(f"pos must be (N, D) = ({N}, {D}), got shape {tuple(pos.shape)}")
        if pos.dtype != x.dtype:
            raise TypeError(f"pos dtype {pos.dtype} differs from x dtype {x.dtype}; cast one of them")
        if pos.device != x.device:
            raise ValueError(f"pos is on {pos.device} but x is on {x.device}")
    if check:
        _check_range("ids", ids, N)


def check_scatter(kept: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, check: bool) -> None:
    """kept (B, K, D) float, ids_restore (B, N) a permutation of [0, N) per row with N >= K, mask_token (D,)."""
    if kept.dim() != 3:
        raise ValueError(f"kept must be (B, K, D), got shape {tuple(kept.shape)}")
    _check_float("kept", kept)
    B, K, D = kept.shape
    _check_index("ids_restore", ids_restore, B, kept.device)
    N = ids_restore.shape[1]
    if N < K:
        raise ValueError(f"ids_restore has N={N} positions but kept has K={K} > N tokens")
    if tuple(mask_token.shape) != (D,):
        raise ValueError(f"mask_token must be (D,) = ({D},), got shape {tuple(mask_token.shape)}")
    _check_float("mask_token", mask_token)
    if mask_token.device != kept.device:
        raise ValueError(f"mask_token is on {mask_token.device} but kept is on {kept.device}")
    if check and ids_restore.numel():
        _check_range("ids_restore", ids_restore, N)
        # Repeated indices would make the gradient of kept a race; a permutation hits each slot once.
        hits = torch.zeros(B, N, dtype=torch.int32, device=ids_restore.device)
        hits.scatter_add_(1, ids_restore.long(), torch.ones_like(hits))
        message = "ids_restore must be a permutation of [0, N) in every row (it has repeats)"
        if ids_restore.is_cuda:
            torch._assert_async((hits == 1).all(), message)
        elif not bool((hits == 1).all()):
            raise ValueError(message)


def check_patch_targets(images: torch.Tensor, ids_masked: torch.Tensor, patch: int, check: bool) -> None:
    """images (B, C, H, W) float with H, W multiples of patch; ids_masked (B, M) int in [0, (H/p)(W/p))."""
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    _check_float("images", images)
    if not isinstance(patch, int) or patch <= 0:
        raise ValueError(f"patch must be a positive int, got {patch!r}")
    B, _, H, W = images.shape
    if H % patch or W % patch:
        raise ValueError(f"image size {H}x{W} is not a multiple of patch={patch}")
    _check_index("ids_masked", ids_masked, B, images.device)
    if check:
        _check_range("ids_masked", ids_masked, (H // patch) * (W // patch))
