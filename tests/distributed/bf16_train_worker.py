"""One rank of test_bf16_zero3.py: the real Trainer (tiny recipe, real shards) in bf16 under ZeRO-3 on 2
CPU ranks with grad_accum 2: 4 steps uninterrupted, then a second Trainer resumed from the step-2
checkpoint runs steps 3-4 again. Writes what it saw to OUT_DIR/rank{R}.json; the test asserts.

    RANK=.. WORLD_SIZE=.. MASTER_ADDR=.. MASTER_PORT=.. python bf16_train_worker.py SHARDS OUT_DIR
"""
import json
import math
import sys
from pathlib import Path

import torch

from megavl.config import load_config
from megavl.engine.trainer import Trainer


def _config(shards: str, out: Path):
    return load_config("configs/tiny.yaml", [
        f"run.output_dir={out}", f"data.train_shards={shards}/train-{{000000..000001}}.tar", "data.val_shards=[]",
        "data.batch_size=4", "data.num_workers=0", "data.max_text_len=16", "run.precision=bf16",
        "run.grad_accum=2", "run.max_steps=4", "run.checkpoint_every=2", "run.log_every=1", "run.eval_every=-1",
        "run.image_log_every=0", "objectives.itc.queue_size=32", "objectives.itc.distill_alpha=0.4",
        "objectives.itc.temp_min=0.0695", "objectives.itc.temp_max=0.0705"])


def main(shards: str, out_dir: str) -> None:
    out = Path(out_dir)
    cfg = _config(shards, out / "run")
    first = Trainer(cfg, "ds_configs/zero3.json", resume="none")
    seen = {"dtypes": {n: str(b.dtype) for n, b in first.module.named_buffers()
                       if not n.startswith(("student.", "teacher."))},
            "param_dtype": str(first.module.temp.dtype)}
    full = first.train()
    module = first.module
    seen["teacher_master_count"] = len(module.teacher_master)
    seen["teacher_master_dtypes"] = sorted({str(v.dtype) for v in module.teacher_master.values()})
    seen["teacher_shard_dtype"] = str(next(module.teacher.parameters()).ds_tensor.dtype)
    seen["full_losses"] = {str(k): v for k, v in full["step_losses"].items()}
    seen["temperature"] = float(module.temperature_used)

    resumed = Trainer(cfg, "ds_configs/zero3.json", resume=str(out / "run" / "checkpoints" / "step_00000002"))
    seen["resumed_start"] = resumed.step
    seen["resumed_master_count"] = len(resumed.module.teacher_master)
    again = resumed.train()
    seen["resumed_losses"] = {str(k): v for k, v in again["step_losses"].items()}
    seen["all_finite"] = all(math.isfinite(v) for d in (full, again) for s in d["step_losses"].values()
                             for v in s.values())
    rank = torch.distributed.get_rank()
    (out / f"rank{rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
