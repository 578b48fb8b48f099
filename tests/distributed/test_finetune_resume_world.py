"""Fine-tuning resumes on another world size with the same global batch, as pre-training does
(tests/e2e/test_resume_world.py): retrieval with ALBEF's queue and momentum teacher under ZeRO-2,
through megavl/train.py on gloo ranks of this machine.

One uninterrupted 2-rank run (micro-batch 4, global batch 8, 4 steps, a checkpoint every 2). Its
step-2 checkpoint continues on 1 rank x 8 (resharded): steps 3-4 equal the reference's to 1e-5. That
run's step-3 checkpoint continues on 2 ranks x 4: step 4 equals the 1-rank run's. In the 2-rank
runs, rank 1 cannot list the checkpoint directory or read a meta.json (finetune_resume_worker.py):
rank 0 alone chooses the tag.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch_helpers import run_ranks, synth_downstream

WORKER = Path(__file__).with_name("finetune_resume_worker.py")
MICRO = {1: 8, 2: 4}  # 8 captions per micro-step at both world sizes
pytestmark = pytest.mark.slow


def _run(world: int, synth: Path, out: Path, *extra: str) -> None:
    run_ranks(world, [WORKER, "--ds_config", "ds_configs/zero2.json", "--config", "configs/finetune_retrieval_tiny.yaml",
                      "--set", f"run.output_dir={out}", f"task.image_root={synth}",
                      f"task.train=[{synth}/retrieval_train.json]", "task.val=", "task.test=",
                      "task.itc_queue_size=16", "task.itc_distill_alpha=0.4", f"data.batch_size={MICRO[world]}",
                      "run.global_batch_size=8", "run.grad_accum=1", "run.max_steps=4", "run.checkpoint_every=2",
                      "run.keep_checkpoints=5", "run.eval_every=-1", "run.log_every=1", *extra],
               timeout=900, what=f"{world}-rank fine-tuning")


def _losses(out: Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]
            if tag.startswith("loss/") or tag == "train/itc_distill_alpha"}


def _continue_from(ref: Path, tag: str, out: Path) -> Path:
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / tag, out / "checkpoints" / tag)
    return out


def _assert_same(want: Path, got: Path, steps) -> None:
    a, b = _losses(want), _losses(got)
    assert set(a) == set(b) and "loss/itc" in a, (sorted(a), sorted(b))
    for tag in a:
        assert sorted(b[tag]) == list(steps), (tag, sorted(b[tag]))
        for step in steps:
            assert b[tag][step] == pytest.approx(a[tag][step], rel=1e-5, abs=1e-6), (tag, step)


def test_retrieval_finetuning_resumes_on_one_rank_then_two(tmp_path):
    synth = tmp_path / "synth"
    synth_downstream(synth, 24, 4)
    ref = tmp_path / "ref"
    _run(2, synth, ref)
    chain = _continue_from(ref, "step_00000002", tmp_path / "chain")
    _run(1, synth, chain, "run.checkpoint_every=1")  # 2 -> 1
    _assert_same(ref, chain, range(3, 5))
    again = _continue_from(chain, "step_00000003", tmp_path / "again")
    _run(2, synth, again)  # 1 -> 2
    _assert_same(chain, again, range(4, 5))
