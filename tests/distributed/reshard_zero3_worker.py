"""One rank of test_reshard_zero3.py: the real Trainer (tiny recipe, real shards, fp32) under ZeRO-3.

    save: 4 steps on this world; the step-2 checkpoint is written.
    load: resume a copy of that checkpoint on this world (resharded when the world differs), steps 3-4.

After every step (and right after the resume) rank 0 records, per trained parameter, DeepSpeed's own
consolidated fp32 master / exp_avg / exp_avg_sq (`safe_get_full_*`, collectives), the Adam step of each
ZeRO-3 flat partition, every gathered module parameter (student AND teacher) and buffer; it writes
them with the step losses to OUT_DIR/<phase><world>.pt. The test compares.

    RANK=.. WORLD_SIZE=.. MASTER_ADDR=.. MASTER_PORT=.. python reshard_zero3_worker.py PHASE SHARDS RUN OUT_DIR [DS_CONFIG]
"""
import os
import sys
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from megavl.config import load_config
from megavl.engine.trainer import Trainer

SAVED_STEP = 2


def _config(shards: str, run: str, world: int):
    return load_config("configs/tiny.yaml", [
        f"run.output_dir={run}", f"data.train_shards={shards}/train-{{000000..000001}}.tar", "data.val_shards=[]",
        f"data.batch_size={8 // world}", "data.num_workers=0", "data.max_text_len=16", "run.grad_accum=1",
        "run.global_batch_size=8", "run.max_steps=4", "run.checkpoint_every=1", "run.log_every=1",
        "run.eval_every=-1", "run.image_log_every=0", "objectives.itc.queue_size=32"])


def dump(trainer: Trainer) -> dict:
    opt, module = trainer.engine.optimizer, trainer.module
    out = {"adam_steps": [float(opt.optimizer.state[flat]["step"]) for flat in opt.fp32_partitioned_groups_flat],
           "optim": {}}
    for name, p in module.student_parameters():
        if p.requires_grad:
            out["optim"][name] = {"fp32": safe_get_full_fp32_param(p).clone(),
                                  **{k: safe_get_full_optimizer_state(p, k).clone() for k in ("exp_avg", "exp_avg_sq")}}
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        out["module"] = {n: t.detach().clone() for n, t in module.named_parameters()}
    out["buffers"] = {n: t.detach().clone() for n, t in module.named_buffers()}
    return out


def main(phase: str, shards: str, run: str, out_dir: str, ds_config: str = "ds_configs/zero3.json") -> None:
    world = int(os.environ["WORLD_SIZE"])
    states = {}
    save = Trainer.save

    def save_and_dump(self):  # checkpoint_every=1 calls this after every step; only step 2 is written
        if self.step == SAVED_STEP and phase == "save":
            save(self)
        states[self.step] = dump(self)

    Trainer.save = save_and_dump
    resume = "none" if phase == "save" else "auto"
    trainer = Trainer(_config(shards, run, world), ds_config, resume=resume)
    if phase == "load":
        assert trainer.step == SAVED_STEP, trainer.step
        states[SAVED_STEP] = dump(trainer)
    losses = trainer.train()["step_losses"]
    if torch.distributed.get_rank() == 0:
        torch.save({"states": states, "losses": losses}, Path(out_dir) / f"{phase}{world}.pt")


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
