"""Video-text retrieval fine-tuned through the `retrieval` task on 2 CPU ranks (real DeepSpeed
engines over gloo): real mp4 files and MSRVTT-style JSONL annotations written by
megavl-synth-videos, a corrupt clip in the training and test files (counted skips, the test clip
scored on a black clip), ZeRO-2 fine-tuning of 4 steps from random init, the 1k-A style test split
evaluated (metrics.json with tr1..r_mean), and megavl-evaluate on the best weights reproducing the
val figures the run recorded."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch_helpers import BIN, run_child, torchrun_cmd

pytestmark = pytest.mark.slow
KEYS = {"tr1", "tr5", "tr10", "ir1", "ir5", "ir10", "txt_r_mean", "img_r_mean", "r_mean"}
VIDEO = ["model.vision.img_size=32", "data.image_size=32", "model.vision.num_frames=4",
         "data.num_frames=4", "task.retrieval_k=4"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("msrvtt_synth")
    run_child([str(BIN / "megavl-synth-videos"), "--out", str(out), "--num-train", "16", "--num-val", "6",
               "--num-test", "7", "--seed", "0", "--image-size", "32", "--num-frames", "8"])
    (out / "videos" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    for split in ("train", "test"):
        with open(out / f"msrvtt_{split}.jsonl", "a") as f:
            f.write(json.dumps({"video": "videos/broken.mp4", "caption": "a broken clip"}) + "\n")
    return out


def _split_args(clips: Path) -> list[str]:
    return [f"task.video_root={clips}", f"task.train=[{clips}/msrvtt_train.jsonl]",
            f"task.val={clips}/msrvtt_val.jsonl", f"task.test={clips}/msrvtt_test.jsonl"]


def test_video_retrieval_two_ranks_then_megavl_evaluate(clips, tmp_path):
    run = tmp_path / "run"
    run_child(torchrun_cmd(2, "ds_configs/zero2.json", "configs/finetune_retrieval_tiny.yaml",
                            "--set", f"run.output_dir={run}", *_split_args(clips), *VIDEO, "data.batch_size=4",
                            "run.log_every=1", "run.max_steps=4", "run.checkpoint_every=4", "run.eval_every=2"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert KEYS <= set(metrics["test"]) and KEYS <= set(metrics["val"])
    assert all(0 <= metrics["test"][k] <= 100 for k in KEYS)
    # 17 training items, 16 drawn per epoch (2 ranks x 4 x 2 steps) over 2 epochs: the broken clip
    # is drawn (fixed seed), counted and dropped from its batch, never a crash
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert acc.Scalars("data/skipped/corrupt_video")[-1].value >= 1

    out = tmp_path / "eval"
    run_child([str(BIN / "megavl-evaluate"), "--config", "configs/finetune_retrieval_tiny.yaml", "--weights",
               str(run / "best"), "--split", "val", "--out", str(out), "--set", *_split_args(clips), *VIDEO])
    evaluated = json.loads((out / "metrics.json").read_text())
    assert evaluated["r_mean"] == pytest.approx(metrics["best"]["r_mean"])
