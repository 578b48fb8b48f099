"""The steady-state step does not wait on the device.

CPU: the MLM selection by a host-side count equals boolean indexing (values and gradients); a full
step through the flash dispatch, with a stand-in flash-attn (tests/flash_standin.py), runs no op that
would make a CUDA host wait, and uses the varlen kernel only for masked calls.
GPU: a full PretrainModule step (every objective, both curriculum modes, backward, AdamW, EMA teacher,
the stop flag between its checks, the step timer) under torch.cuda.set_sync_debug_mode("error"),
which raises on any host-device synchronisation; with flash-attn installed, the same in bf16 through
flash (dense and varlen kernels both called). DeepSpeed is not part of it (its own step syncs for the
gradient norm and overflow checks, and it is not installed on the bare GPU image).
"""
from __future__ import annotations

import pytest
import torch

import megavl.models.attention as attn_mod
from flash_standin import StandinFlash, SyncCounter, install
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


# Validations that sync only on CPU: on CUDA they are torch._assert_async (no host wait).
CPU_ONLY_CHECKS = {"_valid_columns", "check_scatter"}


def _module(device, attention="auto"):
    torch.manual_seed(0)
    cfg = load_config("configs/tiny.yaml", ["data.max_text_len=16", f"model.attention={attention}"])
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


def test_step_through_flash_dispatch_has_no_host_sync_and_matches_sdpa(monkeypatch):
    batch = _batch("cpu")
    reference = _module("cpu", attention="sdpa")
    module = _module("cpu", attention="flash")
    counter = SyncCounter()
    flash = StandinFlash(counter)
    install(monkeypatch, flash)
    for mode in ("single", "two"):
        flash.calls.clear()
        with counter:
            total, _ = module(batch, mode, torch.Generator().manual_seed(1))
            total.backward()
        ref_total, _ = reference(batch, mode, torch.Generator().manual_seed(1))
        ref_total.backward()
        torch.testing.assert_close(total, ref_total, atol=1e-5, rtol=1e-5)
        kinds = [kind for kind, _ in flash.calls]
        # ViT blocks and cross-attention to image tokens are unmasked: the dense kernel; text is padded.
        assert kinds.count("dense") >= 2 and kinds.count("varlen") >= 2, kinds
    syncs = {where: n for where, n in counter.where.items() if where not in CPU_ONLY_CHECKS}
    assert syncs == {}, f"host syncs in the step: {dict(counter.counts)} from {syncs}"
    for (name, p), (_, p_ref) in zip(module.named_parameters(), reference.named_parameters()):
        if p_ref.grad is not None:
            torch.testing.assert_close(p.grad, p_ref.grad, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


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


@pytest.mark.gpu
def test_bf16_step_through_flash_has_no_host_sync(monkeypatch):
    pytest.importorskip("flash_attn", reason="flash-attn not installed (pip install 'megavl[flash]')")
    real = attn_mod._flash_kernels()
    calls = []

    def counted(kind, fn):
        def run(*args, **kwargs):
            calls.append(kind)
            return fn(*args, **kwargs)
        return run
    monkeypatch.setattr(attn_mod, "_flash_kernels",
                        lambda: attn_mod.FlashKernels(counted("dense", real.dense), counted("varlen", real.varlen)))
    device = torch.device("cuda")
    module = _module(device, attention="flash").to(torch.bfloat16)  # flash, or an error: never sdpa
    opt = torch.optim.AdamW([p for _, p in module.student_parameters()], lr=1e-4, foreach=True)
    fp32 = _batch(device)
    batch = {**{k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
                for k, v in fp32.items()}, "images_fp32": fp32["images"]}  # as engine.step.to_device

    def step(i: int, mode: str) -> None:
        total, _ = module(batch, mode, torch.Generator(device=device).manual_seed(i))
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        module.update_teacher(0.99)

    for i, mode in enumerate(("single", "two")):
        step(i + 1, mode)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, mode in enumerate(("single", "two")):
            step(i + 3, mode)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert calls.count("dense") > 0 and calls.count("varlen") > 0, calls
