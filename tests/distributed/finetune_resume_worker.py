"""One rank of test_finetune_resume_world.py: `megavl/train.py` (the real entry point) on this rank.
On every rank but 0 the functions that list the checkpoint directory, read a tag's meta.json or
record the run's line fail: rank 0 alone must choose the checkpoint to resume and tell the others.

    RANK=.. WORLD_SIZE=.. MASTER_ADDR=.. MASTER_PORT=.. python finetune_resume_worker.py TRAIN_ARGS...
"""
import os
import sys

from megavl.engine import checkpoint, lineage


def _refuse(module, name: str):
    def refused(*args, **kwargs):
        raise AssertionError(f"rank {os.environ['RANK']} called {module.__name__}.{name}: only rank 0 chooses the tag")
    return refused


if __name__ == "__main__":
    if os.environ.get("RANK", "0") != "0":
        for module, names in ((checkpoint, ("choose_checkpoint", "choose_tag", "tag_dirs", "read_meta")),
                              (lineage, ("choose", "read_line", "write_line"))):
            for name in names:
                setattr(module, name, _refuse(module, name))
    from megavl.train import main

    sys.exit(main([a for a in sys.argv[1:] if not a.startswith("--local_rank")]))
