"""Training-step figures: DeepSpeed framework overhead, and end-to-end throughput + MFU on a GPU.

  framework overhead  one megavl step (ZeRO-0 engine: forward, engine.backward, engine.step) vs a
                      hand-written PyTorch loop over the same PretrainModule, batch, losses, AdamW
                      param groups, clipping and LR schedule. Both sides start from the same weights
                      and run the same curriculum modes, interleaved. fp32 on both sides (DeepSpeed's
                      bf16 keeps fp32 master weights, which a plain bf16 loop would not).
  end to end (CUDA)   the 4M recipe (ViT-B/16 + BERT-base, 256 px, all objectives, ITC queue) in bf16
                      with ZeRO-3 on one GPU at the largest micro-batch that fits: samples/s/GPU, MFU.
"""
from __future__ import annotations

import gc
import statistics
import time

import torch
import torch.distributed as dist

from megavl.config import load_config
from megavl.tasks.curriculum import objectives_by_mode
from megavl.engine.metrics import mfu, peak_flops
from megavl.tasks.pretrain_flops import step_flops
from megavl.engine.launch import init_distributed
from megavl.engine.optim import build_optimizer, build_scheduler, param_groups
from megavl.engine.step import build_engine, clear_zero3_grad_partitions, step_generator, zero_fill_unused_grads
from megavl.tasks.pretrain import PretrainModule, pretrain_params

from harness import DS_CONFIGS, RECIPES, Row, interleaved_median, sync, synthetic_batch

MODES = ("single", "two")
E2E_BATCHES = (128, 96, 64, 48, 32, 16, 8)   # tried largest first; the first that fits is reported


def ensure_distributed() -> None:
    """The engine needs a process group; a bench process is a world of one."""
    if not dist.is_initialized():
        init_distributed()


def _batch_overrides(batch_size: int) -> list[str]:
    return [f"data.batch_size={batch_size} run.global_batch_size={batch_size} run.grad_accum=1"]


# -------------------------------------------------------------------------------- framework overhead
def _megavl_step(engine, zero_stage: int, batch: dict, device: torch.device):
    state = {"step": 0}

    def run() -> None:
        for mode in MODES:
            gen = step_generator(0, state["step"], 0, device)
            total, _ = engine(batch, mode, gen)
            engine.backward(total)
            zero_fill_unused_grads(engine.module, zero_stage)
            engine.step()
            state["step"] += 1
    return run


def _plain_step(module: PretrainModule, optimizer, scheduler, grad_clip: float, batch: dict,
                device: torch.device):
    params = [p for _, p in module.student_parameters() if p.requires_grad]
    state = {"step": 0}

    def run() -> None:
        for mode in MODES:
            gen = step_generator(0, state["step"], 0, device)
            total, _ = module(batch, mode, gen)
            total.backward()
            zero_fill_unused_grads(module, 0)
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
    return run


def framework_overhead(device: torch.device, quick: bool, geometry: str, recipe, batch_size: int,
                       text_len: int, reps: int) -> Row:
    """Seconds per optimizer step (mean of a single- and a two-stream step), megavl vs plain PyTorch."""
    ensure_distributed()
    cfg = load_config(recipe, _batch_overrides(batch_size) + ["run.precision=fp32"])
    torch.manual_seed(0)
    engine, _, stage = build_engine(cfg, str(DS_CONFIGS[0]), 1, device)
    torch.manual_seed(0)
    module = PretrainModule(cfg.model, cfg.objectives, objectives_by_mode(cfg.curriculum)).to(device)
    optimizer = build_optimizer(param_groups(pretrain_params(module), cfg.optim), cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.run.max_steps)
    batch = synthetic_batch(cfg, batch_size, text_len, device)
    t = interleaved_median({"megavl": _megavl_step(engine, stage, batch, device),
                            "plain": _plain_step(module, optimizer, scheduler, cfg.optim.grad_clip, batch, device)},
                           device, reps)
    del engine, module, optimizer
    gc.collect()
    return Row("framework overhead", f"{geometry}, B={batch_size} L={text_len}", "ms per step",
               t["megavl"] / len(MODES) * 1e3, t["plain"] / len(MODES) * 1e3,
               "plain PyTorch loop (AdamW, no DeepSpeed)", "<= 1.05x",
               note=f"ZeRO-0, fp32, single+two steps, median of {reps}")


