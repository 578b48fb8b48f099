"""One rank of test_finetune_resume_world.py: `megavl/train.py` (the real entry point) on this rank.
On every rank but 0 the functions that list the checkpoint directory or read a tag's meta.json fail:
rank 0 alone must choose the checkpoint to resume and tell the others.

    RANK=.. WORLD_SIZE=.. MASTER_ADDR=.. MASTER_PORT=.. python finetune_resume_worker.py TRAIN_ARGS...
"""
import os
import sys

from megavl.engine import checkpoint


def _refuse(name: str):
    def refused(*args, **kwargs):
        raise AssertionError(f"rank {os.environ['RANK']} called checkpoint.{name}: only rank 0 chooses the tag")
    return refused


if __name__ == "__main__":
    if os.environ.get("RANK", "0") != "0":
        for name in ("choose_checkpoint", "choose_tag", "tag_dirs", "read_meta"):
            setattr(checkpoint, name, _refuse(name))
    from megavl.train import main

    sys.exit(main([a for a in sys.argv[1:] if not a.startswith("--local_rank")]))
