"""Task modules on the tiny model: VQA soft targets equal the official score, losses against slow
references, NLVR2's stacked pass equals two separate passes, retrieval's same-image ITC targets,
initial weights with resampled position embeddings, and a clear error on an architecture change."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from megavl.config import load_config
from megavl.data.annotations import VQAItem, load_vqa
from megavl.data.task_data import TaskCollator, TaskDataset, TaskLoader
from megavl.data.text import build_tokenizer
from megavl.data.transforms import eval_transform
from megavl.models.vlp import VLPModel
from megavl.tasks import nlvr2, retrieval, vqa
from megavl.tasks.base import architecture_mismatch, load_backbone
from megavl.tasks.metrics import vqa_score


@pytest.fixture(scope="module")
def cfg():
    return load_config("configs/tiny.yaml", ["data.max_text_len=16"])


def _text(B, L=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 1100, (B, L), generator=g)
    ids[:, 0] = 101
    mask = (torch.arange(L)[None] < torch.randint(4, L + 1, (B,), generator=g)[:, None]).long()
    return ids * mask, mask


def test_soft_target_is_the_official_score():
    answers = ["2", "2", "2", "two", "3", "3", "1", "2 shapes", "3", "yes"]
    vocab = ["2", "3", "1", "yes", "no", "2 shapes"]
    target = vqa.soft_target(answers, {a: i for i, a in enumerate(vocab)})
    for i, a in enumerate(vocab):  # "two" normalises to "2": four votes
        assert target[i].item() == pytest.approx(vqa_score(a, [vqa.normalize_answer(x) for x in answers]))
    assert target.tolist() == pytest.approx([1.0, 0.9, 0.3, 0.3, 0.0, 0.3])


def test_answer_vocab_counts_majorities():
    items = [VQAItem(i, "q", ["two"] * 6 + ["3"] * 4, "x") for i in range(9)]
    items += [VQAItem(100 + i, "q", ["red"] * 10, "x") for i in range(8)] + [VQAItem(999, "q", [], "x")]
    assert vqa.build_answer_vocab(items, min_count=9) == ["2"]
    assert vqa.build_answer_vocab(items, min_count=8) == ["2", "red"]
    with pytest.raises(ValueError, match="no answer"):
        vqa.build_answer_vocab(items, min_count=10)


def test_vqa_loss_is_bce_times_labels_and_learns(cfg):
    torch.manual_seed(0)
    module = vqa.VQAModule(cfg.model, ["yes", "no", "2"])
    ids, mask = _text(4)
    batch = {"images": torch.randn(4, 3, 64, 64), "input_ids": ids, "attention_mask": mask,
             "target": torch.tensor([[1, 0, 0], [0, .3, .6], [0, 0, 1.], [.9, 0, 0]])}
    loss, losses = module(batch)
    logits = module.logits(batch)
    ref = sum(-(t * F.logsigmoid(x) + (1 - t) * F.logsigmoid(-x)) for x, t in
              zip(logits.flatten(), batch["target"].flatten())) / 12 * 3
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)
    loss.backward()
    assert module.head[0].weight.grad.abs().sum() > 0
    assert module.student.vision.pos_embed.grad.abs().sum() > 0


def test_vqa_loss_and_its_targets_stay_fp32_in_a_bf16_run(cfg):
    from megavl.engine.step import to_device
    torch.manual_seed(0)
    module = vqa.VQAModule(cfg.model, ["yes", "no", "2"]).to(torch.bfloat16)
    ids, mask = _text(4)
    target = torch.tensor([[1, 0, 0], [0, .3, .6], [0, 0, 1.], [.9, .3, 0]])
    batch = to_device({"images": torch.randn(4, 3, 64, 64), "input_ids": ids, "attention_mask": mask,
                       "target": target}, torch.device("cpu"), torch.bfloat16)
    assert batch["images"].dtype == torch.bfloat16 and torch.equal(batch["target"], target)
    loss, _ = module(batch)
    x, t = module.logits(batch).double(), target.double()
    ref = -(t * F.logsigmoid(x) + (1 - t) * F.logsigmoid(-x)).mean() * 3
    assert loss.dtype == torch.float32
    # bf16 (rounded targets, a bf16 loss) is off by ~1e-3 relative; fp32 by ~1e-7
    torch.testing.assert_close(loss.double(), ref, rtol=2e-6, atol=0)


def test_nlvr2_stacked_pass_equals_two_passes(cfg):
    torch.manual_seed(0)
    module = nlvr2.NLVR2Module(cfg.model).eval()
    ids, mask = _text(3)
    images = torch.randn(3, 2, 3, 64, 64)
    batch = {"images": images, "input_ids": ids, "attention_mask": mask,
             "label": torch.tensor([1, 0, 1])}
    from megavl.tasks.base import pooled_pair
    left = pooled_pair(module.student, images[:, 0], ids, mask, "two")
    right = pooled_pair(module.student, images[:, 1], ids, mask, "two")
    torch.testing.assert_close(module.logits(batch), module.head(torch.cat([left, right], -1)),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="B, 2, 3"):
        module.logits({**batch, "images": images[:, 0]})
    module.train()
    loss, _ = module(batch)
    loss.backward()
    assert torch.isfinite(loss)


def test_retrieval_itc_targets_every_caption_of_the_image(cfg):
    idx = torch.tensor([0, 0, 1, 2, 2, 2])
    t = retrieval.same_image_targets(idx, idx)
    assert t[0].tolist() == [0.5, 0.5, 0, 0, 0, 0] and t[3, 3:].tolist() == pytest.approx([1 / 3] * 3)
    torch.manual_seed(0)
    module = retrieval.RetrievalModule(cfg.model)
    ids, mask = _text(6)
    batch = {"images": torch.randn(6, 3, 64, 64), "input_ids": ids, "attention_mask": mask,
             "image_index": idx}
    total, losses = module(batch, torch.Generator().manual_seed(0))
    # slow reference of the ITC part: soft cross-entropy row by row, both directions
    m = module.student
    img = m.image_embedding(m.encode_image(batch["images"]))
    txt = m.text_embedding(m.encode_text(ids, mask))
    s = img @ txt.t() / module.temp[0]
    i2t = sum(-(t[r] * F.log_softmax(s[r], 0)).sum() for r in range(6)) / 6
    t2i = sum(-(t[:, c] * F.log_softmax(s[:, c], 0)).sum() for c in range(6)) / 6
    torch.testing.assert_close(losses["itc"], (i2t + t2i).detach() / 2, rtol=1e-4, atol=1e-5)
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.student.itm_head.parameters())
    assert torch.isfinite(total) and set(losses) == {"itc", "itm"}


def test_backbone_init_resamples_position_embeddings_and_refuses_other_changes(cfg):
    torch.manual_seed(0)
    source = VLPModel(cfg.model)
    state = {f"student.{k}": v for k, v in source.state_dict().items()}
    target_cfg = copy.deepcopy(cfg.model)
    target_cfg.vision.img_size = 96  # 8x8 -> 12x12 patches
    target = VLPModel(target_cfg)
    load_backbone(target, state, cfg.model)
    assert target.vision.pos_embed.shape[1] == 1 + 144
    torch.testing.assert_close(target.vision.pos_embed[:, 0], source.vision.pos_embed[:, 0])
    torch.testing.assert_close(target.text.word_embeddings.weight, source.text.word_embeddings.weight)
    wider = copy.deepcopy(cfg.model)
    wider.fusion.depth = cfg.model.fusion.depth + 2
    change = f"fusion.depth: {cfg.model.fusion.depth} -> {wider.fusion.depth}"
    assert architecture_mismatch(cfg.model, wider) == [change]
    with pytest.raises(ValueError, match=change):
        load_backbone(VLPModel(wider), state, cfg.model)


@pytest.mark.slow
def test_vqa_predicts_and_writes_a_complete_result_file(cfg, tmp_path):
    out = tmp_path / "synth"
    script = os.path.join(os.path.dirname(sys.executable), "megavl-synth-downstream")
    subprocess.run([script, "--out", str(out), "--seed", "1", "--num-train", "4", "--num-eval",
                    "3", "--image-size", "64"], check=True, capture_output=True)
    test_items, _ = load_vqa([str(out / "vqa_test.json")], {"vqa": str(out)}, need_answers=False)
    val_items, _ = load_vqa([str(out / "vqa_val.json")], {"vqa": str(out)}, need_answers=True)
    vocab = vqa.build_answer_vocab(val_items, min_count=1)
    module = vqa.VQAModule(cfg.model, vocab)
    tok = build_tokenizer("")
    collate = TaskCollator(eval_transform(64), [0.5] * 3, [0.5] * 3, tok, 16, train=False,
                           image_size=64)
    fields = lambda it: ([it.image], {"text": it.question})
    for items in (test_items, val_items):
        loader = TaskLoader(TaskDataset(items, fields), collate, batch_size=4, rank=0, world=1,
                            train=False)
        preds = vqa.predict(module, loader, items, "cpu", torch.float32)
        assert set(preds) == {it.question_id for it in items}
    acc = vqa.evaluate(preds, val_items)
    assert 0 <= acc["overall"] <= 100 and "yes/no" in acc
    n = vqa.write_result_file(str(tmp_path / "result.json"), preds, val_items)
    result = json.load(open(tmp_path / "result.json"))
    assert n == len(result) == len(val_items) and set(result[0]) == {"question_id", "answer"}
    with pytest.raises(ValueError, match="no prediction"):
        vqa.write_result_file(str(tmp_path / "partial.json"), dict(list(preds.items())[1:]), val_items)
