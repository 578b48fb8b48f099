"""Engine pieces that need no processes: curriculum, lr schedule, param groups, ds_config, checkpoint
bookkeeping, retrieval metrics, launcher environment."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from megavl.config import ConfigError, CurriculumConfig, load_config
from megavl.engine import checkpoint
from megavl.tasks.curriculum import mode_at
from megavl.engine.ds_config import build_ds_config
from megavl.engine.launch import fill_env_from_launcher
from megavl.engine.optim import build_optimizer, build_scheduler, lr_factor, param_groups, predates_temporal_group
from megavl.tasks.base import finetune_params
from megavl.tasks.pretrain import PretrainModule, pretrain_params
from megavl.tasks import retrieval

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
    groups = param_groups(pretrain_params(module), cfg.optim)
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


def test_temporal_embedding_has_its_own_rate():
    """A clip model's temporal embedding (zero at start) trains at lr x temporal_lr_mult without decay;
    at the tower's rate it stays too small to tell frame order (engine/optim.py)."""
    cfg = load_config("configs/tiny.yaml", ["model.vision.num_frames=4", "optim.temporal_lr_mult=7.0",
                                            "optim.fusion_lr_mult=5.0"])
    torch.manual_seed(0)
    module = PretrainModule(cfg.model, cfg.objectives, {"single": ["itc"], "two": ["itc"]})
    groups = param_groups(pretrain_params(module), cfg.optim)
    temporal = [g for g in groups if "student.vision.temporal_embed" in g["names"]]
    assert len(temporal) == 1 and temporal[0]["names"] == ["student.vision.temporal_embed"]
    assert temporal[0]["lr"] == pytest.approx(7 * cfg.optim.lr) and temporal[0]["weight_decay"] == 0.0
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["student.vision.pos_embed"]["lr"] == pytest.approx(cfg.optim.lr)
    with_teacher = retrieval.RetrievalModule(cfg.model, queue_size=64)  # the teacher's table is not trained
    fine_tuned = {n: g for g in param_groups(finetune_params(with_teacher), cfg.optim) for n in g["names"]}
    assert fine_tuned["student.vision.temporal_embed"]["lr"] == pytest.approx(7 * cfg.optim.lr)
    assert fine_tuned["student.vision.pos_embed"]["lr"] == pytest.approx(cfg.optim.lr)
    assert [n for n in fine_tuned if n.endswith("temporal_embed")] == ["student.vision.temporal_embed"]
    with pytest.raises(ConfigError, match="optim.temporal_lr_mult"):
        load_config("configs/tiny.yaml", ["optim.temporal_lr_mult=0"])
    # a clip model's checkpoint saved without this group (no temporal_lr_mult) is loaded by name
    assert predates_temporal_group({"lr": 1e-4}, module.student)
    assert not predates_temporal_group({"temporal_lr_mult": 10.0}, module.student)
    assert not predates_temporal_group({}, PretrainModule(load_config("configs/tiny.yaml").model, cfg.objectives,
                                                          {"single": ["itc"], "two": ["itc"]}).student)


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
def _fake_ckpt(root, step, run_id="run_a", complete=True, saved_at=None):
    """A tag as `checkpoint.save` lays it out (tiny files), with or without its marker."""
    tag = root / (checkpoint.tag_for(step) if run_id == "run_a" else checkpoint.tag_for(step, run_id))
    (tag / "megavl").mkdir(parents=True)
    (tag / "megavl" / "meta.json").write_text(json.dumps({"step": step, "run_id": run_id}))
    save_file({"buffer/queue_ptr": torch.tensor(step)}, str(tag / "megavl" / "state.safetensors"))
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"y" * 20)
    if complete:
        files = {str(p.relative_to(tag)): p.stat().st_size for p in tag.rglob("*") if p.is_file()}
        (tag / checkpoint.MARKER).write_text(json.dumps({"run_id": run_id, "step": step, "files": files,
                                                         "saved_at": saved_at if saved_at is not None else step}))
    else:
        (tag / checkpoint.WRITING).write_text(json.dumps({"run_id": run_id}))
    return tag


def test_newest_complete_tag_is_chosen_and_corrupt_ones_are_skipped(tmp_path):
    for step in (2, 4, 6):
        _fake_ckpt(tmp_path, step)
    _fake_ckpt(tmp_path, 8, complete=False)  # killed in the middle of its save: no marker
    assert checkpoint.choose_tag(tmp_path)[0] == checkpoint.tag_for(6)
    state = tmp_path / checkpoint.tag_for(6) / "megavl" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:-3])  # truncated
    tag, skipped = checkpoint.choose_tag(tmp_path)
    assert tag == checkpoint.tag_for(4) and "truncated" in skipped[0]
    state = tmp_path / checkpoint.tag_for(4) / "megavl" / "state.safetensors"
    state.write_bytes(b"\xff" * state.stat().st_size)  # same size, garbage
    tag, skipped = checkpoint.choose_tag(tmp_path)
    assert tag == checkpoint.tag_for(2) and "corrupt" in skipped[-1]
    # a rank's DeepSpeed file that lost its tail (a node died while the page cache was flushed)
    partition = tmp_path / checkpoint.tag_for(2) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    partition.write_bytes(partition.read_bytes()[:7])
    tag, skipped = checkpoint.choose_tag(tmp_path)
    assert tag is None and any("zero_pp_rank_1_mp_rank_00_optim_states.pt has 7 bytes" in s for s in skipped)
    assert checkpoint.choose_tag(tmp_path / "empty") == (None, [])


