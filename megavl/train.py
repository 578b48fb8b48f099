"""Pre-train or fine-tune a vision-language model (task.name): parse, build, train, close.

    deepspeed --hostfile hosts megavl/train.py --ds_config ds_configs/zero3.json \
        --config configs/pretrain_14m.yaml [--set key=value ...] [--resume auto|none|CKPT_DIR|TAG] [--fresh] \
        [--trust-checkpoint] [--data-resume exact|approx]

Also runs as `deepspeed --num_gpus N ...`, `torchrun ...`, under `srun`, or as plain
`python megavl/train.py ...` (one process). Without GPUs the same command trains on CPU (gloo).

Exit codes, the same on every rank, so the deepspeed launcher and srun report them (torchrun
reports any rank's non-zero code as 1; the rank's own code and line are in its log):
  0  finished, or stopped by SIGTERM/SIGUSR1 after saving a checkpoint (`--resume auto` continues)
  1  a defect: the traceback says where
  2  bad configuration or data (megavl.config.ConfigError, megavl.errors.DataError): one line
     naming the key, or the file (and line) and what is wrong with it; also a checkpoint that this
     run did not write, asked for without --trust-checkpoint
  3  cannot start from the checkpoints (megavl.engine.checkpoint.CheckpointError): why, and what to
     do instead (--resume auto, --resume CKPT_DIR, --fresh, another run.output_dir)
Every one of these exits leaves the process group on every rank (engine/launch.py: leave_job).
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback

EXIT_OK, EXIT_DEFECT, EXIT_BAD_INPUT, EXIT_CHECKPOINT = 0, 1, 2, 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml", help="YAML recipe under configs/")
    parser.add_argument("--ds_config", default="ds_configs/zero3.json", help="DeepSpeed JSON config")
    parser.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                        help="dotted overrides, e.g. --set model.fusion.depth=4 run.max_steps=10 (repeatable)")
    parser.add_argument("--resume", default="auto",
                        help="auto: the newest complete checkpoint of the line the last run started on "
                             "(docs/checkpoints.md), on any number of ranks (a fresh run when there is none; an "
                             "error when there are only unusable ones); none: a fresh run in an empty directory; "
                             "or a checkpoint tag dir or tag name (an older one starts a branch; newer ones are kept)")
    parser.add_argument("--data-resume", choices=("exact", "approx"), default="exact",
                        help="exact: a resume reads exactly the samples the uninterrupted run would "
                             "(the shards may have moved; other shards, sizes or weights stop it, exit "
                             "3); approx: continue changed data at the same global sample count, with "
                             "a warning naming what changed")
    parser.add_argument("--fresh", action="store_true",
                        help="start a new run at step 0 even though run.output_dir holds checkpoints; "
                             "they are kept (never pruned or overwritten by the new run)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="a checkpoint directory outside run.output_dir/checkpoints (--resume DIR, "
                             "task.init_from) may be loaded: DeepSpeed's files are pickles, which can run "
                             "code. Not needed for this run's own checkpoints or for exports")
    # The deepspeed launcher passes --local_rank; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def use_worker_start_method(method: str) -> None:
    """data.worker_start_method for every DataLoader of the run: the process's start method, set
    once before any loader exists ("" keeps the platform's default), and its helper processes
    started before anything else can start them without the stop signals blocked
    (data/loader.py: start_worker_helpers)."""
    import multiprocessing

    from megavl.data.loader import start_worker_helpers

    if method:
        multiprocessing.set_start_method(method, force=True)
    start_worker_helpers()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megavl.engine.stop import StopFlag

    stop = StopFlag()  # first: a preemption signal during start-up must not kill the process
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from megavl.config import ConfigError, load_config
    from megavl.engine.checkpoint import CheckpointError
    from megavl.engine.launch import init_distributed, leave_job
    from megavl.errors import DataError

    # The process group before anything can refuse: every refusal is then one exit of the whole
    # job, with one message and one code, however early it comes.
    init_distributed()
    code, message = EXIT_OK, None
    try:
        cfg = load_config(args.config, [item for group in args.overrides for item in group])
        use_worker_start_method(cfg.data.worker_start_method)
        from megavl.engine.trainer import Trainer  # every task.name (megavl/tasks/)

        trainer = Trainer(cfg, args.ds_config, args.resume, stop=stop, fresh=args.fresh,
                          trust_checkpoint=args.trust_checkpoint, data_resume=args.data_resume)
        trainer.train()
    except ConfigError as err:
        code, message = EXIT_BAD_INPUT, f"megavl: bad configuration: {err}"
    except DataError as err:
        code, message = EXIT_BAD_INPUT, f"megavl: bad data: {err}"
    except CheckpointError as err:
        code, message = EXIT_CHECKPOINT, f"megavl: cannot start: {err}"
    except Exception:  # noqa: BLE001 - a defect: its traceback, then the same clean exit
        traceback.print_exc()
        code = EXIT_DEFECT
    return leave_job(code, message)


if __name__ == "__main__":
    sys.exit(main())
