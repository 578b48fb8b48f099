"""Tube masking for clips: the same positions dropped in every frame, through the vision tower and
MaskSpec.per_frame; text-guided masking ranks positions by relevance summed over the frames."""
from __future__ import annotations

import pytest
import torch

from megavl.models.vision import VisionTransformer
from megavl.objectives.masking import random_masking, text_guided_masking, tube_relevance


def test_encoder_drops_the_same_positions_in_every_frame():
    """A tube-masked clip's frame tokens are the full clip's frame tokens at the kept positions in
    every frame, up to attention (checked on a zero-depth tower where there is none)."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, width=16, depth=0, heads=2, num_frames=4).eval()
    with torch.no_grad():
        model.temporal_embed.normal_()
    video = torch.randn(2, 4, 3, 32, 32)
    spec = random_masking(2, model.num_patches, 0.75, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, masked = model.forward_frames(video), model.forward_frames(video, spec.keep_ids)
    assert masked.shape == (2, 4, 1 + spec.num_keep, 16)
    for b in range(2):
        for t in range(4):
            assert torch.allclose(masked[b, t, 1:], full[b, t, 1:][spec.keep_ids[b]], atol=1e-6)


def test_per_frame_repeats_each_row_for_its_frames():
    spec = random_masking(3, 10, 0.6, generator=torch.Generator().manual_seed(0))
    tube = spec.per_frame(4)
    assert spec.per_frame(1) is spec
    for field in ("keep_ids", "ids_masked", "ids_restore", "mask"):
        rows = getattr(tube, field)
        assert rows.shape[0] == 12
        for b in range(3):
            for t in range(4):
                assert torch.equal(rows[b * 4 + t], getattr(spec, field)[b])
    with pytest.raises(ValueError):
        spec.per_frame(0)


def test_text_guided_on_a_clip_ranks_by_relevance_summed_over_frames():
    torch.manual_seed(0)
    B, T, N = 2, 3, 12
    relevance = torch.rand(B, T * N)
    noise = torch.rand(B, N)
    summed = torch.zeros(B, N)
    for t in range(T):  # frame-major: patch n of frame t is column t * N + n
        summed += relevance[:, t * N:(t + 1) * N]
    assert torch.allclose(tube_relevance(relevance, T), summed)
    clip = text_guided_masking(relevance, 0.5, 0.3, noise=noise, num_frames=T)
    assert torch.equal(clip.keep_ids, text_guided_masking(summed, 0.5, 0.3, noise=noise).keep_ids)
    exact = text_guided_masking(relevance, 0.5, 0.0, num_frames=T)  # no randomness: the top-M masked
    for b in range(B):
        top = set(summed[b].argsort(descending=True)[:N // 2].tolist())
        assert set(exact.ids_masked[b].tolist()) == top
    with pytest.raises(ValueError, match="T\\*N"):
        tube_relevance(torch.rand(2, 13), 3)