def test_format1_checkpoint_is_reported_not_used(tmp_path):
    legacy = tmp_path / checkpoint.tag_for(100)
    legacy.mkdir()
    (legacy / "megavl_rank0.pt").write_bytes(b"x")
    tag, skipped = checkpoint.choose_tag(tmp_path)
    assert tag is None and "format-1" in skipped[0]


def test_prune_touches_only_this_runs_tags(tmp_path):
    """Another run's tags are never deleted: a 32-rank resume of a 16-rank run keeps them, although
    their step numbers can be 'newer than latest'."""
    old = [_fake_ckpt(tmp_path, s, run_id="run_a") for s in (96, 98, 100)]
    _fake_ckpt(tmp_path, 101, run_id="run_a", complete=False)  # another run's half-written save
    mine = [_fake_ckpt(tmp_path, s, run_id="b0b", saved_at=1000 + s) for s in (2, 4, 6)]
    _fake_ckpt(tmp_path, 8, run_id="b0b", complete=False)
    removed = checkpoint.prune(tmp_path, keep=2, run_id="b0b")
    assert sorted(removed) == sorted([mine[0].name, checkpoint.tag_for(8, "b0b")])
    assert all(p.is_dir() for p in old) and (tmp_path / checkpoint.tag_for(101)).is_dir()
    assert checkpoint.choose_tag(tmp_path)[0] == mine[-1].name  # the newest marker: the run started last


def test_rng_state_round_trips_through_json(tmp_path):
    import random

    import numpy as np

    state = json.loads(json.dumps(checkpoint.rng_state()))
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    checkpoint.set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


def test_a_data_position_this_data_cannot_continue_is_a_checkpoint_error():
    """What the trainer does with a checkpoint's data state: another item count stops the run naming
    the tag (train.py: exit 3, one line); `--data-resume approx` reaches the loader and continues at
    the same global item count; an older fine-tuning meta (epoch, batch at the top level) is read.
    The loaders' own checks: tests/unit/data/test_data_moved_shards.py."""
    from megavl.data.task_data import TaskDataset, TaskLoader, TaskTrainStream
    from megavl.train import parse_args

    def stream(num_items: int) -> TaskTrainStream:
        dataset = TaskDataset(list(range(num_items)), lambda item: ([], {}))
        return TaskTrainStream(TaskLoader(dataset, lambda items: {"n": len(items), "skipped": []}, batch_size=4,
                                          rank=0, world=1, train=True, seed=3, global_batch_size=8))

    saved = stream(23)  # epochs of 16 items
    it = iter(saved)
    for _ in range(5):
        next(it)
    meta = {"step": 5, "data": saved.state_dict()}  # 20 items: epoch 1, position 4
    with pytest.raises(checkpoint.CheckpointError, match=r"^step_00000005: .*num_items: saved 23, now 31"):
        checkpoint.load_data_state(stream(31), meta, "exact", "step_00000005")
    args = parse_args(["--data-resume", "approx"])
    assert (args.data_resume, parse_args([]).data_resume) == ("approx", "exact")
    grown = stream(31)  # epochs of 24 items
    checkpoint.load_data_state(grown, meta, args.data_resume, "step_00000005")
    assert (grown.epoch, grown.batches_in_epoch) == (0, 5)
    older = stream(23)
    checkpoint.load_data_state(older, {"epoch": 1, "batch": 1, "world_size": 1}, "exact", "step_00000005")
    assert (older.epoch, older.batches_in_epoch) == (1, 1)


# retrieval metrics: tests/unit/tasks/test_retrieval_eval.py


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


