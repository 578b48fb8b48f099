"""Random (MAE) and text-guided masking: permutation properties, restoring order, exact ratios, determinism."""
from __future__ import annotations

import pytest
import torch
from megavl_kernels import gather_tokens, scatter_tokens

from megavl.objectives.masking import MaskSpec, num_kept, random_masking, text_guided_masking


def check_spec(spec: MaskSpec, B: int, N: int, K: int) -> None:
    """Every invariant a MaskSpec promises, checked row by row."""
    assert spec.keep_ids.shape == (B, K) and spec.ids_masked.shape == (B, N - K)
    assert spec.ids_restore.shape == (B, N) and spec.mask.shape == (B, N) and spec.mask.dtype == torch.bool
    for b in range(B):
        keep, masked = spec.keep_ids[b].tolist(), spec.ids_masked[b].tolist()
        assert keep == sorted(keep) and masked == sorted(masked)
        assert sorted(keep + masked) == list(range(N))  # a partition of the patches
        shuffle = keep + masked
        for n in range(N):  # ids_restore = argsort(cat(keep, masked))
            assert shuffle[spec.ids_restore[b, n]] == n
        assert [n for n in range(N) if spec.mask[b, n]] == masked
    assert int(spec.mask.sum()) == B * (N - K)


@pytest.mark.parametrize("N,ratio,K", [(196, 0.75, 49), (10, 0.8, 2), (7, 0.5, 4), (5, 0.0, 5), (5, 1.0, 1),
                                       (3, 0.9, 1), (1, 0.5, 1)])
def test_num_kept(N, ratio, K):
    assert num_kept(N, ratio) == K


@pytest.mark.parametrize("B,N,ratio", [(3, 16, 0.75), (2, 7, 0.4), (1, 5, 1.0), (2, 9, 0.0)])
def test_random_masking_properties(B, N, ratio):
    spec = random_masking(B, N, ratio, "cpu", generator=torch.Generator().manual_seed(0))
    check_spec(spec, B, N, num_kept(N, ratio))


def test_scatter_restores_original_order():
    B, N, D = 3, 11, 4
    x = torch.randn(B, N, D, dtype=torch.float64)
    mask_token = torch.full((D,), -7.0, dtype=torch.float64)
    for spec in (random_masking(B, N, 0.6, "cpu", torch.Generator().manual_seed(1)),
                 text_guided_masking(torch.rand(B, N), 0.6, 0.3, torch.Generator().manual_seed(2))):
        kept = gather_tokens(x, spec.keep_ids)
        restored = scatter_tokens(kept, spec.ids_restore, mask_token)
        for b in range(B):
            for n in range(N):
                expected = mask_token if spec.mask[b, n] else x[b, n]
                assert torch.equal(restored[b, n], expected)
        # Masked-token order matches ids_masked (how predictions line up with masked_patch_targets).
        assert torch.equal(gather_tokens(x, spec.ids_masked), x[spec.mask].view(B, -1, D))


def test_random_masking_determinism_and_randomness():
    a = random_masking(4, 20, 0.5, "cpu", torch.Generator().manual_seed(3))
    b = random_masking(4, 20, 0.5, "cpu", torch.Generator().manual_seed(3))
    c = random_masking(4, 20, 0.5, "cpu", torch.Generator().manual_seed(4))
    assert torch.equal(a.ids_restore, b.ids_restore) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.mask, c.mask)
    assert not torch.equal(a.mask[0], a.mask[1])  # rows draw independently


def test_random_masking_is_uniform():
    # Each patch is masked with probability M/N.
    spec = random_masking(4000, 6, 0.5, "cpu", torch.Generator().manual_seed(5))
    freq = spec.mask.double().mean(dim=0)
    assert (freq - 0.5).abs().max() < 0.03


def test_text_guided_randomness_zero_masks_exactly_top_m():
    B, N, ratio = 3, 12, 0.75
    relevance = torch.randn(B, N, generator=torch.Generator().manual_seed(6))
    spec = text_guided_masking(relevance, ratio, randomness=0.0)
    K = num_kept(N, ratio)
    check_spec(spec, B, N, K)
    for b in range(B):
        top = sorted(range(N), key=lambda n: -float(relevance[b, n]))[: N - K]
        assert spec.ids_masked[b].tolist() == sorted(top)
    # Scale and shift of the relevance do not matter (ranks); no generator needed at randomness 0.
    assert torch.equal(text_guided_masking(relevance * 5 + 2, ratio, 0.0).mask, spec.mask)


def test_text_guided_ties_break_by_index():
    spec = text_guided_masking(torch.zeros(1, 6), 0.5, 0.0)
    assert spec.ids_masked.tolist() == [[3, 4, 5]]


def test_text_guided_randomness_mixes_in_noise():
    B, N, ratio = 2000, 8, 0.5
    relevance = torch.arange(N, dtype=torch.float32).expand(B, N)  # patch 7 most relevant
    full = text_guided_masking(relevance, ratio, 1.0, torch.Generator().manual_seed(7))
    check_spec(full, B, N, num_kept(N, ratio))
    freq = full.mask.double().mean(dim=0)
    assert (freq - 0.5).abs().max() < 0.05  # randomness 1: relevance ignored
    mixed = text_guided_masking(relevance, ratio, 0.5, torch.Generator().manual_seed(7)).mask.double().mean(0)
    assert mixed[-1] > 0.9 and mixed[0] < 0.1 and (mixed[1:] >= mixed[:-1] - 0.03).all()  # biased, monotone
    a = text_guided_masking(relevance[:4], ratio, 0.5, torch.Generator().manual_seed(8))
    b = text_guided_masking(relevance[:4], ratio, 0.5, torch.Generator().manual_seed(8))
    assert torch.equal(a.mask, b.mask)


def test_masking_bad_input():
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(2, 8, 1.5)
    with pytest.raises(ValueError, match="num_patches"):
        random_masking(2, 0, 0.5)
    with pytest.raises(ValueError, match="batch_size"):
        random_masking(0, 8, 0.5)
    with pytest.raises(ValueError, match="randomness"):
        text_guided_masking(torch.rand(2, 8), 0.5, -0.1)
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        text_guided_masking(torch.rand(8), 0.5, 0.1)
    with pytest.raises(TypeError):
        text_guided_masking(torch.ones(2, 8, dtype=torch.long), 0.5, 0.1)
