"""Worker for test_sharded_equals_unsharded.py: STEPS optimizer steps (grad_accum 2) of the tiny model on
fixed global batches, either as one process (ZeRO-0, the whole batch) or as one of 2 ranks (its half),
for each ZeRO stage named, one after the other in the same process (one DeepSpeed start-up for all).

    RANK=.. WORLD_SIZE=.. MASTER_ADDR=.. MASTER_PORT=.. python sharded_step_worker.py OUT_DIR STAGE [STAGE ...]

Per stage it writes OUT_DIR/stage{S}_rank{R}.json: per-step losses (averaged over ranks), the ITC
temperature the loss used and the optimizer's fp32 master after each step, the queue state (pointer,
image ids, a checksum of the features) after each step and after a checkpoint save + load into a fresh
engine, with the files the save fsynced (and when) and the files each rank read to restore megavl's
state, and a cross-attention weight's fp32 master and Adam moment after each step (optim.skip_unused).
Stage "plain" (one process) is the PyTorch reference loop without DeepSpeed: torch AdamW, which skips
parameters whose grad is None. The test asserts; the worker only measures.
"""
import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megavl.config import load_config
from megavl.engine import checkpoint, checkpoint_save
from megavl.tasks.curriculum import mode_at
from megavl.engine.launch import init_distributed
from megavl.engine.optim import build_scheduler, param_groups
from megavl.engine.step import build_engine, clear_zero3_grad_partitions, step_generator
from megavl.engine.unused import UnusedParameters
from megavl.engine.zero3_traces import TracePerKind
from megavl.tasks.curriculum import objectives_by_mode
from megavl.tasks.pretrain import PretrainModule, pretrain_params

GLOBAL_BATCH, TEXT_LEN, STEPS, ACCUM = 8, 16, 6, 2
TEMP_MIN, TEMP_MAX = 0.0695, 0.0705  # lr 1e-3 moves the temperature ~1e-3 a step: out in one step unclamped
OVERRIDES = [f"data.max_text_len={TEXT_LEN}", "optim.warmup_steps=1", "optim.lr=1e-3", f"run.max_steps={STEPS}",
             f"run.grad_accum={ACCUM}", "objectives.itc.queue_size=24", "objectives.itc.distill_alpha=0.4",
             "objectives.masking.text_guided=true", f"objectives.itc.temp_min={TEMP_MIN}",
             f"objectives.itc.temp_max={TEMP_MAX}", "curriculum.cycle=[[single, 2], [two, 1]]"]


def global_batch(step: int, micro: int) -> dict:
    """A fixed batch per (step, micro); samples 0/1 and 4/5 share an image id (two captions each)."""
    g = torch.Generator().manual_seed(1000 + 10 * step + micro)
    B, L = GLOBAL_BATCH, TEXT_LEN
    ids = torch.randint(1000, 3000, (B, L), generator=g)
    ids[:, 0] = 101
    lengths = torch.randint(6, L + 1, (B,), generator=g)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    picked = (torch.rand(B, L, generator=g) < 0.25) & mask.bool()
    picked[:, 0] = False
    mlm_ids = torch.where(picked, torch.full_like(ids, 103), ids)
    labels = torch.where(picked, ids, torch.full_like(ids, -100))
    image_ids = torch.arange(B) + 100 * step + 10 * micro
    image_ids[1], image_ids[5] = image_ids[0], image_ids[4]
    # Step 3 repeats step 0's images: the queue then holds positives of the current batch.
    if step == 3:
        image_ids = torch.arange(B) + 10 * micro
        image_ids[1], image_ids[5] = image_ids[0], image_ids[4]
    return {"images": torch.randn(B, 3, 64, 64, generator=g), "input_ids": ids, "attention_mask": mask,
            "mlm_input_ids": mlm_ids, "mlm_labels": labels, "scl_input_ids": mlm_ids, "image_ids": image_ids}


def _fp32_master(param: torch.nn.Parameter, stage: int) -> float:
    """The value the optimizer steps (collective under ZeRO-1/2/3)."""
    from deepspeed.utils import safe_get_full_fp32_param

    if stage == 0:
        return float(param.detach().float().reshape(-1)[0])
    return float(safe_get_full_fp32_param(param).reshape(-1)[0])


