"""Worker for test_export_and_ds_compat.py: real DeepSpeed engines (a world of one on CPU) of the tiny model.

    python ds_engine_worker.py OUT_DIR

For ZeRO-0 and ZeRO-1 in bf16: two optimizer steps, a megavl checkpoint, `megavl-export`'s function,
and the fp32 master weights the optimizer holds (reference for the export). For ZeRO-3 (fp32): the
start-up hook check on the real engine, then on the same engine with a private hook deleted.
Writes OUT_DIR/result.json and OUT_DIR/<stage>/{master,module}.pt.
"""
import json
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from sharded_step_worker import global_batch  # noqa: E402

from megavl.config import load_config, to_dict  # noqa: E402
from megavl.engine import checkpoint_save  # noqa: E402
from megavl.engine.ds_compat import DeepSpeedCompatError, check_engine  # noqa: E402
from megavl.engine.export import export  # noqa: E402
from megavl.engine.launch import init_distributed  # noqa: E402
from megavl.engine.step import build_engine  # noqa: E402

BATCH = 4


def tiny_cfg(out: Path, precision: str):
    return load_config("configs/tiny.yaml", [f"data.batch_size={BATCH} data.max_text_len=16 optim.warmup_steps=1",
                                             "optim.lr=1e-3 run.max_steps=2 objectives.masking.text_guided=false",
                                             f"run.precision={precision} run.output_dir={out}"])


def fp32_masters(engine) -> dict[str, torch.Tensor]:
    """The optimizer's fp32 copy of every trained parameter, by name."""
    from deepspeed.utils import safe_get_full_fp32_param

    opt = engine.optimizer
    if hasattr(opt, "fp32_groups"):  # ZeRO-0 bf16: DeepSpeed's FP16_UnfusedOptimizer wrapper
        groups = opt.optimizer.param_groups
        return {n: m.detach().clone() for g, ms in zip(groups, opt.fp32_groups) for n, m in zip(g["names"], ms)}
    return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()
            if p.requires_grad}


def train_and_export(out: Path, ds_config: str, device) -> dict:
    cfg = tiny_cfg(out, "bf16")
    torch.manual_seed(0)
    engine, _, stage = build_engine(cfg, ds_config, 1, device)
    check_engine(engine, stage)
    for step in range(2):
        batch = {k: v[:BATCH].to(torch.bfloat16) if v.is_floating_point() else v[:BATCH]
                 for k, v in global_batch(step, 0).items()}
        total, _ = engine(batch, "two", torch.Generator().manual_seed(step))
        engine.backward(total)
        engine.step()
    ckpt_dir = out / "checkpoints"
    info = checkpoint_save.SaveInfo(run_id="export-test", world_size=1, zero_stage=stage, keep=1,
                               config_yaml=yaml.safe_dump(to_dict(cfg), sort_keys=False))
    checkpoint_save.save(engine, engine.module, ckpt_dir, 2, 0, {"data": {}}, info)
    export(ckpt_dir, out / "export")
    torch.save(fp32_masters(engine), out / "master.pt")
    torch.save({n: p.detach().clone() for n, p in engine.module.named_parameters()}, out / "module.pt")
    return {"optimizer": type(engine.optimizer).__name__, "files": sorted(p.name for p in (ckpt_dir / "step_00000002").iterdir())}


def check_hooks(out: Path, device) -> dict:
    cfg = tiny_cfg(out, "fp32")
    engine, _, stage = build_engine(cfg, "ds_configs/zero3.json", 1, device)  # runs check_engine itself
    result = {"zero3_ok": True}
    del engine.optimizer.grad_partitions_flat_buffer  # as a DeepSpeed release without it would be
    try:
        check_engine(engine, stage)
        result["zero3_missing_error"] = None
    except DeepSpeedCompatError as err:
        result["zero3_missing_error"] = str(err)
    return result


def main(out_dir: str) -> None:
    info = init_distributed()
    torch.set_num_threads(1)
    out = Path(out_dir)
    result = {"zero0": train_and_export(out / "zero0", "ds_configs/zero0.json", info.device),
              "zero1": train_and_export(out / "zero1", "ds_configs/zero1.json", info.device),
              **check_hooks(out / "zero3", info.device)}
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
