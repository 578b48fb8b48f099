"""One rank of the 2-rank checks in test_gather_and_teacher.py; writes its measurements to JSON.

Usage (one process per rank, env RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set):
    python gather_teacher_worker.py {gather|zero3} OUT_DIR
The worker only measures (max abs differences); the test asserts, so failures read in one place.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megavl.objectives.distributed import all_reduce_mean, gather_features
from megavl.objectives.itc import itc_loss
from megavl.objectives.mim_semantic import update_center
from megavl.objectives.scl import scl_loss
from megavl.objectives.teacher import ema_update_, make_teacher


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def run_gather(rank: int, world: int) -> dict[str, float]:
    B, E, K = 3, 5, 7
    g = torch.Generator().manual_seed(0)  # same global data on every rank
    img_all = F.normalize(torch.randn(world * B, E, generator=g, dtype=torch.float64), dim=-1)
    txt_all = F.normalize(torch.randn(world * B, E, generator=g, dtype=torch.float64), dim=-1)
    scl_all = [torch.randn(world * B, E, generator=g, dtype=torch.float64) for _ in range(4)]
    logits_all = torch.randn(world * B, 4, K, generator=g, dtype=torch.float64)
    local = slice(rank * B, (rank + 1) * B)
    out: dict[str, float] = {}

    # Reference on one process: the loss over the concatenated global batch and its gradients.
    img_ref, txt_ref = img_all.clone().requires_grad_(), txt_all.clone().requires_grad_()
    loss_ref = itc_loss(img_ref, txt_ref, 0.07)
    loss_ref.backward()

    # with_grad=True: every rank's loss is the global loss; backward sums all ranks' gradients for
    # this rank's slice, i.e. the gradient of world * L. DeepSpeed/DDP then average over ranks -> grad L.
    img = img_all[local].clone().requires_grad_()
    txt = txt_all[local].clone().requires_grad_()
    loss = itc_loss(gather_features(img), gather_features(txt), 0.07)
    loss.backward()
    out["itc_loss"] = _maxdiff(loss.detach(), loss_ref.detach())
    out["grad_img_with_grad"] = _maxdiff(img.grad, world * img_ref.grad[local])
    out["grad_txt_with_grad"] = _maxdiff(txt.grad, world * txt_ref.grad[local])

    # with_grad=False: only the local slice carries a graph. Reference: other slices detached.
    img_nd, txt_nd = img_all.clone().requires_grad_(), txt_all.clone().requires_grad_()
    keep = torch.zeros(world * B, 1, dtype=torch.float64)
    keep[local] = 1.0
    itc_loss(img_nd * keep + (img_nd * (1 - keep)).detach(), txt_nd * keep + (txt_nd * (1 - keep)).detach(),
             0.07).backward()
    img = img_all[local].clone().requires_grad_()
    txt = txt_all[local].clone().requires_grad_()
    loss = itc_loss(gather_features(img, with_grad=False), gather_features(txt, with_grad=False), 0.07)
    loss.backward()
    out["itc_loss_no_grad"] = _maxdiff(loss.detach(), loss_ref.detach())
    out["grad_img_no_grad"] = _maxdiff(img.grad, img_nd.grad[local])
    out["grad_txt_no_grad"] = _maxdiff(txt.grad, txt_nd.grad[local])

    scl_ref = scl_loss(*scl_all)
    scl = scl_loss(*[gather_features(x[local]) for x in scl_all])
    out["scl_loss"] = _maxdiff(scl, scl_ref)

    center = torch.linspace(-1, 1, K, dtype=torch.float64)
    center_ref = 0.9 * center + 0.1 * logits_all.reshape(-1, K).mean(dim=0)
    out["update_center"] = _maxdiff(update_center(center, logits_all[local], 0.9), center_ref)
    out["all_reduce_mean"] = _maxdiff(all_reduce_mean(torch.full((3,), float(rank), dtype=torch.float64)),
                                      torch.full((3,), (world - 1) / 2, dtype=torch.float64))
    return out


class _StudentTeacher(nn.Module):
    """Student + EMA teacher in one module, so ZeRO-3 partitions both alike. Odd sizes -> uneven shards."""

    def __init__(self) -> None:
        super().__init__()
        self.student = nn.Sequential(nn.Linear(7, 13), nn.LayerNorm(13), nn.GELU(), nn.Linear(13, 5))
        self.teacher = make_teacher(self.student)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.student(x), self.teacher(x)


def _gathered_state(module: nn.Module) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        return {n: p.detach().clone() for n, p in params}


def run_zero3(rank: int, world: int, persistence_threshold: int) -> dict[str, float]:
    import deepspeed

    torch.manual_seed(0)
    model = _StudentTeacher()
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "weight_decay": 0.01, "torch_adam": True}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": persistence_threshold},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    sharded = [p for p in engine.module.teacher.parameters() if p.ds_tensor.numel() < p.ds_numel]
    out: dict[str, float] = {"num_sharded_teacher_params": float(len(sharded))}
    ref_teacher = _gathered_state(engine.module.teacher)
    plain = nn.Sequential(nn.Linear(7, 13), nn.LayerNorm(13), nn.GELU(), nn.Linear(13, 5))
    g = torch.Generator().manual_seed(1 + rank)
    x_probe = torch.randn(3, 7, generator=torch.Generator().manual_seed(5))
    worst_params = worst_forward = 0.0
    persistent_seen = 0
    for step, m in enumerate([0.9, 0.5, 0.99]):
        s_out, _ = engine(torch.randn(2, 7, generator=g))
        engine.backward((s_out ** 2).mean())
        engine.step()
        # Persistent params stay gathered between steps: ema_update_ must update full copy AND shard.
        persistent_seen = max(persistent_seen, sum(p.data.numel() == p.ds_numel and p.ds_numel > 0
                                                   for p in engine.module.teacher.parameters()))
        ema_update_(engine.module.teacher, engine.module.student, m)
        student_full = _gathered_state(engine.module.student)
        ref_teacher = {n: m * t + (1 - m) * student_full[n] for n, t in ref_teacher.items()}
        out[f"student_vs_teacher_step{step}"] = max(_maxdiff(student_full[n], ref_teacher[n]) for n in ref_teacher)
        # The teacher forward right after the update (shards re-gathered, persistent copies as they are).
        with torch.no_grad():
            _, t_out = engine(x_probe)
            plain.load_state_dict(ref_teacher)
            worst_forward = max(worst_forward, _maxdiff(t_out, plain(x_probe)))
        got = _gathered_state(engine.module.teacher)
        worst_params = max(worst_params, max(_maxdiff(got[n], ref_teacher[n]) for n in ref_teacher))
    out["teacher_params"] = worst_params
    out["teacher_forward"] = worst_forward
    out["num_persistent_teacher_params"] = float(persistent_seen)
    return out


def main() -> None:
    mode, out_dir = sys.argv[1], sys.argv[2]
    if mode == "zero3":
        import importlib

        import deepspeed

        # `import deepspeed.comm.torch as m` would bind the torch package (deepspeed.comm has a `torch`
        # attribute); import_module returns DeepSpeed's backend module itself.
        ds_comm_torch = importlib.import_module("deepspeed.comm.torch")

        # DeepSpeed JIT-builds its CPU shared-memory all-reduce op on every init (~50-100 s here, and
        # rebuilt whenever another env shares ~/.cache/torch_extensions). gloo needs no such op.
        assert hasattr(ds_comm_torch, "build_shm_op"), "DeepSpeed moved build_shm_op; update this worker"
        ds_comm_torch.build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="gloo")
    else:  # the gather checks need no DeepSpeed; skipping its import saves most of the start-up time
        dist.init_process_group(backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if mode == "gather":
        result = run_gather(rank, world)
    elif mode == "zero3":
        # Threshold 20: the 7x13 and 13x5 weights are partitioned only, the biases/LayerNorm (numel <= 20)
        # are persistent (full copy kept too): both ema_update_ paths in one engine.
        result = run_zero3(rank, world, persistence_threshold=20)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
