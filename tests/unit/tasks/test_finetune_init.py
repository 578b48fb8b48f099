"""The tiny fine-tuning recipes can start from the tiny pre-training export (same architecture), and
task.init_from really replaces every backbone tensor: without both, bench/bench_finetune.py's
"pre-trained vs random" comparison would measure nothing (or crash)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from megavl.config import ConfigError, load_config
from megavl.models.vlp import VLPModel
from megavl.tasks.base import architecture_mismatch, load_backbone

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("task", ["vqa", "nlvr2", "retrieval"])
def test_tiny_finetune_recipe_has_the_tiny_pretraining_architecture(task):
    pretrain = load_config(REPO / "configs/tiny.yaml").model
    finetune = load_config(REPO / f"configs/finetune_{task}_tiny.yaml").model
    assert architecture_mismatch(pretrain, finetune) == []


@pytest.mark.parametrize("prefix", ["", "student."])  # an export's bare names, a checkpoint's module names
def test_init_from_replaces_every_backbone_tensor(prefix):
    cfg = load_config(REPO / "configs/tiny.yaml").model
    torch.manual_seed(0)
    source = VLPModel(cfg)
    torch.manual_seed(1)
    target = VLPModel(cfg)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    load_backbone(target, {prefix + k: v.clone() for k, v in source.state_dict().items()}, cfg)
    expected = source.state_dict()
    changed = 0
    for name, value in target.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
        changed += not torch.equal(value, before[name])
    # every randomly initialised tensor differs between the seeds; constants (LayerNorm 1/0, zero
    # biases, fixed buffers) may coincide
    random_init = sum(not torch.equal(expected[k], before[k]) for k in expected)
    assert changed == random_init > len(expected) // 3


def _frames_model(cfg, num_frames: int, seed: int) -> VLPModel:
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, num_frames=num_frames))
    torch.manual_seed(seed)
    model = VLPModel(cfg).eval()
    if model.vision.temporal_embed is not None:  # a trained table, not the zero init
        torch.nn.init.normal_(model.vision.temporal_embed, std=0.5)
    return model


@torch.no_grad()
def test_image_weights_start_a_video_model_whose_still_clip_encodes_as_the_image():
    """An image-only export starts a video model with the temporal table at zero; a clip
    of T copies of an image then gives the image's [CLS] and its patches in every frame."""
    cfg = load_config(REPO / "configs/tiny.yaml").model
    image_model, video_model = _frames_model(cfg, 1, 0), _frames_model(cfg, 4, 1)
    load_backbone(video_model, dict(image_model.state_dict()), image_model.cfg)
    assert torch.count_nonzero(video_model.vision.temporal_embed) == 0
    images = torch.randn(2, 3, cfg.vision.img_size, cfg.vision.img_size)
    alone = image_model.encode_image(images)
    still = video_model.encode_image(images[:, None].expand(-1, 4, -1, -1, -1))
    torch.testing.assert_close(still[:, 0], alone[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(still[:, 1:].unflatten(1, (4, -1)), alone[:, None, 1:].expand(-1, 4, -1, -1),
                               rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("target_frames", [2, 8])
def test_a_temporal_table_of_other_length_is_resampled_as_the_source_encodes_that_many_frames(target_frames):
    cfg = load_config(REPO / "configs/tiny.yaml").model
    source, target = _frames_model(cfg, 4, 0), _frames_model(cfg, target_frames, 1)
    load_backbone(target, dict(source.state_dict()), source.cfg)
    clips = torch.randn(2, target_frames, 3, cfg.vision.img_size, cfg.vision.img_size)
    torch.testing.assert_close(target.encode_image(clips), source.encode_image(clips), rtol=0, atol=0)


@torch.no_grad()
def test_video_weights_start_an_image_model_that_encodes_images_as_the_source_did():
    """A video model encodes an image as a 1-frame clip, which reads no temporal entry: the image-only
    target, which has no table, takes every other tensor as it is and encodes images exactly alike."""
    cfg = load_config(REPO / "configs/tiny.yaml").model
    source, target = _frames_model(cfg, 4, 0), _frames_model(cfg, 1, 1)
    load_backbone(target, dict(source.state_dict()), source.cfg)
    images = torch.randn(2, 3, cfg.vision.img_size, cfg.vision.img_size)
    torch.testing.assert_close(target.encode_image(images), source.encode_image(images), rtol=0, atol=0)
    torch.testing.assert_close(target.vision.pos_embed, source.vision.pos_embed, rtol=0, atol=0)


def test_pretraining_starts_student_and_teacher_from_task_init_from(tmp_path):
    """task.init_from with task.name=pretrain (continued pre-training) loads student and teacher: a
    run that ignored it would start from random weights without a word."""
    from safetensors.torch import save_file

    from megavl.config import to_dict
    from megavl.engine.task_init import read_init
    from megavl.tasks.pretrain import PretrainModule, load_weights

    full = load_config(REPO / "configs/tiny.yaml")
    source = _frames_model(full.model, 1, 0)
    save_file({k: v.clone() for k, v in source.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(to_dict(full)))
    video_cfg = dataclasses.replace(full.model, vision=dataclasses.replace(full.model.vision, num_frames=4))
    torch.manual_seed(1)
    module = PretrainModule(video_cfg, full.objectives, {"two": ["itc", "mim_sem"]})
    load_weights(module, *read_init(str(tmp_path)), "task.init_from")
    for name, value in source.state_dict().items():
        torch.testing.assert_close(module.student.state_dict()[name], value, rtol=0, atol=0, msg=name)
        for teacher in module.ema_teachers().values():  # each teacher's parts start as the student
            if name in teacher.state_dict():
                torch.testing.assert_close(teacher.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert all(torch.count_nonzero(t.vision.temporal_embed) == 0 for t in module.ema_teachers().values())
    assert module.ema_teachers(), "the recipe's objectives read a teacher"


def test_a_missing_task_init_from_is_a_clear_error_when_read_but_not_when_a_saved_config_loads(tmp_path):
    """A run's saved config.yaml keeps its task.init_from after that directory moves: loading the
    config (export, resume, megavl-evaluate) must not depend on it; reading the weights names it."""
    from megavl.engine.task_init import read_init

    missing = str(tmp_path / "moved_away")
    cfg = load_config(REPO / "configs/tiny.yaml", [f"task.init_from={missing}"])
    assert cfg.task.init_from == missing
    with pytest.raises(ConfigError, match="task.init_from=.*moved_away: not a directory"):
        read_init(missing)
