"""Real training runs of megavl/train.py on CPU: TensorBoard tags read back with TensorBoard's own
reader, export + load_pretrained, a resume on shards copied elsewhere with one shard fewer
(`--data-resume approx`), and a 2-rank ZeRO-3 run killed with SIGKILL and resumed, which must
reproduce the uninterrupted run's per-step losses and final weights."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch_helpers import BIN, deepspeed_cmd, run_child, sigkill_after_checkpoint

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
    return deepspeed_cmd(2, ds_config, "configs/tiny.yaml", *sets)


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
                "curriculum/mode", "perf/samples_per_sec", "perf/tflops", "perf/data_wait",
                "data/skipped/corrupt_image", "data/skipped/truncated_tar"]
    expected += [f"loss/{name}" for name in ("itc", "itm", "mlm", "mim_pixel", "mim_sem", "scl")]
    expected += [f"eval/{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    missing = [t for t in expected if t not in scalars]
    assert not missing, f"missing tags {missing}; have {sorted(scalars)}"
    assert sorted(scalars["loss/total"]) == [1, 2, 3, 4]
    assert sorted(scalars["eval/i2t_r1"]) == [0, 2, 4]  # before training, every 2 steps, at the end
    assert [scalars["curriculum/mode"][s] for s in (1, 2, 3, 4)] == [0.0, 1.0, 0.0, 1.0]  # alternating
    assert all(v > 0 for v in scalars["train/grad_norm"].values())
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


def _export_weights(out: Path, tmp: Path) -> dict[str, torch.Tensor]:
    run_child([str(BIN / "megavl-export"), str(out / "checkpoints"), str(tmp)])
    return load_file(str(tmp / "model.safetensors"))


def test_zero3_two_ranks_killed_and_resumed_equals_uninterrupted(shards, tmp_path):
    steps = 10
    common = ("run.max_steps=10", "run.checkpoint_every=2", "run.eval_every=-1", "run.keep_checkpoints=2")

    full = tmp_path / "full"
    run_child(_two_ranks("ds_configs/zero3.json", _sets(shards, full, *common)), timeout=900)

    resumed = tmp_path / "resumed"
    cmd = _two_ranks("ds_configs/zero3.json", _sets(shards, resumed, *common))
    sigkill_after_checkpoint(cmd, resumed / "checkpoints", "step_00000004", f"step_{steps:08d}", timeout=600)
    run_child(cmd, timeout=900)  # --resume auto

    full_losses, _ = _scalars(full)
    resumed_losses, _ = _scalars(resumed)
    for tag in [t for t in full_losses if t.startswith("loss/")]:
        for step in range(5, steps + 1):
            assert resumed_losses[tag][step] == pytest.approx(full_losses[tag][step], rel=1e-5, abs=1e-6), (tag, step)
    a, b = _export_weights(full, tmp_path / "export_full"), _export_weights(resumed, tmp_path / "export_resumed")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


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
