"""The steady-state step does not wait on the device.

CPU: the MLM selection by a host-side count equals boolean indexing (values and gradients).
GPU: a full PretrainModule step (every objective, both curriculum modes, backward, AdamW, EMA teacher,
the stop flag between its checks, the step timer) under torch.cuda.set_sync_debug_mode("error"),
which raises on any host-device synchronisation. DeepSpeed is not part of it (its own step syncs
for the gradient norm and overflow checks, and it is not installed on the bare GPU image).
"""
from __future__ import annotations

import pytest
import torch

from megavl.config import OBJECTIVE_NAMES, load_config
from megavl.engine.metrics import StepTimer
from megavl.engine.stop import StopFlag
from megavl.tasks.pretrain import PretrainModule


def _batch(device, B=8, L=16, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 1100, (B, L), generator=g)
    ids[:, 0] = 101
    mask = (torch.arange(L)[None] < torch.randint(6, L + 1, (B,), generator=g)[:, None]).long()
    picked = (torch.rand(B, L, generator=g) < 0.3) & mask.bool()
    picked[:, 0] = False
    picked[:, 1] = True
    batch = {"images": torch.randn(B, 3, size, size, generator=g), "input_ids": ids * mask, "attention_mask": mask,
             "mlm_input_ids": torch.where(picked, torch.full_like(ids, 103), ids * mask),
             "mlm_labels": torch.where(picked, ids, torch.full_like(ids, -100)), "image_ids": torch.arange(B)}
    count = int(picked.sum())  # what engine.step.to_device adds, from the CPU batch
    return {**{k: v.to(device) for k, v in batch.items()}, "mlm_count": count}


def _module(device):
    torch.manual_seed(0)
    cfg = load_config("configs/tiny.yaml", ["data.max_text_len=16"])
    names = list(OBJECTIVE_NAMES)
    return PretrainModule(cfg.model, cfg.objectives, {"single": names, "two": names}).to(device)


def test_mlm_counted_selection_equals_boolean_indexing():
    module = _module("cpu")
    batch = _batch("cpu")
    states = torch.randn(8, 16, 128, requires_grad=True)  # tiny fusion width
    by_mask = module._mlm(states, batch["mlm_labels"])
    (grad_mask,) = torch.autograd.grad(by_mask, states)
    by_count = module._mlm(states, batch["mlm_labels"], batch["mlm_count"])
    (grad_count,) = torch.autograd.grad(by_count, states)
    assert torch.equal(by_mask, by_count)
    assert torch.allclose(grad_mask, grad_count, atol=1e-7, rtol=0)


@pytest.mark.gpu
def test_steady_state_step_has_no_host_sync():
    device = torch.device("cuda")
    module = _module(device)
    opt = torch.optim.AdamW([p for _, p in module.student_parameters()], lr=1e-4, foreach=True)
    batch = _batch(device)
    stop, timer = StopFlag(), StepTimer(device)

    def step(i: int, mode: str) -> None:
        timer.start_step()
        gen = torch.Generator(device=device).manual_seed(i)
        total, _ = module(batch, mode, gen)
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        module.update_teachers(i, 1000)
        timer.step_done()
        assert not stop.agreed_at(i, 10, device)  # not a check step: no collective, no sync

    for i, mode in enumerate(("single", "two")):  # warm-up: lazy state (AdamW moments, EMA masters)
        step(i + 1, mode)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, mode in enumerate(("single", "two")):
            step(i + 3, mode)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert timer.seconds_per_step > 0  # the log step reads the device time (a sync, allowed there)
