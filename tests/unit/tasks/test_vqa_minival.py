"""VQA's automatic minival (task.minival_images): a seeded set of IMAGES leaves the training pool
with all their questions; deterministic, image-disjoint, counted; an error when train would be empty.
Read from annotation files on disk (load_vqa), VG entries included."""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from launch_helpers import run_child, synth_downstream

from megavl.data.annotations import load_vqa
from megavl.tasks.vqa import holdout_minival


@pytest.fixture()
def pool(tmp_path):
    """12 COCO-style images with 1-4 questions each, 3 VG questions on 2 VG images, in two files."""
    for sub in ("coco", "vg"):
        (tmp_path / sub).mkdir()
    entries, qid = [], 0
    for i in range(12):
        Image.new("RGB", (8, 8)).save(tmp_path / "coco" / f"{i}.png")
        for _ in range(1 + i % 4):
            entries.append({"question_id": qid, "question": "what?", "answer": ["yes"] * 10,
                            "image": f"{i}.png", "dataset": "vqa"})
            qid += 1
    for i in range(2):
        Image.new("RGB", (8, 8)).save(tmp_path / "vg" / f"{i}.png")
    vg = [{"question_id": 1000 + k, "question": "what?", "answer": ["no"], "image": f"{k % 2}.png",
           "dataset": "vg"} for k in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(entries[:15]))
    (tmp_path / "b.json").write_text(json.dumps(entries[15:] + vg))
    roots = {"vqa": str(tmp_path / "coco"), "vg": str(tmp_path / "vg")}
    items, _ = load_vqa([str(tmp_path / "a.json"), str(tmp_path / "b.json")], roots, need_answers=True)
    return items


def test_minival_is_deterministic_image_disjoint_and_counted(pool):
    train, minival, counts = holdout_minival(pool, 4, seed=7)
    held = {it.image for it in minival}
    assert len(held) == 4 and all(it.source == "vqa" for it in minival)
    assert not held & {it.image for it in train}  # no image on both sides
    per_image = Counter(it.image for it in pool)
    assert len(minival) == sum(per_image[im] for im in held)  # every question of a held-out image
    assert sorted(it.question_id for it in train + minival) == sorted(it.question_id for it in pool)
    assert counts == {"images": 12, "minival_images": 4, "minival_questions": len(minival),
                      "train_questions": len(pool) - len(minival), "dropped_vg_questions": 0}
    # the same seed and images give the same split whatever the file order; another seed differs
    again, _, _ = holdout_minival(list(reversed(pool)), 4, seed=7)
    assert {it.question_id for it in again} == {it.question_id for it in train}
    other = {frozenset(it.image for it in holdout_minival(pool, 4, seed=s)[1]) for s in range(8)}
    assert len(other) > 1


def test_minival_refuses_to_empty_train(pool):
    assert len(holdout_minival(pool, 11, seed=0)[1]) > 0
    with pytest.raises(ValueError, match="task.minival_images=12.*only 12 VQA images"):
        holdout_minival(pool, 12, seed=0)


def test_minival_config_is_validated():
    from megavl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="task.minival_images"):
        load_config("configs/finetune_vqa_tiny.yaml", ["task.minival_images=10"])  # task.val is set
    cfg = load_config("configs/finetune_vqa_tiny.yaml", ["task.minival_images=10", "task.val="])
    assert cfg.task.minival_images == 10


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synth_downstream(out, 12, 2)
    return out


def _minival_sets(out: Path) -> list[str]:
    return [f"task.image_root={out}", f"task.train=[{out}/vqa_train.json]", "task.val=", "task.test=",
            "task.minival_images=3", "task.min_answer_count=1", "data.batch_size=4"]


def test_vqa_parts_evaluate_the_held_out_minival(synth):
    """vqa.build with task.minival_images and no task.val: the train loader holds the rest, the
    "val" split is the minival (what the Trainer evaluates and keeps the best checkpoint by)."""
    import torch

    from megavl.config import load_config
    from megavl.tasks import vqa
    from megavl.tasks.task import TaskEnv

    out = synth
    cfg = load_config("configs/finetune_vqa_tiny.yaml", _minival_sets(out))
    parts = vqa.build(cfg, TaskEnv(torch.device("cpu"), torch.float32, 0, 1, {}))
    pool, _ = load_vqa([f"{out}/vqa_train.json"], {"vqa": str(out)}, need_answers=True)
    train, minival, _ = holdout_minival(pool, 3, cfg.run.seed)
    assert parts.has_val
    assert [it.question_id for it in parts.train_loader.loader.dataset.items] == [it.question_id for it in train]
    metrics = parts.evaluate("val")
    assert metrics["questions"] == len(minival) and 0 <= metrics["overall"] <= 100


@pytest.mark.slow
def test_finetuning_run_evaluates_the_minival_and_keeps_the_best(synth, tmp_path):
    """One ZeRO-0 process through megavl/train.py: with no task.val the Trainer evaluates the
    held-out minival at the end and writes best/ by its overall accuracy."""
    out = tmp_path / "run"
    # run_child's environment drops the rendezvous variables the in-process world of one above
    # left in os.environ (the child tried to listen on the parent's MASTER_PORT: EADDRINUSE)
    proc = run_child([sys.executable, "megavl/train.py", "--ds_config", "ds_configs/zero0.json",
                      "--config", "configs/finetune_vqa_tiny.yaml", "--set", *_minival_sets(synth),
                      f"run.output_dir={out}", "run.max_steps=2", "run.eval_every=0", "run.log_every=1"])
    assert "VQA minival held out of the training pool" in proc.stderr
    pool, _ = load_vqa([f"{synth}/vqa_train.json"], {"vqa": str(synth)}, need_answers=True)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val"]["questions"] == len(holdout_minival(pool, 3, 0)[1])
    assert metrics["best"]["step"] == 2 and (out / "best" / "model.safetensors").is_file()
