"""Pre-training's EMA models: built only for the objectives that read them, each on its own schedule
(SemMIM's teacher: iBOT's cosine; ITC's queue and distillation: ALBEF's constant 0.995 and its alpha
ramp over the first epoch), and a checkpoint saved with one teacher resuming into two."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from megavl.config import load_config
from megavl.engine import checkpoint
from megavl.objectives.teacher import distill_alpha, make_teacher, teacher_momentum
from megavl.tasks import pretrain as pretrain_mod
from megavl.tasks.pretrain import ITC_TEACHER_PARTS, PretrainModule, first_epoch_steps

SMALL = ["model.vision.img_size=32", "data.image_size=32", "model.vision.patch_size=8", "model.vision.width=32",
         "model.vision.depth=1", "model.vision.heads=2", "model.text.width=32", "model.text.heads=2",
         "model.text.depth=1", "model.text.intermediate=64", "model.text.vocab_size=200",
         "model.fusion.width=32", "model.fusion.heads=2", "model.fusion.depth=1", "model.decoder.width=16",
         "model.decoder.heads=2", "model.embed_dim=16", "model.num_prototypes=24", "data.max_text_len=8"]


def _module(objectives: list[str], *overrides: str) -> PretrainModule:
    torch.manual_seed(0)
    cfg = load_config("configs/tiny.yaml", [*SMALL, *overrides])
    return PretrainModule(cfg.model, cfg.objectives, {"single": objectives, "two": objectives})


def _parts(teacher) -> set[str]:
    return {name for name, child in teacher.named_children() if child is not None}


@pytest.mark.parametrize("objectives, overrides, built", [
    (["itc"], [], {}),                                                   # in-batch ITC reads no teacher
    (["itc", "itm", "mlm"], [], {}),
    (["itc"], ["objectives.itc.queue_size=8"], {"itc_teacher.": set(ITC_TEACHER_PARTS)}),
    (["mim_pixel"], [], {"": {"vision", "text", "fusion"}}),             # text-guided masks: relevance
    (["mim_pixel"], ["objectives.masking.text_guided=false"], {}),
    (["scl"], ["objectives.masking.text_guided=false"], {}),
    (["mim_sem"], [], {"": {"vision", "text", "fusion", "prototype_head"}}),
    (["itc", "mim_sem"], ["objectives.itc.queue_size=8"],
     {"": {"vision", "text", "fusion", "prototype_head"}, "itc_teacher.": set(ITC_TEACHER_PARTS)}),
])
def test_teachers_are_built_only_for_their_readers(objectives, overrides, built):
    module = _module(objectives, *overrides)
    assert {prefix: _parts(t) for prefix, t in module.ema_teachers().items()} == built
    names = set(checkpoint._teacher_params(module))
    assert names == {p + n for p, t in module.ema_teachers().items() for n, _ in t.named_parameters()}
    assert all(not p.requires_grad for t in module.ema_teachers().values() for p in t.parameters())


def test_each_teacher_follows_its_own_schedule():
    module = _module(["itc", "mim_sem"], "objectives.itc.queue_size=8", "objectives.teacher.momentum=0.9",
                     "objectives.itc.momentum=0.8")
    with torch.no_grad():
        for p in module.student.parameters():
            p.add_(1.0)
    student = dict(module.student.named_parameters())
    key = "vision.patch_embed.proj.weight"
    before = {p: dict(t.named_parameters())[key].detach().clone() for p, t in module.ema_teachers().items()}
    scalars = module.update_teachers(3, 10)
    cosine = teacher_momentum(3, 10, 0.9, 1.0)
    assert scalars == {"train/teacher_momentum": pytest.approx(cosine), "train/itc_momentum": 0.8}
    assert 0.9 < cosine < 1.0
    for prefix, m in (("", cosine), ("itc_teacher.", 0.8)):
        got = dict(module.ema_teachers()[prefix].named_parameters())[key]
        torch.testing.assert_close(got, m * before[prefix] + (1 - m) * student[key].detach(), rtol=0, atol=1e-6)
    assert module.update_teachers(10, 10)["train/teacher_momentum"] == 1.0  # the cosine ends at 1
    assert module.update_teachers(10, 10)["train/itc_momentum"] == 0.8     # the queue's stays constant


def test_distillation_alpha_ramps_over_the_first_epoch(monkeypatch):
    assert [distill_alpha(0.4, s, 10, True) for s in (0, 5, 10, 25)] == pytest.approx([0.0, 0.2, 0.4, 0.4])
    assert distill_alpha(0.4, 0, 10, False) == 0.4
    assert first_epoch_steps(SimpleNamespace(plan=SimpleNamespace(epoch_length=1000)), 64) == 15

    module = _module(["itc"], "objectives.itc.queue_size=8", "objectives.itc.distill_alpha=0.4")
    seen = []
    real = pretrain_mod.itc_distill_loss
    monkeypatch.setattr(pretrain_mod, "itc_distill_loss", lambda *a, **k: seen.append(a[7]) or real(*a, **k))
    gen = torch.Generator().manual_seed(0)
    batch = {"images": torch.randn(2, 3, 32, 32, generator=gen), "input_ids": torch.randint(5, 200, (2, 8)),
             "attention_mask": torch.ones(2, 8, dtype=torch.long), "image_ids": torch.arange(2)}
    for step in (0, 2, 4, 9):
        assert module.set_step(step, 4) == {"train/itc_distill_alpha": pytest.approx(0.4 * min(1, step / 4))}
        module(batch, "two")
    assert seen == pytest.approx([0.0, 0.2, 0.4, 0.4])
    off = _module(["itc"], "objectives.itc.queue_size=8", "objectives.itc.distill_alpha=0.4",
                  "objectives.itc.alpha_warmup=false")
    assert off.set_step(0, 4)["train/itc_distill_alpha"] == 0.4


def test_a_one_teacher_checkpoint_resumes_into_two(tmp_path):
    """A run saved when one teacher served both readers resumes with both: SemMIM's teacher and the
    queue's momentum model start from that teacher (it filled the queue), with their fp32 masters."""
    old = _module(["itc", "mim_sem"], "objectives.itc.queue_size=8")
    teacher = make_teacher(old.student)  # the single teacher was a copy of the whole student
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.5)
    tensors = {f"teacher/{n}": p.detach().clone() for n, p in teacher.named_parameters()}
    tensors["master/vision.cls_token"] = torch.full_like(dict(teacher.named_parameters())["vision.cls_token"], 7.0)
    (tmp_path / checkpoint.MEGAVL).mkdir()
    save_file(tensors, str(tmp_path / checkpoint.MEGAVL / "state.safetensors"))
    new = _module(["itc", "mim_sem"], "objectives.itc.queue_size=8")
    checkpoint.load_module_state(new, tmp_path, rank=0, old_world=1)
    for prefix, t in new.ema_teachers().items():
        for name, p in t.named_parameters():
            torch.testing.assert_close(p, tensors[f"teacher/{name}"], rtol=0, atol=0, msg=prefix + name)
    assert set(new.teacher_master) == {"vision.cls_token", "itc_teacher.vision.cls_token"}

    missing = _module(["itc", "mim_sem"], "objectives.itc.queue_size=8")
    (tmp_path / "other" / checkpoint.MEGAVL).mkdir(parents=True)
    save_file({k: v for k, v in tensors.items() if "prototype_head" not in k},
              str(tmp_path / "other" / checkpoint.MEGAVL / "state.safetensors"))
    with pytest.raises(checkpoint.CheckpointError, match="prototype_head"):
        checkpoint.load_module_state(missing, tmp_path / "other", rank=0, old_world=1)
