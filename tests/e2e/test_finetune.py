"""Fine-tuning end to end on 2 CPU ranks (real DeepSpeed engines over gloo, real annotation files and
PNGs written by megavl-synth-downstream): VQA under ZeRO-2 initialised from another run's ZeRO-3
checkpoint (--trust-checkpoint: merged by rank 0 alone), checkpointed, resumed from its step-2
checkpoint reproducing the uninterrupted losses, evaluated, result file complete; NLVR2 under ZeRO-3
with megavl-evaluate on the best weights; retrieval with ALBEF's queue + distillation under ZeRO-2
(best weights and a checkpoint re-evaluated by megavl-evaluate) and under ZeRO-3 stopped by SIGTERM
and resumed with `--resume auto` reproducing the uninterrupted losses."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch_helpers import BIN, REPO, kill_launch, run_child, synth_downstream, torchrun_cmd, train_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes_downstream")
    synth_downstream(out, 48, 12)
    return out


def _train_cmd(task: str, ds: str, synth: Path, out: Path, *extra: str) -> list[str]:
    split = {"vqa": ("vqa_val", "vqa_test"), "nlvr2": ("nlvr2_dev", "nlvr2_test"),
             "retrieval": ("retrieval_val", "retrieval_test")}[task]
    return torchrun_cmd(2, f"ds_configs/{ds}.json", f"configs/finetune_{task}_tiny.yaml",
                         "--set", f"run.output_dir={out}", f"task.image_root={synth}",
                         f"task.train=[{synth}/{task}_train.json]",
                         f"task.val={synth}/{split[0]}.json", f"task.test={synth}/{split[1]}.json",
                         "data.batch_size=8", "run.log_every=1", "run.max_steps=4", "run.checkpoint_every=2",
                         "run.eval_every=2", *extra)


def _train(task: str, ds: str, synth: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_child(_train_cmd(task, ds, synth, out, *extra))


def _losses(out: Path, tag: str = "loss/total") -> dict[int, float]:
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.fixture(scope="module")
def nlvr2_run(synth, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("nlvr2")
    _train("nlvr2", "zero3", synth, run)
    return run


def test_nlvr2_zero3_and_megavl_evaluate(synth, nlvr2_run, tmp_path):
    run = nlvr2_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["count"] == len(json.loads((synth / "nlvr2_test.json").read_text()))
    out = tmp_path / "eval"
    run_child([str(BIN / "megavl-evaluate"), "--config", "configs/finetune_nlvr2_tiny.yaml",
               "--weights", str(run / "best"), "--split", "val", "--out", str(out), "--set",
               f"task.image_root={synth}", f"task.train=[{synth}/nlvr2_train.json]",
               f"task.val={synth}/nlvr2_dev.json"])
    evaluated = json.loads((out / "metrics.json").read_text())
    # the best weights re-evaluated alone give the accuracy the run recorded for them
    assert evaluated["accuracy"] == pytest.approx(metrics["best"]["accuracy"])


def test_vqa_zero2_init_checkpoint_resume_result_file(synth, nlvr2_run, tmp_path):
    # start from another run's ZeRO-3 checkpoints (the NLVR2 run's `latest`), which needs the flag
    init = [f"task.init_from={nlvr2_run / 'checkpoints'}", "--trust-checkpoint"]
    run = tmp_path / "vqa"
    proc = _train("vqa", "zero2", synth, run, *init)
    assert "consolidated once on rank 0 and shared" in proc.stderr
    assert not (run / ".init_from").exists()
    full = _losses(run)
    assert sorted(full) == [1, 2, 3, 4]
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["val"]["overall"] <= 100 and metrics["best"]["step"] in (2, 4)
    result = json.loads((run / "results" / "vqa_result_test.json").read_text())
    test_ids = {e["question_id"] for e in json.loads((synth / "vqa_test.json").read_text())}
    assert {r["question_id"] for r in result} == test_ids and len(result) == len(test_ids)
    assert (run / "best" / "model.safetensors").is_file()
    # resume: drop the final checkpoint, continue from step 2, same losses at steps 3 and 4
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    shutil.rmtree(run / "tb")
    _train("vqa", "zero2", synth, run, *init)
    resumed = _losses(run)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6)


def test_retrieval_two_ranks_queue_best_weights_and_megavl_evaluate(synth, tmp_path):
    from safetensors import safe_open

    run = tmp_path / "retrieval"
    _train("retrieval", "zero2", synth, run, "task.itc_queue_size=32", "task.itc_distill_alpha=0.4")
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"tr1", "ir1", "r_mean"} <= set(metrics["test"])
    assert (run / "best" / "model.safetensors").is_file()
    with safe_open(str(run / "best" / "task_head.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["temp"]  # the teacher and the queue stay in the checkpoints
    out = tmp_path / "eval"
    run_child([str(BIN / "megavl-evaluate"), "--config", "configs/finetune_retrieval_tiny.yaml",
               "--weights", str(run / "best"), "--split", "val", "--out", str(out), "--set",
               f"task.image_root={synth}", f"task.train=[{synth}/retrieval_train.json]",
               f"task.val={synth}/retrieval_val.json", "task.itc_queue_size=32", "task.itc_distill_alpha=0.4"])
    evaluated = json.loads((out / "metrics.json").read_text())
    assert evaluated["r_mean"] == pytest.approx(metrics["best"]["r_mean"])
    # a checkpoint evaluates on another world size and batch size than its training run's: only
    # its weights are read, not its data position
    last = sorted((run / "checkpoints").glob("step_*"))[-1]
    run_child([str(BIN / "megavl-evaluate"), "--config", "configs/finetune_retrieval_tiny.yaml",
               "--weights", str(last), "--split", "val", "--out", str(tmp_path / "eval_ckpt"), "--set",
               f"task.image_root={synth}", f"task.train=[{synth}/retrieval_train.json]",
               f"task.val={synth}/retrieval_val.json", "task.itc_queue_size=32", "task.itc_distill_alpha=0.4",
               "data.batch_size=3", "--trust-checkpoint"])
    evaluated = json.loads((tmp_path / "eval_ckpt" / "metrics.json").read_text())
    assert evaluated["r_mean"] == pytest.approx(metrics["val"]["r_mean"])


def _signal_rank(launcher: subprocess.Popen, local_rank: int, sig: int) -> None:
    """Send `sig` to ONE rank of the launch (as a scheduler's signal may reach one task first): the
    ranks must agree on the stop by themselves."""
    import psutil

    ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True)
             if "megavl/train.py" in p.cmdline() and p.environ().get("LOCAL_RANK") == str(local_rank)]
    assert len(ranks) == 1, [p.cmdline() for p in ranks]
    ranks[0].send_signal(sig)


def test_retrieval_queue_zero3_sigterm_saves_and_resume_auto_equals_uninterrupted(synth, tmp_path):
    """Queue + distillation on ZeRO-3 (teacher on partitions, its shards and the queue checkpointed);
    SIGTERM to one rank after step 2: a checkpoint, a clean exit, and `--resume auto` continues with
    the uninterrupted run's losses (global batches of 24 captions: the warm-up epoch ends within the
    run, the ring buffer of 40 slots wraps mid-batch)."""
    import signal
    import time

    steps = 7
    common = ("task.itc_queue_size=40", "task.itc_distill_alpha=0.4", f"run.max_steps={steps}",
              "run.checkpoint_every=2", "run.eval_every=-1", "run.stop_check_every=1",
              "run.keep_checkpoints=10", "data.batch_size=12")
    captions = len(json.loads((synth / "retrieval_train.json").read_text()))
    steps_per_epoch = captions // 24
    assert steps_per_epoch < steps, captions
    # The uninterrupted run goes alongside the one to be stopped (their launchers and imports
    # overlap on a 2-core machine); it is waited for before the comparison.
    full = tmp_path / "full"
    full_log = (tmp_path / "full.log").open("w")
    uninterrupted = subprocess.Popen(_train_cmd("retrieval", "zero3", synth, full, *common), cwd=REPO,
                                     env=train_env(), stdout=full_log, stderr=subprocess.STDOUT)

    run = tmp_path / "stopped"
    cmd = _train_cmd("retrieval", "zero3", synth, run, *common)
    log = tmp_path / "stopped.log"
    with open(log, "w") as out:
        first = subprocess.Popen(cmd, cwd=REPO, env=train_env(), stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        marker = run / "checkpoints" / "step_00000002" / "COMPLETE.json"
        deadline = time.monotonic() + 600
        while not marker.is_file():
            assert first.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no step-2 checkpoint within 600 s"
            time.sleep(0.2)
        _signal_rank(first, 1, signal.SIGTERM)
        assert first.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if first.poll() is None:
            kill_launch(first)
    text = log.read_text()
    assert "stop signal: checkpoint saved at step" in text, text[-4000:]
    stopped_at = int(text.split("stop signal: checkpoint saved at step")[1].split(";")[0])
    assert 2 <= stopped_at < steps, stopped_at
    assert (run / "checkpoints" / f"step_{stopped_at:08d}" / "COMPLETE.json").is_file()
    assert not (run / "checkpoints" / f"step_{steps:08d}").exists()
    assert not (run / "metrics.json").exists()  # a stopped run does not evaluate

    assert uninterrupted.wait(timeout=900) == 0, (tmp_path / "full.log").read_text()[-4000:]
    full_log.close()

    # --resume auto (train.py's default); eval_every=0: the final val evaluation only (after the
    # last step, so the losses are unchanged), which exports best/ from ZeRO-3 without the teacher
    run_child(cmd + ["run.eval_every=0", "task.test="])
    metrics = json.loads((run / "metrics.json").read_text())
    assert "r_mean" in metrics["val"] and metrics["best"]["step"] == steps
    assert (run / "best" / "model.safetensors").is_file()
    for tag in ("loss/total", "loss/itc", "loss/itm", "train/itc_distill_alpha"):
        want, got = _losses(full, tag), _losses(run, tag)
        assert sorted(got) == list(range(1, steps + 1)) == sorted(want), tag
        for step in range(1, steps + 1):
            assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), (tag, step)
    alphas = _losses(full, "train/itc_distill_alpha")  # logged at step s: alpha of step s - 1
    assert [alphas[s] for s in range(1, steps + 1)] == pytest.approx(
        [0.4 * min(1.0, (s - 1) / steps_per_epoch) for s in range(1, steps + 1)])
