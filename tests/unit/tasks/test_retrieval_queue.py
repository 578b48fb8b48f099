"""Retrieval fine-tuning with ALBEF's queue + momentum distillation (task.itc_queue_size > 0) on one
process: over several steps (the ring buffer wraps, images recur so queue entries are positives)
the module's ITC equals a float64 loop reference fed by the test's own queue, the teacher follows
the EMA of the student, and alpha follows ALBEF's first-epoch warm-up."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_objective_targets import ref_itc_distill_ids

from megavl.config import ConfigError, load_config
from megavl.objectives.itc import EMPTY_QUEUE_ID
from megavl.tasks import retrieval

B, Q = 4, 6  # 4 captions a step into 6 slots: the pointer wraps at step 2


@pytest.fixture(scope="module")
def cfg():
    return load_config("configs/tiny.yaml", ["data.max_text_len=16"])


def _batch(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(1000, 1100, (B, 16), generator=g)
    ids[:, 0] = 101
    mask = (torch.arange(16)[None] < torch.randint(4, 17, (B,), generator=g)[:, None]).long()
    # images 0..4 recur across steps, two captions of one image in every batch
    index = torch.tensor([step % 5, step % 5, (step + 1) % 5, (step + 3) % 5])
    return {"images": torch.randn(B, 3, 64, 64, generator=g), "input_ids": ids * mask,
            "attention_mask": mask, "image_index": index}


def _embeddings(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    img = model.image_embedding(model.encode_image(batch["images"]))
    txt = model.text_embedding(model.encode_text(batch["input_ids"], batch["attention_mask"]))
    return img.double(), txt.double()


@torch.no_grad()
def test_queue_distillation_loss_teacher_and_queue_against_reference(cfg):
    torch.manual_seed(0)
    module = retrieval.RetrievalModule(cfg.model, temp_init=0.1, itm_weight=0.0, queue_size=Q).eval()
    queue_img, queue_txt = module.image_queue.double().clone(), module.text_queue.double().clone()
    queue_ids, ptr = [EMPTY_QUEUE_ID] * Q, 0
    assert bool((module.queue_image_ids == EMPTY_QUEUE_ID).all())
    momentum = 0.9
    for step in range(4):
        before = {n: p.clone() for n, p in module.teacher.named_parameters()}
        alpha = retrieval.distill_alpha(0.4, step, steps_per_epoch=2, warmup=True)
        module.before_step(0.0 if step == 0 else momentum, alpha)
        m = 0.0 if step == 0 else momentum
        for name, s in module.student.named_parameters():
            expected = m * before[name] + (1 - m) * s
            torch.testing.assert_close(dict(module.teacher.named_parameters())[name], expected,
                                       rtol=1e-6, atol=1e-7)
        batch = _batch(step)
        img, txt = _embeddings(module.student, batch)
        img_m, txt_m = _embeddings(module.teacher, batch)
        ids = batch["image_index"].tolist()
        ref = ref_itc_distill_ids(img, txt, img_m, txt_m, queue_img, queue_txt, ids, queue_ids,
                                  module.temp.item(), alpha)
        _, losses = module(batch)
        assert losses["itc"].item() == pytest.approx(ref, abs=1e-5), step
        for row in range(B):  # the test's own ring buffer
            queue_img[ptr], queue_txt[ptr], queue_ids[ptr] = img_m[row], txt_m[row], ids[row]
            ptr = (ptr + 1) % Q
        torch.testing.assert_close(module.image_queue.double(), queue_img, rtol=0, atol=1e-6)
        assert module.queue_image_ids.tolist() == queue_ids and int(module.queue_ptr) == ptr
        for p in module.student.parameters():  # stands for an optimizer step: the EMA then matters
            p.add_(0.01 * torch.randn_like(p))
    # queue entries of the row's image are positives: with them ignored the loss differs
    no_ids = ref_itc_distill_ids(img, txt, img_m, txt_m, queue_img, queue_txt, ids,
                                 [EMPTY_QUEUE_ID] * Q, module.temp.item(), alpha)
    assert abs(no_ids - ref) > 1e-3


def test_alpha_warmup_is_albef_first_epoch_ramp():
    assert [retrieval.distill_alpha(0.4, s, 4, True) for s in range(6)] == pytest.approx(
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.4])
    assert retrieval.distill_alpha(0.4, 0, 4, False) == 0.4


def test_train_mode_keeps_teacher_in_eval(cfg):
    module = retrieval.RetrievalModule(cfg.model, queue_size=Q).train()
    assert module.student.training and not module.teacher.training
    assert not any(p.requires_grad for p in module.teacher.parameters())
    assert not hasattr(retrieval.RetrievalModule(cfg.model), "teacher")  # queue off: no teacher


def test_queue_options_are_validated():
    base = ["task.name=retrieval", "task.train=[x.json]"]
    with pytest.raises(ConfigError, match="task.itc_distill_alpha"):
        load_config("configs/tiny.yaml", base + ["task.itc_distill_alpha=0.4"])
    with pytest.raises(ConfigError, match="task.itc_momentum"):
        load_config("configs/tiny.yaml", base + ["task.itc_queue_size=8", "task.itc_momentum=1.5"])
    with pytest.raises(ConfigError, match="task.itc_queue_size"):
        load_config("configs/tiny.yaml", ["task.name=vqa", "task.train=[x.json]", "task.itc_queue_size=8"])
    cfg = load_config("configs/finetune_retrieval.yaml")
    assert (cfg.task.itc_queue_size, cfg.task.itc_distill_alpha, cfg.task.itc_momentum) == (65536, 0.4, 0.995)
    assert load_config("configs/finetune_retrieval_tiny.yaml").task.itc_queue_size == 0
