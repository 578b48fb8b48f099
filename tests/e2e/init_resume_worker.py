"""Worker for test_e2e_init_provenance.py: resume a run whose init files are gone, in a world of one.

    python init_resume_worker.py RESULT_JSON RECIPE KEY=VALUE...

Builds the Trainer as megavl/train.py does (`--resume auto`, ZeRO-0) and writes RESULT_JSON: the
step it resumed at, the largest difference between its module and the checkpoint's weights, and
the text tower's dropout in the module and in the config its checkpoints will save.
"""
import json
import sys
from pathlib import Path

from megavl.config import load_config
from megavl.engine.export import consolidated_state_dict
from megavl.engine.launch import close_distributed
from megavl.engine.trainer import Trainer


def main() -> None:
    result_path, recipe, *overrides = sys.argv[1:]
    cfg = load_config(recipe, overrides)
    trainer = Trainer(cfg, "ds_configs/zero0.json", resume="auto")
    ckpt_dir = Path(cfg.run.output_dir) / "checkpoints"
    saved = consolidated_state_dict(ckpt_dir, (ckpt_dir / "latest").read_text().strip())
    ours = trainer.module.state_dict()
    common = [k for k, v in saved.items() if k in ours and v.numel()]  # not the empty ITC queue
    diff = max((ours[k].float() - saved[k].float()).abs().max().item() for k in common)
    Path(result_path).write_text(json.dumps({
        "step": trainer.step, "compared": len(common), "max_abs_diff": diff,
        "module_text_dropout": trainer.module.student.text.embed_drop.p,
        "config_text_dropout": trainer.cfg.model.text.dropout}))
    close_distributed()


if __name__ == "__main__":
    main()
