"""megavl-evaluate: evaluate fine-tuned weights on a task's split, without training.

    megavl-evaluate --config configs/finetune_vqa.yaml --weights RUN/best --split test \\
        --out DIR [--ds_config ds_configs/zero0.json] [--set key=value ...]
    deepspeed --num_gpus 8 megavl/tools/evaluate.py ...      (sharded over ranks)

--weights: a directory written by fine-tuning (`<output_dir>/best`: model.safetensors +
task_head.safetensors + task_state.json) or a fine-tuning checkpoint tag directory, which needs
--trust-checkpoint (DeepSpeed's files are pickles; `best/` is safetensors and JSON). Prints the
metrics, writes DIR/metrics.json and, for VQA, DIR/vqa_result_<split>.json for the server.
(A bare megavl-export has no task head: fine-tune it first.) Exit code 2, one line: a bad
configuration, or a checkpoint without --trust-checkpoint.

    megavl-evaluate --task zeroshot --weights EXPORT --images ROOT --classnames F --templates F --out DIR
zero-shot classification of a megavl-export directory: see megavl/tools/evaluate_zeroshot.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _is_checkpoint(weights: Path) -> bool:
    from megavl.engine.checkpoint import MARKER

    return (weights / MARKER).is_file()


def _task_state(weights: Path) -> dict:
    if (weights / "task_state.json").is_file():
        return json.loads((weights / "task_state.json").read_text())
    if _is_checkpoint(weights):
        from megavl.engine.checkpoint import check, read_meta

        check(weights)
        return read_meta(weights).get("task_state", {})
    raise FileNotFoundError(f"{weights}: neither a fine-tuned weights dir (task_state.json) nor a "
                            "complete fine-tuning checkpoint tag dir")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--task=zeroshot" in argv or any(a == "--task" and b == "zeroshot" for a, b in zip(argv, argv[1:])):
        from megavl.tools.evaluate_zeroshot import main as zeroshot_main

        return zeroshot_main(argv)
    parser = argparse.ArgumentParser(prog="megavl-evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--out", required=True, help="directory for metrics.json (+ result file)")
    parser.add_argument("--ds_config", default="ds_configs/zero0.json")
    parser.add_argument("--set", dest="overrides", action="append", nargs="+", default=[])
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="--weights may be a checkpoint tag directory: its DeepSpeed files are pickles, "
                             "which can run code")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import dataclasses

    import torch
    from safetensors.torch import load_file

    from megavl.config import ConfigError, load_config
    from megavl.engine.launch import leave_job
    from megavl.engine.trainer import Trainer
    from megavl.models.pretrained import without_init_files

    weights = Path(args.weights)
    out = Path(args.out)
    cfg = load_config(args.config, [x for group in args.overrides for x in group]
                      + [f"run.output_dir={out}", "task.init_from="])
    if cfg.task.name == "pretrain":
        parser.error("the recipe's task.name is pretrain: pick a fine-tuning recipe")
    # the weights come from --weights: the model's init files are not read
    cfg = dataclasses.replace(cfg, model=without_init_files(cfg.model))
    checkpoint_dir = _is_checkpoint(weights)
    try:
        tuner = Trainer(cfg, args.ds_config, resume=str(weights) if checkpoint_dir else "none",
                        task_state=_task_state(weights), weights_only=True, trust_checkpoint=args.trust_checkpoint)
    except ConfigError as err:
        return leave_job(2, f"megavl-evaluate: {err}")
    task = tuner.task
    if not checkpoint_dir:
        state = {f"student.{k}": v for k, v in load_file(str(weights / "model.safetensors")).items()}
        state.update(load_file(str(weights / "task_head.safetensors")))
        with torch.no_grad():
            missing, unexpected = tuner.module.load_state_dict(state, strict=False)
        # an export leaves out what only training uses (retrieval's teacher and queue)
        missing = [k for k in missing if not k.startswith(task.training_only)]
        if missing or unexpected:
            raise ValueError(f"{weights}: weights do not fit the recipe's model: missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}")
    metrics = task.evaluate(args.split)
    result = {"task": cfg.task.name, "split": args.split, "weights": str(weights), **metrics}
    if task.write_results:
        result["result_files"] = task.write_results(args.split, str(out))
    if tuner.dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
