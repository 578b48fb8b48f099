"""The pieces of one optimizer step that every task shares: the DeepSpeed engine around a task's
module, the step's random generator, host-to-device batches, gradient bookkeeping DeepSpeed
leaves to us, and the reductions that logging needs."""
from __future__ import annotations

import hashlib
import os

import deepspeed
import torch
import torch.distributed as dist

from megavl.config import Config
from megavl.tasks.task import TrainedParameters

from .ds_compat import check_engine
from .ds_config import build_ds_config, zero_stage
from .optim import build_optimizer, build_scheduler, param_groups


def step_generator(seed: int, step: int, micro: int, device: torch.device) -> torch.Generator:
    """Masks and ITM negatives of a step are a pure function of (seed, step, micro), the same on every
    rank (each draws for the global batch and keeps its rows): a resumed run draws the same ones
    without saving generator state, and the draws do not depend on the world size."""
    digest = hashlib.sha256(f"{seed}/{step}/{micro}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


# Loss targets, read by the loss in float32: the compute dtype would round them (bf16: 0.3 -> 0.3008).
FULL_PRECISION_KEYS = frozenset({"target"})


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """The host batch on the device, floating model inputs in the compute dtype (loss targets,
    `FULL_PRECISION_KEYS`, as they are)."""
    out = {}
    if "mlm_labels" in batch:  # counted on the host: the MLM head's selection then needs no device sync
        out["mlm_count"] = int((batch["mlm_labels"] != -100).sum())
    for key, value in batch.items():
        if torch.is_tensor(value):
            value = value.to(device, non_blocking=True)
            out[key] = value.to(dtype) if value.is_floating_point() and key not in FULL_PRECISION_KEYS else value
            if key == "images" and value.is_floating_point() and value.dtype != dtype:
                out["images_fp32"] = value  # MIM pixel targets come from the full-precision pixels
        else:
            out[key] = value
    return out


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    names = sorted(values)
    if not names:
        return {}
    stacked = torch.stack([values[n].detach().float() for n in names])
    if dist.is_initialized():
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(names, stacked.tolist()))


def sum_skips(counts: dict[str, int], device: torch.device) -> dict[str, int]:
    """Skip counts summed over ranks; `counts` has the same keys in the same order on every rank (a
    loader's skip_counts() lists every reason it knows), so every rank reduces the same vector."""
    reasons = list(counts)
    t = torch.tensor([float(counts.get(r, 0)) for r in reasons], device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return {r: int(v) for r, v in zip(reasons, t.tolist())}


def share_cpu_threads(device: torch.device) -> None:
    """On CPU, ranks on one machine share its cores: without this each rank starts one thread per
    core and they thrash. An explicit OMP_NUM_THREADS wins."""
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "0")) or 0)
    if local_world <= 0:
        local_world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


def deepspeed_engine(module: torch.nn.Module, trained: TrainedParameters, cfg: Config, ds_config_path: str,
                     world_size: int, device: torch.device):
    """The DeepSpeed engine around `module` (call after init_distributed and seeding), with AdamW over
    `trained` and the recipe's schedule. Returns (engine, lr_scheduler, zero_stage)."""
    ds_config = build_ds_config(ds_config_path, cfg, world_size, device)
    optimizer = build_optimizer(param_groups(trained, cfg.optim), cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.run.max_steps)
    engine, _, _, scheduler = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
    check_engine(engine, zero_stage(ds_config))  # every private hook used below exists, or a clear error
    if world_size == 1 and zero_stage(ds_config) == 0:
        # DeepSpeed flattens, "all-reduces" over one rank and unflattens every gradient each step.
        engine.enable_backward_allreduce = False
    return engine, scheduler, zero_stage(ds_config)


def build_engine(cfg: Config, ds_config_path: str, world_size: int, device: torch.device):
    """A bare PretrainModule's engine, for the tests and benchmarks that drive its steps themselves
    (the Trainer builds every task's engine with `deepspeed_engine`). Returns (engine, lr_scheduler,
    zero_stage)."""
    from megavl.tasks.curriculum import objectives_by_mode
    from megavl.tasks.pretrain import PretrainModule, pretrain_params

    module = PretrainModule(cfg.model, cfg.objectives, objectives_by_mode(cfg.curriculum))
    return deepspeed_engine(module, pretrain_params(module), cfg, ds_config_path, world_size, device)


def zero_fill_unused_grads(trained: TrainedParameters | torch.nn.Module, zero_stage: int) -> None:
    """Give parameters that this step did not use (cross-attention in a single-stream step) a zero
    gradient under ZeRO-0, as ZeRO 1-3 do with their flat gradient buffers: AdamW then applies their
    momentum and weight decay in every stage alike, instead of skipping them only in stage 0.
    `trained`: a task's TrainedParameters, or a PretrainModule (its student parameters)."""
    if zero_stage != 0:
        return
    named = trained.named if isinstance(trained, TrainedParameters) else trained.student_parameters()
    for _, p in named:
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def clear_zero3_grad_partitions(engine, zero_stage: int) -> None:
    """After a ZeRO-3 optimizer step, zero its flat gradient-partition buffer.

    DeepSpeed 0.19 builds each step's gradients from that buffer for EVERY parameter, and only
    overwrites the slots of parameters that received a gradient: a parameter unused in a step (the
    cross-attention sublayer in a single-stream step) would be updated again with its stale gradient
    from the last step that used it. Found by tests/distributed/test_sharded_equals_unsharded.py.

    With CPU offload of the optimizer (ds_configs/zero3_offload.json) the step reads its gradients
    from a second, persistent buffer: each fp32 partition's `.grad` (on the CPU), into which DeepSpeed
    copies only the parameters reduced in this step, so it is zeroed too. Left stale, an uninterrupted
    run re-applied the cross-attention's old gradient while a resumed one (fresh, zero buffer) did not:
    losses 3e-4 apart one step after a resume. Found by tests/distributed/test_reshard_zero3.py.
    """
    if zero_stage != 3:
        return
    opt = engine.optimizer
    opt.grad_partitions_flat_buffer.zero_()  # presence checked by ds_compat.check_engine
    if getattr(opt, "offload_optimizer", False):
        for flat in opt.fp32_partitioned_groups_flat:
            if flat.grad is not None:  # None for an NVMe-swapped sub-group: swapped back in at the next step
                flat.grad.zero_()
