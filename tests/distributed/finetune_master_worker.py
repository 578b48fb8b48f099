"""One rank of test_finetune_fp32_master.py: retrieval fine-tuning through the real Trainer in bf16
on 2 CPU ranks, under each ZeRO stage named, one after the other in this process. Per stage: 2
steps at lr 1e-3 with the ITC temperature bounded to [0.0695, 0.0705] (unclamped, one step leaves
the range), then the final evaluation writes best/. Records the temperature's fp32 master and
working copy, and best/'s weights against DeepSpeed's consolidated fp32 master of every parameter
(`safe_get_full_fp32_param`, a collective); writes OUT_DIR/stage{S}_rank{R}.json. The test asserts.

    RANK=.. WORLD_SIZE=.. MASTER_ADDR=.. MASTER_PORT=.. python finetune_master_worker.py SYNTH OUT_DIR STAGE [STAGE ...]
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param
from safetensors.torch import load_file

from megavl.config import load_config
from megavl.engine.trainer import Trainer

TEMP_MIN, TEMP_MAX = 0.0695, 0.0705


def run_stage(synth: str, out: Path, stage: int) -> dict:
    run = out / f"run{stage}"
    cfg = load_config("configs/finetune_retrieval_tiny.yaml", [
        f"run.output_dir={run}", f"task.image_root={synth}", f"task.train=[{synth}/retrieval_train.json]",
        f"task.val={synth}/retrieval_val.json", "task.test=", "task.retrieval_k=4", "data.batch_size=4",
        "run.precision=bf16", "run.max_steps=2", "run.checkpoint_every=100", "run.eval_every=0",
        "run.log_every=1", "optim.lr=1e-3", "optim.warmup_steps=1", f"objectives.itc.temp_min={TEMP_MIN}",
        f"objectives.itc.temp_max={TEMP_MAX}"])
    trainer = Trainer(cfg, f"ds_configs/zero{stage}.json", resume="none")
    assert trainer.zero_stage == stage
    results = trainer.train()
    module = trainer.module
    seen = {"param_dtype": str(module.temp.dtype), "best_step": results["best"]["step"],
            "temp_master": float(safe_get_full_fp32_param(module.temp).reshape(-1)[0]),
            "temp_working": float(module.temp.detach().float().reshape(-1)[0]) if module.temp.numel() else None}
    dist.barrier()  # rank 0 has written best/
    best = load_file(str(run / "best" / "model.safetensors"))
    head = load_file(str(run / "best" / "task_head.safetensors"))
    worst, rounded_only = 0.0, 0
    for name, p in module.named_parameters():  # the same order on every rank: collectives line up
        master = safe_get_full_fp32_param(p).float().cpu()
        saved = best[name[len("student."):]] if name.startswith("student.") else head[name]
        worst = max(worst, float((saved - master.view_as(saved)).abs().max()))
        rounded = master.to(torch.bfloat16).float()
        rounded_only += int(not torch.equal(master, rounded) and torch.equal(saved, rounded.view_as(saved)))
    seen["best_vs_master_max_abs"] = worst
    seen["params_saved_as_bf16_rounding"] = rounded_only
    seen["params_differing_from_bf16"] = sum(
        int(not torch.equal(v, v.to(torch.bfloat16).float())) for v in best.values())
    return seen


def main(synth: str, out_dir: str, *stages: str) -> None:
    out = Path(out_dir)
    for stage in map(int, stages):
        seen = run_stage(synth, out, stage)
        (out / f"stage{stage}_rank{dist.get_rank()}.json").write_text(json.dumps(seen))
        dist.barrier()


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
