"""MLM, pixel MIM and semantic MIM (+ centre update) against python-loop float64 references."""
from __future__ import annotations

import math

import pytest
import torch

from megavl.objectives.mim_pixel import mim_pixel_loss
from megavl.objectives.mim_semantic import semantic_mim_loss, update_center
from megavl.objectives.mlm import mlm_loss


def _randn(*shape: int, seed: int = 0, grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)


def _log_softmax(row: list[float]) -> list[float]:
    mx = max(row)
    log_z = mx + math.log(sum(math.exp(v - mx) for v in row))
    return [v - log_z for v in row]


def ref_mlm(logits: torch.Tensor, labels: torch.Tensor) -> float:
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            y = int(labels[b, t])
            if y != -100:
                total += -_log_softmax(logits[b, t].tolist())[y]
                count += 1
    return total / max(count, 1)


def test_mlm_matches_reference_and_gradcheck():
    logits = _randn(2, 5, 11, seed=1, grad=True)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[0, 4], labels[1, 0] = 3, 10, 0
    assert abs(mlm_loss(logits, labels).item() - ref_mlm(logits.detach(), labels)) < 1e-6
    assert torch.autograd.gradcheck(lambda x: mlm_loss(x, labels), (logits,))
    # Unmasked positions get no gradient.
    mlm_loss(logits, labels).backward()
    assert logits.grad[0, 0].abs().sum() == 0 and logits.grad[0, 1].abs().sum() > 0


def test_mlm_no_masked_token_is_zero_with_grad_path():
    logits = _randn(2, 3, 4, seed=2, grad=True)
    loss = mlm_loss(logits, torch.full((2, 3), -100))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() == 0


def test_mlm_bf16_and_bad_input():
    logits = _randn(1, 4, 6, seed=3).to(torch.bfloat16)
    labels = torch.tensor([[1, -100, 5, 2]])
    loss = mlm_loss(logits, labels)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref_mlm(logits.double(), labels)) < 1e-5
    with pytest.raises(ValueError, match="leading dims"):
        mlm_loss(logits, labels[:, :3])
    with pytest.raises(TypeError):
        mlm_loss(logits, labels.float())


def ref_mim_pixel(pred: torch.Tensor, target: torch.Tensor) -> float:
    B, M, P = pred.shape
    per_patch = [sum((float(pred[b, m, p]) - float(target[b, m, p])) ** 2 for p in range(P)) / P
                 for b in range(B) for m in range(M)]
    return sum(per_patch) / len(per_patch)


def test_mim_pixel_matches_reference_gradcheck_and_mae_form():
    pred, target = _randn(2, 3, 5, seed=4, grad=True), _randn(2, 3, 5, seed=5)
    assert abs(mim_pixel_loss(pred, target).item() - ref_mim_pixel(pred.detach(), target)) < 1e-6
    assert torch.autograd.gradcheck(lambda x: mim_pixel_loss(x, target), (pred,))
    # MAE's form: full-image per-patch loss weighted by the mask, on the masked subset only.
    full_pred, full_target = _randn(2, 6, 5, seed=6), _randn(2, 6, 5, seed=7)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.float64)
    mae = ((full_pred - full_target) ** 2).mean(-1).mul(mask).sum() / mask.sum()
    idx = mask.bool()
    ours = mim_pixel_loss(full_pred[idx].view(2, 3, 5), full_target[idx].view(2, 3, 5))
    assert abs(ours.item() - mae.item()) < 1e-12
    with pytest.raises(ValueError, match="both be"):
        mim_pixel_loss(pred, target[:, :2])
    with pytest.raises(ValueError, match="nothing|no masked"):
        mim_pixel_loss(torch.zeros(2, 0, 5), torch.zeros(2, 0, 5))


def ref_semantic(student, teacher, center, ts, tt, weights=None) -> float:
    K = student.shape[-1]
    s_rows, t_rows = student.reshape(-1, K).tolist(), teacher.reshape(-1, K).tolist()
    w = [1.0] * len(s_rows) if weights is None else [float(x) for x in weights.reshape(-1)]
    total = 0.0
    for s_row, t_row, wi in zip(s_rows, t_rows, w):
        t_logp = _log_softmax([(t - c) / tt for t, c in zip(t_row, center.tolist())])
        s_logp = _log_softmax([s / ts for s in s_row])
        total += wi * -sum(math.exp(tp) * sp for tp, sp in zip(t_logp, s_logp))
    return total / sum(w) if sum(w) > 0 else 0.0


