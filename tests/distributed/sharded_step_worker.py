"""Worker for test_sharded_equals_unsharded.py: a few training steps of the tiny model on a fixed
global batch, either as one process (ZeRO-0, the whole batch) or as one of 2 ranks (ZeRO-3, its half).

    python sharded_step_worker.py OUT.json DS_CONFIG [launched by deepspeed for the 2-rank case]
"""
import json
import sys

import torch
import torch.distributed as dist

from megavl.config import load_config
from megavl.engine.curriculum import mode_at
from megavl.engine.launch import init_distributed
from megavl.engine.trainer import (build_engine, clear_zero3_grad_partitions, step_generator,
                                   zero_fill_unused_grads)
from megavl.objectives.teacher import teacher_momentum

GLOBAL_BATCH, TEXT_LEN, STEPS = 8, 16, 4


def global_batch(step: int) -> dict:
    """A fixed batch per step; two samples share an image id (ITM must never pair them as negatives)."""
    g = torch.Generator().manual_seed(1000 + step)
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
    image_ids = torch.arange(B) + 10 * step
    image_ids[1] = image_ids[0]
    return {"images": torch.randn(B, 3, 64, 64, generator=g), "input_ids": ids, "attention_mask": mask,
            "mlm_input_ids": mlm_ids, "mlm_labels": labels, "scl_input_ids": mlm_ids, "image_ids": image_ids}


def main(out_path: str, ds_config: str) -> None:
    info = init_distributed()
    torch.set_num_threads(1)
    world = info.world_size
    cfg = load_config("configs/tiny.yaml", [f"data.batch_size={GLOBAL_BATCH // world}", "data.max_text_len=16",
                                            "optim.warmup_steps=1", "optim.lr=1e-3", f"run.max_steps={STEPS}",
                                            # Text-guided masks rank near-tied relevances: a 1e-6 rounding
                                            # difference can flip which patch is masked, a discontinuity
                                            # that is not a sharding error. Random masks are exact.
                                            "objectives.masking.text_guided=false"])
    torch.manual_seed(cfg.run.seed)
    engine, _, stage = build_engine(cfg, ds_config, world, info.device)
    rows = slice(info.rank * GLOBAL_BATCH // world, (info.rank + 1) * GLOBAL_BATCH // world)
    history = []
    for step in range(STEPS):
        batch = {k: v[rows] for k, v in global_batch(step).items()}
        mode = mode_at(step, 0, cfg.curriculum)
        total, losses = engine(batch, mode, step_generator(cfg.run.seed, step, 0, info.device))
        engine.backward(total)
        zero_fill_unused_grads(engine.module, stage)
        engine.step()
        clear_zero3_grad_partitions(engine, stage)
        engine.module.update_teacher(teacher_momentum(step, STEPS, cfg.objectives.teacher.momentum))
        values = torch.stack([total.detach()] + [losses[k].detach() for k in sorted(losses)])
        if world > 1:
            dist.all_reduce(values)
            values /= world
        history.append(dict(zip(["total"] + sorted(losses), values.tolist())))
    if info.rank == 0:
        with open(out_path, "w") as f:
            json.dump(history, f)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(*args)