PROBE = "student.fusion.layers.0.cross.attn.q.weight"  # cross-attention: unused in single-stream steps


def _sha(t: torch.Tensor | None) -> str | None:
    return None if t is None else hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).hexdigest()


def _probe(module, optimizer, stage, unused: UnusedParameters | None = None) -> dict:
    """The probe's full fp32 master, summarised (a collective under ZeRO-1/2/3), and this rank's part
    of its master and Adam moments, hashed (what a skipped step must leave bit for bit)."""
    from deepspeed.utils import safe_get_full_fp32_param

    name = PROBE
    param = dict(module.named_parameters())[name]
    if stage in (0, "plain"):  # ZeRO-0 fp32: DeepSpeed steps the torch AdamW on the parameter itself
        master, local = param.detach().float(), {k: optimizer.state[param].get(k) for k in ("exp_avg", "exp_avg_sq")}
        local["param"] = master
    else:
        master = safe_get_full_fp32_param(param)
        local = {k: unused.local_state(name, k) for k in ("param", "exp_avg", "exp_avg_sq")}
    flat = master.double().flatten()
    return {"sum": float(flat.sum()), "sq": float((flat ** 2).sum()), "head": flat[:8].tolist(),
            **{f"local_{k}": _sha(v) for k, v in local.items()}}