def test_env_from_mpirun():
    """`deepspeed --launcher openmpi` runs the ranks under mpirun, which sets only OMPI_* variables:
    without reading them every rank would train alone as rank 0 of a world of one."""
    ompi = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}
    env = fill_env_from_launcher(dict(ompi))
    assert [env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")] == \
        ["5", "8", "1", "4", "node1"]
    with pytest.raises(RuntimeError, match="MASTER_ADDR.*deepspeed_env"):
        fill_env_from_launcher({k: v for k, v in ompi.items() if k != "MASTER_ADDR"})


def test_a_finished_job_leaves_its_process_group():
    """train.py's last act: destroy the process group (a subprocess, so no other test's group is touched)."""
    code = ("import torch.distributed as dist; from megavl.engine.launch import close_distributed, init_distributed;"
            "init_distributed(); assert dist.is_initialized(); close_distributed(); close_distributed();"
            "assert not dist.is_initialized()")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mim_reconstruction_pixels_by_hand(norm_pix):
    """A perfect MIM prediction (the loss's own target) is drawn as the original pixels."""
    from megavl.tasks.pretrain_visuals import prediction_to_pixels
    from megavl_kernels import masked_patch_targets

    torch.manual_seed(0)
    mean, std, p = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3], 2
    pixels = torch.rand(1, 3, 4, 6)  # what the picture should show
    images = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)  # the model's input
    all_patches = torch.arange(6)[None]
    perfect = masked_patch_targets(images, all_patches, p, norm_pix=norm_pix)
    drawn = prediction_to_pixels(perfect, images, p, mean, std, norm_pix)
    # By hand, patch n = (row r, col c) of the 2x3 grid, element (y, x, channel) in MAE's (p, q, c) order.
    for n in range(6):
        r, c = divmod(n, 3)
        for k in range(p * p * 3):
            y, x, ch = k // (p * 3), (k // 3) % p, k % 3
            assert drawn[0, n, k].item() == pytest.approx(pixels[0, ch, r * p + y, c * p + x].item(), abs=1e-5)


def _drawn_mask_picture(module, cfg, images: torch.Tensor) -> torch.Tensor:
    """The one (C, H, W) picture log_mask_images draws for a batch of these images or clips."""
    from megavl.tasks.pretrain_visuals import log_mask_images

    ids = torch.randint(1000, 2000, (images.shape[0], 10))
    batch = {"images": images, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    drawn = {}

    class Monitor:
        def image(self, step, tag, image_CHW):
            drawn[tag] = image_CHW

    log_mask_images(module, batch, "two", Monitor(), 3, cfg)
    (image,) = drawn.values()
    return image


def test_log_mask_images_draws_four_panels(tiny_module):
    cfg, module = tiny_module
    images = torch.randn(2, 3, 64, 64)
    image = _drawn_mask_picture(module, cfg, images)
    assert image.shape == (3, 64, 4 * 64)
    pixels = (images[0] * torch.tensor(cfg.data.std).view(3, 1, 1) + torch.tensor(cfg.data.mean).view(3, 1, 1))
    assert torch.allclose(image[:, :, :64], pixels.clamp(0, 1))


def test_log_mask_images_on_a_clip_shows_its_first_frame():
    """A video step at run.image_log_every: the tube mask over T frames, frame 0 drawn (it crashed
    with 'keep_ids keeps 19 patches of only 16' when the relevance of all frames was ranked as one)."""
    cfg = load_config("configs/tiny.yaml", ["model.vision.num_frames=4"])
    torch.manual_seed(0)
    module = PretrainModule(cfg.model, cfg.objectives, {"single": ["itc"], "two": ["itc"]})
    clips = torch.randn(2, 3, 3, 64, 64)
    image = _drawn_mask_picture(module, cfg, clips)
    assert image.shape == (3, 64, 4 * 64)
    frame0 = clips[0, 0] * torch.tensor(cfg.data.std).view(3, 1, 1) + torch.tensor(cfg.data.mean).view(3, 1, 1)
    assert torch.allclose(image[:, :, :64], frame0.clamp(0, 1))
    kept = (image[:, :, 64 * 2:64 * 3] != 0.5).any(0)  # the text-guided panel: masked patches are grey
    recon = image[:, :, 64 * 3:]
    assert torch.allclose(recon[:, kept], frame0.clamp(0, 1)[:, kept])  # kept patches shown as they are


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_decays_every_group_to_min_lr_ratio(tiny_module, schedule):
    """optim.min_lr_ratio (ALBEF: 1e-5 / 1e-4): the real scheduler ends each group at its rate x ratio."""
    cfg, module = tiny_module
    optim = load_config("configs/tiny.yaml", [f"optim.min_lr_ratio=0.1 optim.schedule={schedule}",
                                              "optim.warmup_steps=2 optim.lr=1e-4 optim.fusion_lr_mult=5.0"]).optim
    optimizer = build_optimizer(param_groups(pretrain_params(module), optim), optim, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, optim, total_steps=12)
    base = [g["initial_lr"] for g in optimizer.param_groups]
    assert sorted(set(base)) == pytest.approx([1e-4, 5e-4])
    seen = []
    for _ in range(12):
        seen.append(scheduler.get_last_lr())
        optimizer.step()
        scheduler.step()
    middle = 0.1 + 0.9 * (0.5 if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert seen[7] == pytest.approx([b * middle for b in base])  # halfway through the 10 decay steps
    assert scheduler.get_last_lr() == pytest.approx([b * 0.1 for b in base])  # at total_steps: lr x 0.1, not 0
    with pytest.raises(ConfigError, match="optim.min_lr_ratio"):
        load_config("configs/tiny.yaml", ["optim.min_lr_ratio=1.5"])