@pytest.mark.parametrize("shape", [(4, 7), (2, 3, 7)])
def test_semantic_mim_matches_reference(shape):
    student, teacher = _randn(*shape, seed=8), _randn(*shape, seed=9)
    center = _randn(7, seed=10)
    got = semantic_mim_loss(student, teacher, center, 0.1, 0.04).item()
    assert abs(got - ref_semantic(student, teacher, center, 0.1, 0.04)) < 1e-6
    weights = torch.rand(shape[:-1], generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    got = semantic_mim_loss(student, teacher, center, 0.1, 0.04, weights=weights).item()
    assert abs(got - ref_semantic(student, teacher, center, 0.1, 0.04, weights)) < 1e-6


def test_semantic_mim_grad_only_to_student_and_invariances():
    student, teacher = _randn(3, 2, 5, seed=12, grad=True), _randn(3, 2, 5, seed=13, grad=True)
    center = _randn(5, seed=14, grad=True)
    loss = semantic_mim_loss(student, teacher, center, 0.1, 0.07)
    loss.backward()
    assert teacher.grad is None and center.grad is None and student.grad.abs().sum() > 0
    s, t, c = student.detach(), teacher.detach(), center.detach()
    assert torch.autograd.gradcheck(lambda x: semantic_mim_loss(x, t, c, 0.1, 0.07), (s.clone().requires_grad_(),))
    # Shifting all logits of a token by a constant changes neither softmax.
    shifted = semantic_mim_loss(s + 3.0, t - 2.0, c, 0.1, 0.07)
    assert abs(shifted.item() - loss.item()) < 1e-10
    # Bool mask = weighted mean over the selected tokens only; all-False gives 0 with a grad path.
    mask = torch.tensor([[True, False], [False, False], [True, True]])
    sel = semantic_mim_loss(s[mask], t[mask], c, 0.1, 0.07)
    assert abs(semantic_mim_loss(s, t, c, 0.1, 0.07, weights=mask).item() - sel.item()) < 1e-12
    x = s.clone().requires_grad_()
    zero = semantic_mim_loss(x, t, c, 0.1, 0.07, weights=torch.zeros(3, 2, dtype=torch.bool))
    zero.backward()
    assert zero.item() == 0.0 and x.grad.abs().sum() == 0


def test_semantic_mim_bad_input():
    s = _randn(2, 5)
    with pytest.raises(ValueError, match="share a shape"):
        semantic_mim_loss(s, _randn(2, 4), _randn(5), 0.1, 0.04)
    with pytest.raises(ValueError, match="center"):
        semantic_mim_loss(s, s, _randn(4), 0.1, 0.04)
    with pytest.raises(ValueError, match="temperatures"):
        semantic_mim_loss(s, s, _randn(5), 0.1, 0.0)
    with pytest.raises(ValueError, match="weights"):
        semantic_mim_loss(s, s, _randn(5), 0.1, 0.04, weights=torch.ones(3))


def test_update_center_single_process():
    center = _randn(4, seed=15)
    logits = _randn(3, 2, 4, seed=16)
    rows = logits.reshape(-1, 4).tolist()
    mean = [sum(r[k] for r in rows) / len(rows) for k in range(4)]
    expected = [0.9 * float(c) + 0.1 * m for c, m in zip(center, mean)]
    got = update_center(center, logits, momentum=0.9)
    assert max(abs(a - b) for a, b in zip(got.tolist(), expected)) < 1e-12
    assert torch.equal(update_center(center, logits, momentum=1.0), center)
    assert got.dtype == center.dtype and not got.requires_grad
    with pytest.raises(ValueError):
        update_center(center, _randn(3, 5))
    with pytest.raises(ValueError, match="momentum"):
        update_center(center, logits, momentum=1.5)
