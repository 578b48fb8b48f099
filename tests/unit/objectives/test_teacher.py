"""EMA teacher (unsharded path; ZeRO-3 is in tests/distributed) and the single-process gather helpers."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from megavl.objectives.distributed import all_reduce_mean, gather_features
from megavl.objectives.teacher import ema_update_, make_teacher, teacher_momentum


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))


def test_teacher_momentum_schedule():
    assert teacher_momentum(0, 100) == pytest.approx(0.996)
    assert teacher_momentum(100, 100) == pytest.approx(1.0)
    assert teacher_momentum(250, 100) == pytest.approx(1.0)  # clamped after the end
    for step in (1, 17, 50, 99):
        expected = 1.0 - (1.0 - 0.996) * (math.cos(math.pi * step / 100) + 1) / 2
        assert teacher_momentum(step, 100) == pytest.approx(expected, abs=1e-15)
    values = [teacher_momentum(s, 40, base=0.9, final=0.99) for s in range(41)]
    assert all(b >= a for a, b in zip(values, values[1:])) and values[20] == pytest.approx(0.945)
    with pytest.raises(ValueError):
        teacher_momentum(0, 0)
    with pytest.raises(ValueError):
        teacher_momentum(-1, 10)


def test_make_teacher_is_frozen_independent_copy():
    student = _net()
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    for (n, s), (_, t) in zip(student.named_parameters(), teacher.named_parameters()):
        assert torch.equal(s, t) and s.data_ptr() != t.data_ptr(), n


def test_ema_update_matches_formula_with_buffers():
    student, teacher = _net(), _net()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(1.0)
    student.train()(torch.randn(8, 3))  # moves BatchNorm running stats and num_batches_tracked
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update_(teacher, student, 0.7)
    s_state = student.state_dict()
    for k, t in teacher.state_dict().items():
        if t.dtype.is_floating_point:
            assert torch.allclose(t, 0.7 * before[k] + 0.3 * s_state[k], atol=1e-7), k
        else:
            assert torch.equal(t, s_state[k]), k  # integer buffers are copied
    assert all(not p.requires_grad for p in make_teacher(student).parameters())


@pytest.mark.parametrize("mode", ["copy", "skip"])
def test_ema_buffer_modes(mode):
    student, teacher = _net(), _net()
    student.train()(torch.randn(8, 3))
    before = teacher[1].running_mean.clone()
    ema_update_(teacher, student, 0.5, buffers=mode)
    expected = student[1].running_mean if mode == "copy" else before
    assert torch.equal(teacher[1].running_mean, expected)


def test_ema_extremes_and_no_grad():
    student, teacher = _net(), _net()
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(-1)
    frozen = [p.clone() for p in teacher.parameters()]
    ema_update_(teacher, student, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), frozen))
    ema_update_(teacher, student, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), student.parameters()))
    assert all(p.grad is None for p in teacher.parameters())


def test_ema_bf16_computed_in_fp32():
    student, teacher = nn.Linear(4, 3).bfloat16(), nn.Linear(4, 3).bfloat16()
    expected = (0.9 * teacher.weight.float() + 0.1 * student.weight.float()).bfloat16()
    ema_update_(teacher, student, 0.9)
    assert torch.equal(teacher.weight, expected)


def test_ema_mismatch_raises():
    student = _net()
    with pytest.raises(ValueError, match="missing in teacher"):
        ema_update_(nn.Sequential(nn.Linear(3, 5)), student, 0.9)
    other = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    with pytest.raises(ValueError, match="shape"):
        ema_update_(other, student, 0.9)
    with pytest.raises(ValueError, match="momentum"):
        ema_update_(make_teacher(student), student, 1.1)
    with pytest.raises(ValueError, match="buffers"):
        ema_update_(make_teacher(student), student, 0.9, buffers="mean")


def test_gather_helpers_are_identity_without_distributed():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_features(x) is x and gather_features(x, with_grad=False) is x
    mean = all_reduce_mean(x)
    assert torch.equal(mean, x) and not mean.requires_grad


def test_bf16_teacher_follows_fp32_master_weights():
    """At momentum 0.999 a bf16 teacher alone barely moves (updates fall below its rounding step);
    with fp32 master copies it tracks the fp32 EMA to bf16 precision."""
    torch.manual_seed(0)
    student = nn.Linear(16, 16).to(torch.bfloat16)
    plain, mastered = make_teacher(student), make_teacher(student)
    reference = {n: p.detach().float().clone() for n, p in plain.named_parameters()}
    master: dict = {}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.5)  # the student moves away; the teacher must follow slowly
    for _ in range(200):
        ema_update_(plain, student, 0.999)
        ema_update_(mastered, student, 0.999, master=master)
        for n, p in student.named_parameters():
            reference[n].mul_(0.999).add_(p.float(), alpha=0.001)
    for n, p in mastered.named_parameters():
        torch.testing.assert_close(p.float(), reference[n], atol=1e-2, rtol=1e-2)
    drift_plain = max((p.float() - reference[n]).abs().max().item() for n, p in plain.named_parameters())
    assert drift_plain > 0.05, drift_plain  # without masters the bf16 EMA falls behind
    assert set(master) == {"weight", "bias"} and all(v.dtype == torch.float32 for v in master.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_foreach_ema_equals_the_per_tensor_loop(dtype):
    """The grouped update gives bitwise the same teacher (and fp32 masters) as the per-tensor loop, over
    several steps, with buffers, and a cached plan reused across calls."""
    from teacher_reference import ema_update_loop_

    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).to(dtype)
    fast, slow = make_teacher(student), make_teacher(student)
    master_fast, master_slow = {}, {}
    for step in range(3):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
            student[1].running_mean.add_(1.0)
        ema_update_(fast, student, 0.9 + 0.03 * step, master=master_fast)
        ema_update_loop_(slow, student, 0.9 + 0.03 * step, master=master_slow)
    for (name, a), b in zip(fast.state_dict().items(), slow.state_dict().values()):
        assert torch.equal(a, b), name
    assert master_fast.keys() == master_slow.keys()
    for key in master_fast:
        assert torch.equal(master_fast[key], master_slow[key]), key
    assert (len(master_fast) > 0) == (dtype == torch.bfloat16)


def _as_one_rank_zero3(module: nn.Module) -> None:
    """Give every parameter the layout DeepSpeed's ZeRO-3 has on ONE rank for a persistent parameter:
    a flat `ds_tensor` shard holding all of it, and `.data` a view of that same memory (NoGatherHandle)."""
    for p in module.parameters():
        shard = p.data.detach().clone().flatten()
        p.ds_tensor, p.ds_numel, p.ds_shape = nn.Parameter(shard, requires_grad=False), shard.numel(), p.shape
        p.data = p.ds_tensor.data.view(p.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ema_once_when_the_full_copy_is_the_shard(dtype):
    # On one ZeRO-3 rank the full copy and the shard are one memory: updating both would apply the
    # EMA twice (momentum m**2), and a run resumed from 2 ranks onto 1 would drift.
    torch.manual_seed(0)
    student = _net().to(dtype)
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    want = {n: t.float().mul(0.9).add(s.float(), alpha=0.1) for (n, t), (_, s) in
            zip(teacher.named_parameters(), student.named_parameters())}
    _as_one_rank_zero3(student)
    _as_one_rank_zero3(teacher)
    master: dict = {}
    ema_update_(teacher, student, 0.9, master=master)
    for name, t in teacher.named_parameters():
        assert t.data.data_ptr() == t.ds_tensor.data_ptr()  # still one memory
        torch.testing.assert_close(t.data.float(), want[name].to(dtype).float(), rtol=1e-6, atol=1e-6)
        if dtype == torch.bfloat16:  # one fp32 master, saved under both keys (resumable on W > 1)
            assert master[f"{name}/full"] is master[name]
            torch.testing.assert_close(master[name].view(t.shape), want[name], rtol=1e-6, atol=1e-7)
    assert (not master) == (dtype == torch.float32)