def run_plain(out_dir: Path) -> dict:
    """The PyTorch reference: one process, the whole batch, torch AdamW (a parameter with no grad is
    skipped: no momentum, no weight decay, its own step count), clip_grad_norm_, the LR schedule."""
    cfg = load_config("configs/tiny.yaml", [f"data.batch_size={GLOBAL_BATCH}", *OVERRIDES])
    torch.manual_seed(cfg.run.seed)
    module = PretrainModule(cfg.model, cfg.objectives, objectives_by_mode(cfg.curriculum))
    trained = pretrain_params(module)
    optimizer = torch.optim.AdamW(param_groups(trained, cfg.optim), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  eps=cfg.optim.eps)
    scheduler = build_scheduler(optimizer, cfg.optim, STEPS)
    out = {"losses": [], "modes": [], "probe": []}
    for step in range(STEPS):
        mode = mode_at(step, 0, cfg.curriculum)
        sums: dict[str, torch.Tensor] = {}
        optimizer.zero_grad(set_to_none=True)
        for micro in range(ACCUM):
            total, losses = module(global_batch(step, micro), mode, step_generator(cfg.run.seed, step, micro,
                                                                                   torch.device("cpu")))
            (total / ACCUM).backward()
            for name, value in {"total": total, **losses}.items():
                sums[name] = sums.get(name, 0) + value.detach() / ACCUM
        torch.nn.utils.clip_grad_norm_([p for _, p in trained.named], cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        module.clamp_temperature()
        module.update_teachers(step, STEPS)
        out["losses"].append({n: float(v) for n, v in sums.items()})
        out["modes"].append(mode)
        out["probe"].append(_probe(module, optimizer, "plain"))
    return out


def _queue_state(module) -> dict:
    digest = hashlib.sha256(module.image_queue.detach().float().numpy().tobytes()
                            + module.text_queue.detach().float().numpy().tobytes()).hexdigest()
    return {"ptr": int(module.queue_ptr), "ids": module.queue_image_ids.tolist(), "features_sha": digest}


def _count_trace_invalidations() -> list[int]:
    """A counter of ZeRO-3's prefetch trace invalidations (a step whose module order differs from
    the trace its coordinator recorded)."""
    from deepspeed.runtime.zero import partitioned_param_coordinator as ppc

    counter, original = [0], ppc.PartitionedParameterCoordinator._invalidate_trace

    def counted(self):
        counter[0] += 1
        return original(self)

    ppc.PartitionedParameterCoordinator._invalidate_trace = counted
    return counter


def run_stage(stage: int, info, out_dir: Path) -> dict:
    world = info.world_size
    cfg = load_config("configs/tiny.yaml", [f"data.batch_size={GLOBAL_BATCH // world}", *OVERRIDES])
    torch.manual_seed(cfg.run.seed)
    engine, scheduler, zero = build_engine(cfg, f"ds_configs/zero{stage}.json", world, info.device)
    assert zero == stage
    module = engine.module
    unused = UnusedParameters.for_engine(pretrain_params(module).named, engine, zero, scheduler.optimizer)
    rows = slice(info.rank * GLOBAL_BATCH // world, (info.rank + 1) * GLOBAL_BATCH // world)
    out = {"losses": [], "temperature_used": [], "temperature_master": [], "queue": [], "modes": [], "probe": []}
    traces, invalidations = TracePerKind(engine), _count_trace_invalidations()
    for step in range(STEPS):
        mode = mode_at(step, 0, cfg.curriculum)
        traces.use(mode)  # as the Trainer does
        sums: dict[str, torch.Tensor] = {}
        for micro in range(ACCUM):  # the Trainer's loop
            batch = {k: v[rows] for k, v in global_batch(step, micro).items()}
            total, losses = engine(batch, mode, step_generator(cfg.run.seed, step, micro, info.device))
            engine.backward(total)
            if micro == ACCUM - 1:
                unused.before_step(step)
            engine.step()
            module.clamp_temperature()
            if micro == ACCUM - 1:
                clear_zero3_grad_partitions(engine, zero)
                unused.after_step()
            for name, value in {"total": total, **losses}.items():
                sums[name] = sums.get(name, 0) + value.detach() / ACCUM
        module.update_teachers(step, STEPS)
        names = sorted(sums)
        values = torch.stack([sums[n] for n in names])
        if world > 1:
            dist.all_reduce(values)
            values /= world
        out["losses"].append(dict(zip(names, values.tolist())))
        out["temperature_used"].append(float(module.temperature_used))
        out["temperature_master"].append(_fp32_master(module.temp, zero))
        out["queue"].append(_queue_state(module))
        out["modes"].append(mode)
        out["probe"].append(_probe(module, scheduler.optimizer, zero, unused))
    out["trace_invalidations"] = invalidations[0]

    # Save, then load into a fresh engine: the queue (features, ids, pointer) comes back as it was.
    ckpt = out_dir / f"ckpt_stage{stage}"
    save_info = checkpoint_save.SaveInfo(run_id="queue-test", world_size=world, zero_stage=zero, keep=1, config_yaml="")
    with _fsyncs() as fsynced:
        tag_dir = checkpoint_save.save(engine, module, ckpt, STEPS, info.rank, {}, save_info)
    out["fsynced"] = [(os.path.relpath(path, tag_dir), when) for path, when in fsynced]
    out["marker_files"] = sorted(json.loads((tag_dir / checkpoint.MARKER).read_text())["files"])
    torch.manual_seed(123)  # a different initial state, so the restore must really overwrite it
    fresh, _, _ = build_engine(cfg, f"ds_configs/zero{stage}.json", world, info.device)
    fresh.load_checkpoint(str(ckpt), tag=tag_dir.name, load_module_strict=False)
    out["state_reads"] = checkpoint.load_module_state(fresh.module, tag_dir, info.rank, world).files
    out["queue_restored"] = _queue_state(fresh.module)
    return out


@contextlib.contextmanager
def _fsyncs():
    """(path, time.perf_counter()) of every fsync this process makes inside the block (any thread)."""
    calls, real = [], os.fsync

    def recording(fd):
        real(fd)
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), time.perf_counter()))

    os.fsync = recording
    try:
        yield calls
    finally:
        os.fsync = real


def main(out_dir: str, *stages: str) -> None:
    info = init_distributed()
    torch.set_num_threads(1)
    for stage in stages:
        result = run_plain(Path(out_dir)) if stage == "plain" else run_stage(int(stage), info, Path(out_dir))
        with open(Path(out_dir) / f"stage{stage}_rank{info.rank}.json", "w") as f:
            json.dump(result, f)
        if dist.is_initialized():
            dist.barrier()


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