def framework_rows(device: torch.device, quick: bool, include_base: bool) -> list[Row]:
    cpu = device.type == "cpu"
    rows = [framework_overhead(device, quick, "tiny", RECIPES["tiny"], 8 if quick else 16, 24,
                               reps=3 if quick else 7)]
    if include_base or (not quick and not cpu):
        rows.append(framework_overhead(device, quick, "base (4M recipe)", RECIPES["4m"],
                                       2 if cpu else 16, 30, reps=3 if cpu else 10))
    else:
        rows.append(Row("framework overhead", "base (4M recipe)", "ms per step", None, None,
                        "plain PyTorch loop (AdamW, no DeepSpeed)", "<= 1.05x",
                        note="skipped: runs on CUDA without --quick, or with --base"))
    return rows


# --------------------------------------------------------------------------------------- end to end
def _time_e2e(batch_size: int, device: torch.device, steps: int) -> tuple[float, dict, object]:
    """Median seconds per optimizer step of the 4M recipe at this micro-batch (raises on OOM)."""
    cfg = load_config(RECIPES["4m"], _batch_overrides(batch_size) + ["run.precision=bf16"])
    torch.manual_seed(0)
    engine, _, stage = build_engine(cfg, str(DS_CONFIGS[3]), 1, device)
    try:
        text_len = cfg.data.max_text_len
        batch = synthetic_batch(cfg, batch_size, text_len, device, torch.bfloat16)
        times = []
        for step in range(steps + 2):  # two warm-up steps
            mode = MODES[step % 2]
            sync(device)
            start = time.perf_counter()
            total, _ = engine(batch, mode, step_generator(0, step, 0, device))
            engine.backward(total)
            engine.step()
            clear_zero3_grad_partitions(engine, stage)
            engine.module.update_teachers(step, steps + 2)
            sync(device)
            if step >= 2:
                times.append(time.perf_counter() - start)
        num_mlm = int((batch["mlm_labels"] != -100).sum())
        flops = statistics.mean(step_flops(cfg.model, cfg.objectives, engine.module.active(m), m, batch_size,
                                           text_len, num_mlm).total for m in MODES)
        return statistics.median(times), {"flops": flops}, cfg
    finally:
        engine.destroy() if hasattr(engine, "destroy") else None
        del engine
        gc.collect()
        torch.cuda.empty_cache()


def end_to_end(device: torch.device, quick: bool) -> list[Row]:
    metric_rows = ("samples/s per GPU", "MFU")
    if device.type != "cuda":
        return [Row("end to end", "4M recipe, bf16, ZeRO-3, 1 GPU", metric, None, None, "", "",
                    note="skipped: needs CUDA (code path in bench/bench_step.py)") for metric in metric_rows]
    ensure_distributed()
    steps = 3 if quick else 10
    for batch_size in E2E_BATCHES:
        try:
            seconds, info, _ = _time_e2e(batch_size, device, steps)
        except torch.cuda.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
            continue
        peak = peak_flops(device)
        util = mfu(info["flops"], seconds, 1, peak)
        note = f"micro-batch {batch_size} (largest of {E2E_BATCHES} that fits), median of {steps} steps"
        return [Row("end to end", "4M recipe, bf16, ZeRO-3, 1 GPU", "samples/s per GPU", batch_size / seconds,
                    None, "", "", note=note),
                Row("end to end", "4M recipe, bf16, ZeRO-3, 1 GPU", "MFU", util, None, "", "",
                    note=note if peak else "no peak FLOPs known for this GPU")]
    return [Row("end to end", "4M recipe, bf16, ZeRO-3, 1 GPU", metric, None, None, "", "",
                note=f"no micro-batch of {E2E_BATCHES} fits") for metric in metric_rows]
