"""The shards move between a save and a resume, through megavl/train.py on one CPU process: the
checkpoint's data state holds no absolute shard path, the run resumes on the copy at another place
without a word about changed data (that the batches are the uninterrupted run's is
tests/unit/data/test_data_moved_shards.py's), another shard set stops it (exit 3, one line naming
the missing shard), and `--data-resume approx` continues that set with a warning."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch_helpers import run_child

pytestmark = pytest.mark.slow

ALL = "train-{000000..000003}.tar"


def _train(out: Path, pattern: str, steps: int, *flags: str, expect: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "megavl/train.py", "--ds_config", "ds_configs/zero0.json", "--config", "configs/tiny.yaml",
           *flags, "--set", f"run.output_dir={out}", f"data.train_shards={pattern}", "data.val_shards=[]",
           "data.batch_size=8", "data.num_workers=0", f"run.max_steps={steps}", "run.eval_every=-1",
           "run.log_every=1", "run.image_log_every=1000"]
    return run_child(cmd, timeout=300, expect=expect)


def test_moved_shards_resume_and_a_changed_set_needs_approx(tmp_path):
    shards = tmp_path / "shards"
    subprocess.run([sys.executable, "-m", "megavl.tools.synth_shapes", "--out", str(shards), "--num-train", "128",
                    "--num-val", "8", "--seed", "0", "--image-size", "64", "--samples-per-shard", "32"],
                   check=True, capture_output=True)
    run = tmp_path / "run"
    _train(run, f"{shards}/{ALL}", 2)
    data = json.loads((run / "checkpoints" / "step_00000002" / "megavl" / "meta.json").read_text())["data"]
    assert str(shards) not in json.dumps(data)
    moved = shutil.move(str(shards), str(tmp_path / "scratch"))  # the old place is gone
    proc = _train(run, f"{moved}/{ALL}", 3)
    assert "resumed from" in proc.stderr and "--data-resume approx" not in proc.stderr

    fewer = f"{moved}/train-{{000000..000002}}.tar"
    proc = _train(run, fewer, 4, expect=3)
    reasons = [line for line in proc.stderr.splitlines() if line.startswith("megavl: ")]
    assert len(reasons) == 1 and "removed: train-000003.tar" in reasons[0], proc.stderr[-3000:]
    assert "--data-resume approx" in reasons[0]
    proc = _train(run, fewer, 4, "--data-resume", "approx")
    warning = [line for line in proc.stderr.splitlines() if "WARNING" in line and "--data-resume approx" in line]
    assert warning, proc.stderr[-3000:]
    assert "removed: train-000003.tar" in proc.stderr
