"""ITM negative sampling (never the same image; softmax-weighted; reproducible) and the ITM loss."""
from __future__ import annotations

import math

import pytest
import torch

from megavl.objectives.itm import itm_loss, sample_hard_negatives, sample_random_negatives


def test_hard_negatives_never_share_image_id():
    # COCO-like: several captions per image, so equal ids sit off the diagonal too.
    ids_rows = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    ids_cols = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 0])  # gathered columns, C > B
    # Similarities that strongly favour the same-image columns: they must still never be drawn.
    sim = (ids_rows[:, None] == ids_cols[None, :]).double() * 50.0
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        neg = sample_hard_negatives(sim, ids_rows, ids_cols, generator=g)
        assert neg.shape == (7,) and neg.dtype == torch.long
        assert (ids_cols[neg] != ids_rows).all()


def test_hard_negatives_follow_softmax_of_valid_columns():
    n = 20000  # the same row n times: n independent draws in one call
    ids_rows = torch.zeros(n, dtype=torch.long)
    ids_cols = torch.tensor([0, 1, 2, 3])
    sim = torch.tensor([[9.0, 0.0, 1.0, 2.0]]).expand(n, 4)
    draws = sample_hard_negatives(sim, ids_rows, ids_cols, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(draws.flatten(), minlength=4).double() / n
    z = sum(math.exp(v) for v in (0.0, 1.0, 2.0))
    expected = [0.0, math.exp(0.0) / z, math.exp(1.0) / z, math.exp(2.0) / z]
    assert freq[0] == 0
    for c in range(1, 4):
        assert abs(freq[c].item() - expected[c]) < 0.02


def test_hard_negatives_survive_underflow_and_eps():
    # Masking before the softmax: the same-image column dominates by 1e4, the rest must still be sampled.
    sim = torch.tensor([[1e4, 0.0, 0.0], [0.0, 1e4, -1e4]])
    ids = torch.tensor([5, 6])
    cols = torch.tensor([5, 6, 7])
    neg = sample_hard_negatives(sim, ids, cols, generator=torch.Generator().manual_seed(0))
    assert neg[0] in (1, 2) and neg[1] in (0, 2)
    # eps (ALBEF's 1e-4) lets an otherwise-zero-probability valid column be drawn, never an invalid one.
    sim = torch.tensor([[0.0, 200.0, -200.0]]).expand(400, 3)
    rows = torch.full((400,), 5)
    g = torch.Generator().manual_seed(2)
    assert set(sample_hard_negatives(sim, rows, cols, generator=g).tolist()) == {1}
    assert set(sample_hard_negatives(sim, rows, cols, generator=g, eps=0.5).tolist()) == {1, 2}


def test_sampling_is_deterministic_with_generator():
    sim = torch.randn(6, 6, generator=torch.Generator().manual_seed(3))
    ids = torch.arange(6)
    a = sample_hard_negatives(sim, ids, ids, generator=torch.Generator().manual_seed(7))
    b = sample_hard_negatives(sim, ids, ids, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    a = sample_random_negatives(ids, ids, generator=torch.Generator().manual_seed(7))
    b = sample_random_negatives(ids, ids, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_random_negatives_uniform_over_valid():
    n = 12000
    ids_rows = torch.tensor([0, 1]).repeat(n)
    ids_cols = torch.tensor([0, 1, 1, 2])
    draws = sample_random_negatives(ids_rows, ids_cols, generator=torch.Generator().manual_seed(4)).view(n, 2)
    f0 = torch.bincount(draws[:, 0], minlength=4).double() / n  # row id 0: columns 1, 2, 3 valid
    f1 = torch.bincount(draws[:, 1], minlength=4).double() / n  # row id 1: columns 0, 3 valid
    assert f0[0] == 0 and all(abs(f0[c].item() - 1 / 3) < 0.02 for c in (1, 2, 3))
    assert f1[1] == 0 and f1[2] == 0 and all(abs(f1[c].item() - 0.5) < 0.02 for c in (0, 3))


def test_no_valid_negative_raises_clearly():
    ids = torch.tensor([3, 3, 3])
    with pytest.raises(ValueError, match=r"rows \[0, 1, 2\] have no candidate"):
        sample_hard_negatives(torch.zeros(3, 3), ids, ids)
    with pytest.raises(ValueError, match=r"rows \[1\] have no candidate"):
        sample_random_negatives(torch.tensor([3, 4]), torch.tensor([4, 4]))
    with pytest.raises(ValueError, match="sim must be"):
        sample_hard_negatives(torch.zeros(3, 2), ids, ids)


def ref_itm(logits: torch.Tensor, labels: torch.Tensor) -> float:
    total = 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        log_z = math.log(sum(math.exp(v) for v in row))
        total += -(row[y] - log_z)
    return total / len(labels)


def test_itm_loss_matches_reference_and_gradcheck():
    logits = torch.randn(7, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0])
    assert abs(itm_loss(logits, labels).item() - ref_itm(logits.detach(), labels)) < 1e-6
    assert torch.autograd.gradcheck(lambda x: itm_loss(x, labels), (logits,))
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        itm_loss(torch.zeros(3, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        itm_loss(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError):
        itm_loss(torch.zeros(3, 2), torch.zeros(3))
