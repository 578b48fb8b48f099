"""Mixed image + video pre-training through torchrun: real H.264 mp4 shards
(`megavl-synth-videos`) and PNG shards (`megavl-synth-shapes`) as two sources of one run, 2 ranks
under ZeRO-3 (gloo on CPU), grad_accum 2. Every micro-step of an optimizer step, on every rank,
reads one modality, as the seeded schedule says; a run SIGKILLed after its step-2 checkpoint and
continued with `--resume auto` trains on exactly the samples (keys per rank and micro-step), with
a DataLoader worker per rank whose position resumes too, and gives exactly the losses and the final
(exported) weights of the uninterrupted run.

Every objective on (ITC, ITM, MLM, MIM-pixel, SemMIM, SCL): the image and the video steps each run
the whole recipe (tube masks on clips), and the masks are resume-exact too. The uninterrupted run and the run to be killed
start together (their launchers and imports overlap on a 2-core machine)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import torch
from safetensors.torch import load_file

from launch_helpers import BIN, REPO, run_child, sigkill_after_checkpoint, train_env
from test_train import _scalars, _two_ranks

pytestmark = pytest.mark.slow
STEPS = 6
# data.seed 3, share 1/2, blocks of 4 steps: video, video, image, image, video, video (video steps
# fall in both fusion modes of the alternating curriculum, and both modalities follow the resume).
# 16 clips = 2 video steps per epoch: the video stream enters its epoch 1 after the resume.
MODALITIES = ["video", "video", "image", "image", "video", "video"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mixed")
    subprocess.run([sys.executable, "-m", "megavl.tools.synth_videos", "--out", str(root / "videos"),
                    "--num-train", "16", "--num-val", "4", "--seed", "0", "--image-size", "32",
                    "--num-frames", "4", "--samples-per-shard", "8"], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "megavl.tools.synth_shapes", "--out", str(root / "images"),
                    "--num-train", "32", "--num-val", "4", "--seed", "0", "--image-size", "32",
                    "--samples-per-shard", "16"], check=True, capture_output=True)
    return root / "images", root / "videos"


def _cmd(shards: tuple[Path, Path], out: Path) -> list[str]:
    images, videos = shards
    sources = f"[{images}/train-{{000000..000001}}.tar,{videos}/train-{{000000..000001}}.tar]"
    return _two_ranks("ds_configs/zero3.json", [
        "--set", f"run.output_dir={out}", f"data.train_shards={sources}", "data.val_shards=[]",
        "data.video_share=0.5", "data.modality_block=4", "data.seed=3",
        "data.batch_size=2", "run.grad_accum=2", "run.global_batch_size=8", "data.num_workers=1",
        "data.image_size=32", "model.vision.img_size=32", "model.vision.num_frames=2", "data.num_frames=2",
        f"run.max_steps={STEPS}", "run.checkpoint_every=2", "run.keep_checkpoints=5", "run.eval_every=-1",
        "run.log_every=1", "run.log_sample_keys=true"])


def _sample_keys(out: Path) -> dict[tuple[int, int, int], tuple[str, list[str]]]:
    """(rank, step, micro) -> (modality, keys); a step logged again after a resume: the last entry."""
    got = {}
    for rank in (0, 1):
        for line in (out / "sample_keys" / f"rank{rank}.jsonl").read_text().splitlines():
            entry = json.loads(line)
            got[rank, entry["step"], entry["micro"]] = (entry["modality"], entry["keys"])
    return got


def test_mixed_zero3_run_killed_and_resumed_equals_uninterrupted(shards, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    log = (tmp_path / "full.log").open("w")  # a file, not a pipe: nobody reads it while we wait
    uninterrupted = subprocess.Popen(_cmd(shards, full), cwd=REPO, env=train_env(), stdout=log,
                                     stderr=subprocess.STDOUT)
    sigkill_after_checkpoint(_cmd(shards, resumed), resumed / "checkpoints", "step_00000002",
                             f"step_{STEPS:08d}", timeout=600)
    uninterrupted.wait(timeout=900)
    log.close()
    assert uninterrupted.returncode == 0, (tmp_path / "full.log").read_text()[-4000:]
    proc = run_child(_cmd(shards, resumed), timeout=900)  # --resume auto
    assert "resumed from" in proc.stdout + proc.stderr

    want, got = _sample_keys(full), _sample_keys(resumed)
    assert sorted(got) == sorted(want) == [(r, s, m) for r in (0, 1) for s in range(1, STEPS + 1) for m in (0, 1)]
    for (rank, step, micro), (modality, keys) in want.items():
        assert modality == MODALITIES[step - 1], (rank, step, micro)
        assert got[rank, step, micro] == (modality, keys), (rank, step, micro)

    full_scalars, _ = _scalars(full)
    resumed_scalars, _ = _scalars(resumed)
    assert [full_scalars["data/modality"][s] for s in range(1, STEPS + 1)] == [
        float(m == "video") for m in MODALITIES]
    video_steps = [sum(m == "video" for m in MODALITIES[:s]) for s in range(1, STEPS + 1)]
    assert [full_scalars["data/samples/video"][s] for s in range(1, STEPS + 1)] == [8.0 * n for n in video_steps]
    assert [full_scalars["data/samples/image"][s] for s in range(1, STEPS + 1)] == [
        8.0 * (s - n) for s, n in zip(range(1, STEPS + 1), video_steps)]
    for tag in [t for t in full_scalars if t.startswith(("loss/", "data/"))]:
        for step in range(3, STEPS + 1):  # after the step-2 checkpoint (or the step-4 one)
            assert resumed_scalars[tag][step] == pytest.approx(full_scalars[tag][step], rel=1e-5, abs=1e-6), (
                tag, step)
    want_weights, got_weights = _export_weights(full, tmp_path / "export_full"), _export_weights(
        resumed, tmp_path / "export_resumed")
    assert want_weights.keys() == got_weights.keys()
    for name in want_weights:
        torch.testing.assert_close(got_weights[name], want_weights[name], rtol=1e-5, atol=1e-6, msg=name)


def _export_weights(out: Path, tmp: Path) -> dict[str, torch.Tensor]:
    run_child([str(BIN / "megavl-export"), str(out / "checkpoints"), str(tmp)])
    return load_file(str(tmp / "model.safetensors"))
