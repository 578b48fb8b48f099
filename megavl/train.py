"""Pre-train or fine-tune a vision-language model (task.name): parse, build, train, close.

    deepspeed --hostfile hosts megavl/train.py --ds_config ds_configs/zero3.json \
        --config configs/pretrain_14m.yaml [--set key=value ...] [--resume auto|none|CKPT_DIR] [--fresh]

Also runs as `deepspeed --num_gpus N ...`, `torchrun ...`, under `srun`, or as plain
`python megavl/train.py ...` (one process). Without GPUs the same command trains on CPU (gloo).
"""
from __future__ import annotations

import argparse
import logging
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml", help="YAML recipe under configs/")
    parser.add_argument("--ds_config", default="ds_configs/zero3.json", help="DeepSpeed JSON config")
    parser.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                        help="dotted overrides, e.g. --set model.fusion.depth=4 run.max_steps=10 (repeatable)")
    parser.add_argument("--resume", default="auto",
                        help="auto: the newest complete checkpoint in run.output_dir, on any number of ranks "
                             "(a fresh run when the directory has none; an error when it has only unusable "
                             "ones); none: a fresh run in an empty directory; or a checkpoint tag dir")
    parser.add_argument("--fresh", action="store_true",
                        help="start a new run at step 0 even though run.output_dir holds checkpoints; "
                             "they are kept (never pruned or overwritten by the new run)")
    # The deepspeed launcher passes --local_rank; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megavl.engine.stop import StopFlag

    stop = StopFlag()  # first: a preemption signal during start-up must not kill the process
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from megavl.config import ConfigError, load_config
    from megavl.engine.checkpoint import CheckpointError

    try:
        cfg = load_config(args.config, [item for group in args.overrides for item in group])
        from megavl.engine.trainer import Trainer  # every task.name (megavl/tasks/)

        trainer = Trainer(cfg, args.ds_config, args.resume, stop=stop, fresh=args.fresh)
    except ConfigError as err:
        print(f"megavl: bad configuration: {err}", file=sys.stderr)
        return 2
    except CheckpointError as err:
        print(f"megavl: cannot start: {err}", file=sys.stderr)
        return 3
    trainer.train()
    from megavl.engine.launch import close_distributed

    close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
