"""Patch masking as pure functions: random (MAE) and text-guided (SemMIM) -> MaskSpec.

Shapes: B batch, T frames, N patches per frame, K kept = N - M, M masked.

Clips use TUBE masking (SCL, VideoMAE): a MaskSpec is over the N spatial positions and every frame
drops the same ones (the vision tower applies `keep_ids` to each frame). Per-frame masks would let
the model copy a masked patch from the same place in a neighbouring frame. `MaskSpec.per_frame(T)`
repeats each row for ops that run on frames flattened to (B*T, ...) (MAE decoder scatter, pixel
targets); text-guided masking takes relevance over all T*N patches and ranks positions by it
summed over frames.

Convention (shared with megavl_kernels): ids_shuffle = cat(keep_ids, ids_masked) along dim 1 and
ids_restore = argsort(ids_shuffle), so `scatter_tokens(kept (B,K,D), ids_restore, mask_token)` puts every
kept token back at its original position and the mask token everywhere else (MAE's decoder input).

Unlike MAE, keep_ids and ids_masked are each SORTED ascending (raster order). Which patches are kept
is still random; the order within the kept set carries no information for a position-embedded
transformer, and raster order makes the outputs deterministic, keeps gathers memory-local and lines
masked-patch predictions up with `masked_patch_targets(images, ids_masked)` in one fixed order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RELEVANCE_LEVELS = 1024  # text-guided masking: relevance resolution (see text_guided_masking)


@dataclass(frozen=True)
class MaskSpec:
    """Which patches an image keeps and which it masks.

    keep_ids (B, K) long, ascending; ids_masked (B, M) long, ascending; ids_restore (B, N) long with
    ids_restore[b, n] = position of patch n in cat(keep_ids, ids_masked); mask (B, N) bool, True = masked.
    """

    keep_ids: torch.Tensor
    ids_masked: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor

    @property
    def num_keep(self) -> int:
        return self.keep_ids.shape[1]

    @property
    def num_masked(self) -> int:
        return self.ids_masked.shape[1]

    def per_frame(self, num_frames: int) -> "MaskSpec":
        """The tube mask as B*T rows, sample b's row repeated for its T frames (frame-major, as
        the vision tower flattens (B, T) frames)."""
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1; got {num_frames}")
        if num_frames == 1:
            return self
        rep = lambda t: t.repeat_interleave(num_frames, dim=0)  # noqa: E731
        return MaskSpec(rep(self.keep_ids), rep(self.ids_masked), rep(self.ids_restore), rep(self.mask))


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """K = round(N * (1 - ratio)) (half rounds up), at least 1 so the encoder always sees a token."""
    if num_patches < 1:
        raise ValueError(f"num_patches must be >= 1; got {num_patches}")
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1]; got {mask_ratio}")
    return max(1, min(num_patches, math.floor(num_patches * (1.0 - mask_ratio) + 0.5)))


def _spec_from_order(order: torch.Tensor, num_keep: int) -> MaskSpec:
    """order (B, N): a permutation per row; its first num_keep entries are kept, the rest masked."""
    keep_ids = order[:, :num_keep].sort(dim=1).values
    ids_masked = order[:, num_keep:].sort(dim=1).values
    ids_shuffle = torch.cat([keep_ids, ids_masked], dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = ids_restore >= num_keep
    return MaskSpec(keep_ids=keep_ids, ids_masked=ids_masked, ids_restore=ids_restore, mask=mask)


def _uniform(shape: tuple[int, ...], device: torch.device | str, generator: torch.Generator | None) -> torch.Tensor:
    # Draw on the generator's device so a CPU generator gives the same mask whatever `device` is.
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def _check_noise(noise: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    if tuple(noise.shape) != shape or not noise.dtype.is_floating_point:
        raise ValueError(f"noise must be a float tensor of shape {shape}; got {noise.dtype} {tuple(noise.shape)}")
    return noise


def random_masking(batch_size: int, num_patches: int, mask_ratio: float, device: torch.device | str = "cpu",
                   generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> MaskSpec:
    """MAE random masking: each sample keeps a uniformly random subset of K = num_kept(N, ratio) patches.

    noise ~ U(0,1)^(B,N); the K patches with the smallest noise are kept (MAE's argsort(noise)).
    Pass a torch.Generator for reproducible masks, or the (B, N) noise itself (e.g. this rank's rows
    of noise drawn for the global batch, so masks do not depend on how the batch is split).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    num_keep = num_kept(num_patches, mask_ratio)
    if noise is None:
        noise = _uniform((batch_size, num_patches), device, generator)
    noise = _check_noise(noise, (batch_size, num_patches)).to(device)
    return _spec_from_order(torch.argsort(noise, dim=1), num_keep)


def tube_relevance(relevance: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B, T*N) text-to-patch relevance over a clip's frame-major patches -> (B, N) summed over frames."""
    if relevance.dim() != 2 or relevance.shape[1] % num_frames:
        raise ValueError(f"relevance must be (B, T*N) with T={num_frames}; got {tuple(relevance.shape)}")
    return relevance.view(relevance.shape[0], num_frames, -1).sum(dim=1)


def text_guided_masking(relevance: torch.Tensor, mask_ratio: float, randomness: float,
                        generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                        num_frames: int = 1) -> MaskSpec:
    """Mask the patches most relevant to the text, mixed with random masking (SemMIM).

    relevance (B, N): text-to-patch relevance (e.g. momentum-model attention from text to patches);
    higher = more relevant. randomness in [0, 1]. SemMIM's exact mixing rule is UNVERIFIED; this one:

        q[b, n]     = round(1024 * (relevance[b, n] - min_b) / (max_b - min_b))   (quantised relevance)
        r[b, n]     = rank of q[b, n] within row b / (N - 1)     (0 = least, 1 = most relevant;
                                                                   ties by index, stable)
        score[b, n] = (1 - randomness) * r[b, n] + randomness * u[b, n],   u ~ U(0, 1)
        masked      = the M = N - K patches with the highest score

    randomness = 0 masks exactly the top-M relevant patches; randomness = 1 is random masking (the
    score is pure noise). Ranks, not raw values, so the mixing does not depend on the relevance scale.
    Relevances closer than 1/1024 of the row's range are ties broken by patch index: the mask then does
    not hinge on the last bits of a reduction (which differ between a sharded and an unsharded run, or
    between GPU kernels), so ZeRO-k equals ZeRO-0 exactly.
    `noise` (B, N) in [0, 1), when given, is used as u instead of drawing from `generator`.

    Clips (num_frames = T > 1): relevance is (B, T*N) over the frame-major patches of all frames;
    positions are ranked by relevance summed over the frames (`tube_relevance`) and the result is
    a tube mask over the N positions.
    """
    if relevance.dim() != 2:
        raise ValueError(f"relevance must be (B, N); got {tuple(relevance.shape)}")
    if num_frames > 1:
        relevance = tube_relevance(relevance, num_frames)
    if not 0.0 <= randomness <= 1.0:
        raise ValueError(f"randomness must be in [0, 1]; got {randomness}")
    if not relevance.dtype.is_floating_point:
        raise TypeError(f"relevance must be floating point; got {relevance.dtype}")
    B, N = relevance.shape
    num_keep = num_kept(N, mask_ratio)
    relevance = relevance.detach().double()
    low, high = relevance.amin(dim=1, keepdim=True), relevance.amax(dim=1, keepdim=True)
    quantised = torch.round(RELEVANCE_LEVELS * (relevance - low) / (high - low).clamp_min(1e-30))
    ranks = torch.argsort(torch.argsort(quantised, dim=1, stable=True), dim=1)
    score = ranks.to(torch.float64) / max(N - 1, 1)
    if randomness > 0:
        if noise is None:
            noise = _uniform((B, N), relevance.device, generator)
        noise = _check_noise(noise, (B, N)).to(relevance.device, torch.float64)
        score = (1.0 - randomness) * score + randomness * noise
    # Ascending score: least relevant first, so the first K entries are the kept ones.
    order = torch.argsort(score, dim=1, stable=True)
    return _spec_from_order(order, num_keep)
