"""ITC (in-batch, ALBEF queue + distillation) and SCL against python-loop float64 references."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megavl.objectives.itc import clamp_temperature_, itc_distill_loss, itc_loss
from megavl.objectives.scl import scl_loss

torch.manual_seed(0)


def _feats(n: int, e: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, e, generator=g, dtype=torch.float64), dim=-1)


def _ce_row(logits: list[float], target: list[float]) -> float:
    """-sum_j target_j * log softmax(logits)_j, written out."""
    mx = max(logits)
    log_z = mx + math.log(sum(math.exp(v - mx) for v in logits))
    return -sum(t * (v - log_z) for v, t in zip(logits, target))


def _dot(a, b) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b))


def ref_itc(img, txt, temp, targets=None) -> float:
    B = img.shape[0]
    if targets is None:
        targets = [[1.0 if i == j else 0.0 for j in range(B)] for i in range(B)]
    else:
        targets = targets.tolist()
    sim = [[_dot(img[i], txt[j]) / temp for j in range(B)] for i in range(B)]
    i2t = sum(_ce_row(sim[i], targets[i]) for i in range(B)) / B
    t2i = sum(_ce_row([sim[i][j] for i in range(B)], [targets[i][j] for i in range(B)]) for j in range(B)) / B
    return (i2t + t2i) / 2


def _softmax(v: list[float]) -> list[float]:
    mx = max(v)
    e = [math.exp(x - mx) for x in v]
    return [x / sum(e) for x in e]


def ref_itc_distill(img, txt, img_m, txt_m, img_q, txt_q, temp, alpha) -> float:
    B, Q = img.shape[0], img_q.shape[0]
    img_all = [img_m[i] for i in range(B)] + [img_q[q] for q in range(Q)]
    txt_all = [txt_m[i] for i in range(B)] + [txt_q[q] for q in range(Q)]
    total = 0.0
    for anchors, anchors_m, bank in ((img, img_m, txt_all), (txt, txt_m, img_all)):
        for i in range(B):
            soft = _softmax([_dot(anchors_m[i], c) / temp for c in bank])
            tgt = [alpha * s + (1 - alpha) * (1.0 if j == i else 0.0) for j, s in enumerate(soft)]
            total += _ce_row([_dot(anchors[i], c) / temp for c in bank], tgt) / B
    return total / 2


def ref_scl(vm, v, tm, t, temp) -> float:
    n = lambda x: F.normalize(x, dim=-1)  # noqa: E731
    return ref_itc(n(vm), n(v), temp) + ref_itc(n(tm), n(t), temp)


@pytest.mark.parametrize("B,E,temp", [(1, 3, 0.07), (4, 5, 0.07), (7, 2, 0.5)])
def test_itc_matches_reference(B, E, temp):
    img, txt = _feats(B, E, 1), _feats(B, E, 2)
    assert abs(itc_loss(img, txt, temp).item() - ref_itc(img, txt, temp)) < 1e-6


def test_itc_soft_targets_and_tensor_temperature():
    img, txt = _feats(5, 4, 3), _feats(5, 4, 4)
    targets = torch.softmax(torch.randn(5, 5, dtype=torch.float64), dim=1)
    temp = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    loss = itc_loss(img, txt, temp, sim_targets=targets)
    assert abs(loss.item() - ref_itc(img, txt, 0.1, targets)) < 1e-6
    loss.backward()
    assert temp.grad is not None and temp.grad.abs() > 0
    # Identity soft targets give exactly the hard-label loss.
    eye = torch.eye(5, dtype=torch.float64)
    assert torch.allclose(itc_loss(img, txt, 0.1, eye), itc_loss(img, txt, 0.1), atol=1e-12)


def test_itc_gradcheck_and_permutation_invariance():
    img = _feats(3, 4, 5).requires_grad_()
    txt = _feats(3, 4, 6).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: itc_loss(a, b, 0.2), (img, txt))
    perm = torch.tensor([2, 0, 1])
    assert torch.allclose(itc_loss(img[perm], txt[perm], 0.2), itc_loss(img, txt, 0.2), atol=1e-12)
    # Perfectly separated pairs at low temperature -> loss near 0.
    eye = torch.eye(3, dtype=torch.float64)
    assert itc_loss(eye, eye, 0.01).item() < 1e-6


def test_itc_bad_input():
    a = _feats(3, 4, 0)
    with pytest.raises(ValueError, match="as many"):
        itc_loss(a, _feats(4, 4, 1), 0.1)
    with pytest.raises(ValueError, match="widths"):
        itc_loss(a, _feats(3, 5, 1), 0.1)
    with pytest.raises(ValueError, match="> 0"):
        itc_loss(a, a, 0.0)
    with pytest.raises(ValueError, match="sim_targets"):
        itc_loss(a, a, 0.1, sim_targets=torch.eye(2))


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_itc_distill_matches_reference(alpha):
    B, Q, E, temp = 3, 4, 5, 0.07
    args = [_feats(B, E, s) for s in range(4)] + [_feats(Q, E, 10), _feats(Q, E, 11)]
    got = itc_distill_loss(*args, temperature=temp, alpha=alpha).item()
    assert abs(got - ref_itc_distill(*args, temp, alpha)) < 1e-6


def test_itc_distill_reduces_to_itc_and_has_no_target_grad():
    B, E = 4, 3
    img, txt = _feats(B, E, 1).requires_grad_(), _feats(B, E, 2).requires_grad_()
    img_m, txt_m = img.detach().clone().requires_grad_(), txt.detach().clone().requires_grad_()
    empty = torch.zeros(0, E, dtype=torch.float64)
    # alpha = 0 and an empty queue: plain in-batch ITC.
    loss = itc_distill_loss(img, txt, img_m, txt_m, empty, empty, 0.1, 0.0)
    assert torch.allclose(loss, itc_loss(img, txt, 0.1), atol=1e-12)
    itc_distill_loss(img, txt, img_m, txt_m, _feats(2, E, 7), _feats(2, E, 8), 0.1, 0.4).backward()
    assert img_m.grad is None and txt_m.grad is None and img.grad is not None
    with pytest.raises(ValueError, match="alpha"):
        itc_distill_loss(img, txt, img_m, txt_m, empty, empty, 0.1, 1.5)
    with pytest.raises(ValueError, match="queues"):
        itc_distill_loss(img, txt, img_m, txt_m, _feats(2, E, 7), _feats(3, E, 8), 0.1, 0.4)


def test_clamp_temperature():
    t = torch.nn.Parameter(torch.tensor(0.9))
    clamp_temperature_(t)
    assert t.item() == 0.5 and t.requires_grad
    t.data.fill_(1e-5)
    assert clamp_temperature_(t).item() == pytest.approx(0.001)
    with pytest.raises(ValueError):
        clamp_temperature_(t, 0.5, 0.1)


def test_scl_matches_reference_and_detaches_targets():
    B, E = 5, 6
    g = torch.Generator().manual_seed(3)
    vm, v, tm, t = (torch.randn(B, E, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4))
    loss = scl_loss(vm, v, tm, t)
    assert abs(loss.item() - ref_scl(vm.detach(), v.detach(), tm.detach(), t.detach(), 0.03)) < 1e-6
    loss.backward()
    assert v.grad is None and t.grad is None
    assert vm.grad.abs().sum() > 0 and tm.grad.abs().sum() > 0
    # Normalised inside: scaling a feature row does not change the loss.
    scaled = scl_loss(vm * 3.0, v * 0.5, tm * 7.0, t, temperature=0.03)
    assert torch.allclose(scaled, loss, atol=1e-10)


def test_scl_gradcheck_and_bad_input():
    B, E = 3, 4
    g = torch.Generator().manual_seed(4)
    vm, tm = (torch.randn(B, E, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v, t = (torch.randn(B, E, generator=g, dtype=torch.float64) for _ in range(2))
    assert torch.autograd.gradcheck(lambda a, b: scl_loss(a, v, b, t, 0.3), (vm, tm))
    with pytest.raises(ValueError, match="shape"):
        scl_loss(vm, v[:2], tm, t)
    with pytest.raises(ValueError, match="temperature"):
        scl_loss(vm, v, tm, t, temperature=0.0)


# --------------------------------------------------------------- each rank's rows vs the whole batch
def _rows_mean(world: int, n: int, loss_of_rows) -> torch.Tensor:
    """Mean over `world` simulated ranks of their rows' losses (what the trainer logs; DeepSpeed's
    gradient average over ranks differentiates the same mean)."""
    b = n // world
    return sum(loss_of_rows(slice(r * b, (r + 1) * b)) for r in range(world)) / world


@pytest.mark.parametrize("world", [2, 3])
def test_rows_mean_is_the_whole_batch_loss_with_its_gradients(world):
    n, E, Q = 6, 5, 4
    img, txt = _feats(n, E, 1).requires_grad_(), _feats(n, E, 2).requires_grad_()
    img_m, txt_m, img_q, txt_q = _feats(n, E, 3), _feats(n, E, 4), _feats(Q, E, 5), _feats(Q, E, 6)
    ids, qids = torch.tensor([0, 1, 0, 2, 3, 1]), torch.tensor([2, -1, -1, 0])
    cases = {
        "itc": lambda rows: itc_loss(img, txt, 0.1, rows=rows),
        "itc_ids": lambda rows: itc_loss(img, txt, 0.1, image_ids=ids, rows=rows),
        "itc_soft": lambda rows: itc_loss(img, txt, 0.1, sim_targets=torch.softmax(img_m @ txt_m.t(), 1), rows=rows),
        "distill": lambda rows: itc_distill_loss(img[rows or slice(None)], txt[rows or slice(None)], img_m, txt_m,
                                                 img_q, txt_q, 0.1, 0.4, ids, qids, rows=rows),
        "scl": lambda rows: scl_loss(img, img_m, txt, txt_m, 0.2, image_ids=ids, rows=rows),
    }
    for name, loss_of_rows in cases.items():
        whole = loss_of_rows(None)
        g_whole = torch.autograd.grad(whole, (img, txt))
        mean = _rows_mean(world, n, loss_of_rows)
        g_mean = torch.autograd.grad(mean, (img, txt))
        assert torch.allclose(mean, whole, atol=1e-12), name
        for a, b in zip(g_mean, g_whole):
            assert torch.allclose(a, b, atol=1e-12), name


def test_rows_hold_only_their_logits_and_are_checked():
    img, txt = _feats(8, 4, 1), _feats(8, 4, 2)
    with pytest.raises(ValueError, match="rows must be"):
        itc_loss(img, txt, 0.1, rows=slice(6, 10))
    with pytest.raises(ValueError, match="rows must be"):
        itc_loss(img, txt, 0.1, rows=slice(0, 8, 2))
    with pytest.raises(ValueError, match="img_feat has 3 rows"):
        itc_distill_loss(img[:3], txt[:3], img, txt, img[:2], txt[:2], 0.1, 0.4, rows=slice(0, 2))
    # The logits of 2 rows against 8 columns: 2 x 8 per direction, not 8 x 8.
    shapes = []
    with _RecordMatmul(shapes):
        itc_loss(img, txt, 0.1, rows=slice(2, 4))
    assert shapes == [(2, 8), (2, 8)]


class _RecordMatmul(torch.overrides.TorchFunctionMode):
    def __init__(self, shapes: list) -> None:
        super().__init__()
        self.shapes = shapes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") in ("__matmul__", "matmul"):
            self.shapes.append(tuple(out.shape))
        return out
