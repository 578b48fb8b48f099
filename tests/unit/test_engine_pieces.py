"""Engine pieces that need no processes: curriculum, lr schedule, param groups, ds_config, checkpoint
bookkeeping, retrieval metrics, launcher environment."""
import json
import math

import pytest
import torch

from megavl.config import ConfigError, CurriculumConfig, load_config
from megavl.engine import checkpoint
from megavl.engine.curriculum import mode_at
from megavl.engine.ds_config import build_ds_config
from megavl.engine.launch import fill_env_from_launcher
from megavl.engine.optim import lr_factor, param_groups
from megavl.objectives.pretrain import PretrainModule

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------ curriculum
def test_default_cycle_alternates_every_step():
    cfg = CurriculumConfig()
    assert [mode_at(s, 0, cfg) for s in range(5)] == ["single", "two", "single", "two", "single"]


def test_phases_and_epoch_modes():
    cfg = CurriculumConfig(cycle=[["single", 3], ["two", 2]])
    assert [mode_at(s, 0, cfg) for s in range(11)] == ["single"] * 3 + ["two"] * 2 + ["single"] * 3 + ["two"] * 2 + ["single"]
    by_epoch = CurriculumConfig(epoch_modes=["two", "single"])
    assert [mode_at(0, e, by_epoch) for e in range(4)] == ["two", "single", "two", "single"]


# ------------------------------------------------------------------------------- optimizer
def test_lr_warmup_then_cosine_and_linear():
    assert lr_factor(0, 10, 110, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 10, 110, "cosine") == pytest.approx(1.0)
    assert lr_factor(60, 10, 110, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, 10, 110, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(60, 10, 110, "linear") == pytest.approx(0.5)
    assert lr_factor(110, 10, 110, "linear", min_ratio=0.1) == pytest.approx(0.1)


@pytest.fixture(scope="module")
def tiny_module():
    cfg = load_config("configs/tiny.yaml", ["optim.fusion_lr_mult=5.0"])
    torch.manual_seed(0)
    return cfg, PretrainModule(cfg.model, cfg.objectives, {"single": ["itc"], "two": ["itc"]})


def test_param_groups_decay_and_lr_multiplier(tiny_module):
    cfg, module = tiny_module
    groups = param_groups(module, cfg.optim)
    by_name = {n: g for g in groups for n in g["names"]}
    trained = {n for n, p in module.student_parameters() if p.requires_grad}
    assert set(by_name) == trained  # every trained parameter exactly once; no teacher parameter
    assert not any(n.startswith("teacher.") for n in by_name)
    for name in ["student.text.word_embeddings.weight", "student.vision.pos_embed", "student.vision.cls_token",
                 "student.fusion.layers.0.norm1.weight", "student.vision.blocks.0.attn.qkv.bias", "temp"]:
        assert by_name[name]["weight_decay"] == 0.0, name
    assert by_name["student.vision.blocks.0.attn.qkv.weight"]["weight_decay"] == cfg.optim.weight_decay
    assert by_name["student.vision.blocks.0.attn.qkv.weight"]["lr"] == pytest.approx(cfg.optim.lr)
    assert by_name["student.fusion.layers.0.mlp.fc1.weight"]["lr"] == pytest.approx(5 * cfg.optim.lr)
    assert by_name["student.itm_head.proj.0.weight"]["lr"] == pytest.approx(5 * cfg.optim.lr)


# ------------------------------------------------------------------------------- ds config
def _write(tmp_path, data):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(data))
    return path


def test_ds_config_filled_from_recipe(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["data.batch_size=4", "run.grad_accum=2"])
    ds = build_ds_config("ds_configs/zero3.json", cfg, world_size=2, device=CPU)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (4, 2, 16)
    assert ds["bf16"]["enabled"] is False and ds["gradient_clipping"] == cfg.optim.grad_clip
    assert ds["zero_optimization"]["stage"] == 3 and ds["tensorboard"]["enabled"] is False


def test_ds_config_batch_mismatch_is_an_error(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["data.batch_size=4", "run.global_batch_size=12"])
    with pytest.raises(ConfigError, match="global_batch_size=12"):
        build_ds_config("ds_configs/zero0.json", cfg, world_size=2, device=CPU)
    cfg = load_config("configs/tiny.yaml", ["data.batch_size=4"])
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=8 disagrees"):
        build_ds_config(_write(tmp_path, {"train_micro_batch_size_per_gpu": 8}), cfg, world_size=1, device=CPU)
    with pytest.raises(ConfigError, match="bf16.enabled"):
        build_ds_config(_write(tmp_path, {"bf16": {"enabled": True}}), cfg, world_size=1, device=CPU)
    with pytest.raises(ConfigError, match="not found"):
        build_ds_config(tmp_path / "nope.json", cfg, world_size=1, device=CPU)


# ------------------------------------------------------------------------------ checkpoints
def _fake_ckpt(root, step, ranks=2):
    tag = root / checkpoint.tag_for(step)
    tag.mkdir(parents=True)
    for r in range(ranks):
        (tag / f"megavl_rank{r}.pt").write_bytes(b"x")
    return tag


def test_latest_is_the_newest_complete_tag(tmp_path):
    for step in (2, 4, 6):
        _fake_ckpt(tmp_path, step)
    (tmp_path / "latest").write_text(checkpoint.tag_for(4))  # step 6 was being written when killed
    assert checkpoint.latest_tag(tmp_path, world_size=2) == checkpoint.tag_for(4)
    (tmp_path / checkpoint.tag_for(4) / "megavl_rank1.pt").unlink()  # a rank's file missing
    assert checkpoint.latest_tag(tmp_path, world_size=2) == checkpoint.tag_for(2)
    assert checkpoint.latest_tag(tmp_path / "empty", world_size=2) is None


def test_prune_keeps_newest_and_drops_half_written(tmp_path):
    for step in (2, 4, 6, 8):
        _fake_ckpt(tmp_path, step)
    (tmp_path / "latest").write_text(checkpoint.tag_for(6))
    checkpoint.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [checkpoint.tag_for(4), checkpoint.tag_for(6)]


# retrieval metrics: tests/unit/test_retrieval_eval.py


# ------------------------------------------------------------------------------ launcher env
def test_env_from_slurm_and_defaults():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "77",
           "MASTER_ADDR": "10.0.0.1"}
    fill_env_from_launcher(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_PORT"]) == ("3", "4", "1", "20077")
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "5",
                "SLURM_PROCID": "0"}
    assert fill_env_from_launcher(dict(torchrun)) == torchrun  # a launcher's own variables win
    alone = fill_env_from_launcher({})
    assert (alone["RANK"], alone["WORLD_SIZE"]) == ("0", "1") and int(alone["MASTER_PORT"]) > 0
    with pytest.raises(RuntimeError, match="MASTER_PORT"):
        fill_env_from_launcher({"RANK": "0", "WORLD_SIZE": "2"})
