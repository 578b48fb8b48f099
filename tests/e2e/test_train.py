"""Real training runs of megavl/train.py on CPU: TensorBoard tags read back with TensorBoard's own
reader, export + load_pretrained, a resume on shards copied elsewhere with one shard fewer
(`--data-resume approx`), and every ds_config trains and checkpoints. A 2-rank ZeRO-3 run killed
with SIGKILL and resumed is test_video_mixed.py (the same path, with both modalities)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch_helpers import BIN, run_child, torchrun_cmd

import megavl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    subprocess.run([sys.executable, "-m", "megavl.tools.synth_shapes", "--out", str(out), "--num-train", "256",
                    "--num-val", "32", "--seed", "0", "--image-size", "64", "--samples-per-shard", "64"],
                   check=True, capture_output=True)
    return out


def _sets(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["--set", f"run.output_dir={out}", f"data.train_shards={shards}/train-{{000000..000003}}.tar",
            f"data.val_shards={shards}/val-000000.tar", "data.batch_size=8", "data.num_workers=1",
            "run.log_every=1", *extra]


def _two_ranks(ds_config: str, sets: list[str]) -> list[str]:
    return torchrun_cmd(2, ds_config, "configs/tiny.yaml", *sets)


def _scalars(out: Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}, acc.Tags()["images"]


def test_one_process_run_logs_every_tag_and_exports(shards, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "megavl/train.py", "--ds_config", "ds_configs/zero0.json", "--config", "configs/tiny.yaml",
           *_sets(shards, out, "run.max_steps=4", "run.checkpoint_every=2", "run.eval_every=2",
                  "run.image_log_every=2")]
    proc = run_child(cmd)
    assert "retrieval i2t R@1" in proc.stdout + proc.stderr

    scalars, images = _scalars(out)
    expected = ["loss/total", "train/lr", "train/grad_norm", "train/itc_temperature", "train/teacher_momentum",
                "curriculum/mode", "perf/samples_per_sec", "perf/tflops", "perf/mfu", "perf/mfu_peak_tflops",
                "perf/mfu_peak_probed", "perf/data_wait",
                "data/skipped/corrupt_image", "data/skipped/truncated_tar"]
    expected += [f"loss/{name}" for name in ("itc", "itm", "mlm", "mim_pixel", "mim_sem", "scl")]
    expected += [f"eval/{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    missing = [t for t in expected if t not in scalars]
    assert not missing, f"missing tags {missing}; have {sorted(scalars)}"
    assert sorted(scalars["loss/total"]) == [1, 2, 3, 4]
    assert sorted(scalars["eval/i2t_r1"]) == [0, 2, 4]  # before training, every 2 steps, at the end
    assert [scalars["curriculum/mode"][s] for s in (1, 2, 3, 4)] == [0.0, 1.0, 0.0, 1.0]  # alternating
    assert all(v > 0 for v in scalars["train/grad_norm"].values())
    assert set(scalars["perf/mfu_peak_probed"].values()) == {1.0}  # CPU: against the matmul probe
    assert all(0 < v < 1 for v in scalars["perf/mfu"].values())
    assert images, "no mask/reconstruction images"

    export = tmp_path / "export"
    run_child([str(BIN / "megavl-export"), str(out / "checkpoints"), str(export)])
    model = megavl.load_pretrained(export)
    saved = torch.load(out / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)["module"]
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, saved[f"student.{name}"], rtol=0, atol=0, msg=name)

    # The data moved, and lost a shard: the checkpoint names shards relative to their directory, and
    # --data-resume approx goes from train.py to the loader, which continues and names what changed.
    # (The batches of an exact resume on moved shards, and the exit-3 refusal without the flag:
    # tests/unit/data/test_data_moved_shards.py, tests/unit/engine/test_engine_pieces.py.)
    data = json.loads((out / "checkpoints" / "step_00000004" / "megavl" / "meta.json").read_text())["data"]
    assert str(shards) not in json.dumps(data)
    moved = Path(shutil.copytree(shards, tmp_path / "scratch"))
    cmd = [sys.executable, "megavl/train.py", "--ds_config", "ds_configs/zero0.json", "--config", "configs/tiny.yaml",
           "--data-resume", "approx", "--set", f"run.output_dir={out}",
           f"data.train_shards={moved}/train-{{000000..000002}}.tar", "data.val_shards=[]", "data.batch_size=8",
           "data.num_workers=0", "run.max_steps=5", "run.eval_every=-1", "run.image_log_every=1000"]
    proc = run_child(cmd)
    assert "resumed from" in proc.stderr, proc.stderr[-3000:]
    warning = [line for line in proc.stderr.splitlines() if "WARNING" in line and "--data-resume approx" in line]
    assert warning and "removed: train-000003.tar" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("ds_config", ["zero1", "zero2", "zero3_offload"])
def test_every_ds_config_trains_and_checkpoints(shards, tmp_path, ds_config):
    out = tmp_path / ds_config
    cmd = [sys.executable, "megavl/train.py", "--ds_config", f"ds_configs/{ds_config}.json", "--config",
           "configs/tiny.yaml", *_sets(shards, out, "run.max_steps=2", "run.checkpoint_every=2", "run.eval_every=-1",
                                       "data.num_workers=0")]
    run_child(cmd)
    scalars, _ = _scalars(out)
    assert sorted(scalars["loss/total"]) == [1, 2] and all(v > 0 for v in scalars["train/grad_norm"].values())
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
