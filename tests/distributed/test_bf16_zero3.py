"""bf16 pre-training under ZeRO-3 on 2 CPU ranks (the GPU default precision), through
the real Trainer with grad_accum 2: parameters are bf16 while the objective buffers stay fp32, the EMA
teacher keeps fp32 master copies of its bf16 shards (saved and restored), the ITC temperature stays
clamped, and a run resumed from the step-2 checkpoint repeats the uninterrupted run's steps 3-4."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch_helpers import REPO, run_ranks

WORKER = Path(__file__).with_name("bf16_train_worker.py")
pytestmark = pytest.mark.slow


def test_bf16_zero3_two_ranks_trains_checkpoints_and_resumes(tmp_path):
    shards = tmp_path / "shards"
    subprocess.run([sys.executable, "-m", "megavl.tools.synth_shapes", "--out", str(shards), "--num-train", "64",
                    "--num-val", "8", "--seed", "0", "--image-size", "64", "--samples-per-shard", "32"],
                   check=True, capture_output=True, cwd=REPO)
    run_ranks(2, [WORKER, shards, tmp_path], timeout=900)
    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["param_dtype"] == "torch.bfloat16"
        # DeepSpeed casts parameters, not buffers: the queue and SemMIM centers keep fp32 while the features
        # written into them are bf16 (enqueue and update_center cast), and the image ids stay integers.
        assert {r["dtypes"][n] for n in ("image_queue", "text_queue", "center_patch", "center_global")} == {"torch.float32"}
        assert r["dtypes"]["queue_image_ids"] == "torch.int64"
        assert r["teacher_shard_dtype"] == "torch.bfloat16"
        assert r["teacher_master_count"] > 0 and r["teacher_master_dtypes"] == ["torch.float32"]
        assert r["resumed_start"] == 2 and r["resumed_master_count"] == r["teacher_master_count"]
        assert r["all_finite"]
        assert 0.0695 - 5e-4 <= r["temperature"] <= 0.0705 + 5e-4  # within one bf16 spacing of the bounds
        assert sorted(r["full_losses"]) == ["1", "2", "3", "4"] and sorted(r["resumed_losses"]) == ["3", "4"]
        for step in ("3", "4"):
            for name, value in r["full_losses"][step].items():
                assert r["resumed_losses"][step][name] == pytest.approx(value, rel=1e-6, abs=1e-6), (step, name)
