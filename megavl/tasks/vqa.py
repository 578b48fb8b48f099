"""VQA v2 as answer classification on the fused [CLS] pair (SCL/METER `compute_vqa`).

- Labels: the official-normalised answers whose count as a question's majority answer over the
  training annotations is >= min_count (ViLT/SCL: 9 -> 3,129 answers on train+val).
- Target of a question: per label, its count c among the 10 human answers (normalised) mapped to
  0, 0.3, 0.6, 0.9, 1.0 for c = 0, 1, 2, 3, >= 4 (exactly the official leave-one-out score).
- Loss: BCE-with-logits averaged over (B, C) elements, x C (SCL/METER's `* labels.shape[1]`), in fp32.
- Minival (task.minival_images with no task.val): every question of a seeded random set of VQA
  images is taken out of the train(+val+VG) pool, so no image is on both sides (VG questions of a
  held-out image leave training too); the vocabulary is built on what remains.
- Evaluation: argmax label -> answer string; the official accuracy (tasks/metrics.vqa_accuracy) on
  splits with answers, and the server result file [{"question_id", "answer"}] for all questions.
"""
from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F

from megavl.config import ModelConfig
from megavl.data.annotations import VQAItem, load_vqa
from megavl.models.vlp import VLPModel
from megavl.tasks.base import eval_logits, gather_objects, mlp_head, pooled_pair
from megavl.tasks.metrics import normalize_prediction, vqa_accuracy
from megavl.tasks.task import Task, TaskEnv

SOFT_SCORES = (0.0, 0.3, 0.6, 0.9, 1.0)
log = logging.getLogger(__name__)


def normalize_answer(answer: str) -> str:
    """The official normalisation of a prediction, applied to training answers so labels are in
    the form the evaluation compares."""
    return normalize_prediction(answer)


def build_answer_vocab(items: list[VQAItem], min_count: int = 9) -> list[str]:
    """Labels: majority answers (normalised) seen >= min_count times; by count, then name."""
    majority = Counter()
    for it in items:
        if it.answers:
            # most_common is stable: a tie goes to the answer written first
            majority[Counter(normalize_answer(a) for a in it.answers).most_common(1)[0][0]] += 1
    vocab = sorted((a for a, c in majority.items() if c >= min_count),
                   key=lambda a: (-majority[a], a))
    if not vocab:
        raise ValueError(f"no answer is the majority answer of >= {min_count} training questions")
    return vocab


def holdout_minival(items: list[VQAItem], num_images: int, seed: int
                    ) -> tuple[list[VQAItem], list[VQAItem], dict[str, int]]:
    """(train, minival, counts): the minival is every VQA question of `num_images` VQA images drawn
    with random.Random(seed) from the pool's sorted image paths (so it depends on the seed and the
    set of images, not on file order); train is every question, VQA or VG, of the other images.
    VG questions are matched by path only: a VG picture of the same COCO image (another file under
    task.vg_image_root) stays in train (VG annotations carry no COCO id here), as in ALBEF/BLIP,
    whose VG QA is simply appended to train. Raises ValueError when the pool has no more VQA images than `num_images` (train would keep none)."""
    images = sorted({it.image for it in items if it.source == "vqa"})
    if num_images >= len(images):
        raise ValueError(f"task.minival_images={num_images}: the training pool has only {len(images)} "
                         f"VQA images; holding that many out would leave no VQA image to train on")
    held = set(random.Random(seed).sample(images, num_images))
    minival = [it for it in items if it.image in held and it.source == "vqa"]
    train = [it for it in items if it.image not in held]
    counts = {"images": len(images), "minival_images": num_images, "minival_questions": len(minival),
              "train_questions": len(train), "dropped_vg_questions": len(items) - len(train) - len(minival)}
    return train, minival, counts


def soft_target(answers: list[str], label_of: dict[str, int]) -> torch.Tensor:
    """(C,) float32 soft scores of one question; answers outside the vocabulary add nothing."""
    target = torch.zeros(len(label_of))
    for answer, count in Counter(normalize_answer(a) for a in answers).items():
        if answer in label_of:
            target[label_of[answer]] = SOFT_SCORES[min(count, 4)]
    return target


class VQAModule(nn.Module):
    """forward(batch) -> (loss, {"vqa": loss}); batch: images, input_ids, attention_mask, target."""

    def __init__(self, model_cfg: ModelConfig, answers: list[str], mode: str = "two"):
        super().__init__()
        self.student = VLPModel(model_cfg)
        self.answers = list(answers)
        self.mode = mode
        width = model_cfg.fusion.width
        self.head = mlp_head(2 * width, 2 * width, len(answers))

    def logits(self, batch: dict) -> torch.Tensor:
        pooled = pooled_pair(self.student, batch["images"], batch["input_ids"],
                             batch["attention_mask"], self.mode)
        return self.head(pooled)

    def forward(self, batch: dict, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.logits(batch)
        # In float32 whatever the compute dtype: bf16 would round the soft targets (0.3 -> 0.3008)
        # and the loss summed over 3,129 labels.
        acc = torch.promote_types(logits.dtype, torch.float32)
        target = batch["target"].to(acc)
        loss = F.binary_cross_entropy_with_logits(logits.to(acc), target) * target.shape[1]
        return loss, {"vqa": loss.detach()}


@torch.no_grad()
def predict(module: VQAModule, loader, items: list[VQAItem], device, dtype) -> dict[int, str]:
    """{question_id: answer} for every item of the loader's split, gathered over all ranks."""
    local = []
    for batch, logits in eval_logits(module, loader, device, dtype):
        best = logits.argmax(dim=-1)
        for index, label, valid in zip(batch["index"].tolist(), best.tolist(),
                                       batch["valid"].tolist()):
            if valid:
                local.append((items[index].question_id, module.answers[label]))
    return dict(gather_objects(local))


def evaluate(predictions: dict[int, str], items: list[VQAItem]) -> dict:
    """Official accuracy over the items that have answers (percent, overall and per type)."""
    annotations = [{"question_id": it.question_id, "answer": it.answers,
                    **({"answer_type": it.answer_type} if it.answer_type else {})}
                   for it in items if it.answers]
    return vqa_accuracy(predictions, annotations)


def write_result_file(path: str, predictions: dict[int, str], items: list[VQAItem]) -> int:
    """The evaluation server's file; refuses to write a partial one (the server rejects it)."""
    missing = [it.question_id for it in items if it.question_id not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} questions have no prediction, e.g. {missing[:5]}")
    result = [{"question_id": it.question_id, "answer": predictions[it.question_id]}
              for it in items]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f)
    return len(result)


# ------------------------------------------------------------------------------ engine parts
def _train_fields(label_of: dict[str, int], item: VQAItem):
    return [item.image], {"text": item.question, "target": soft_target(item.answers, label_of)}


def _eval_fields(item: VQAItem):
    return [item.image], {"text": item.question}


def build(cfg, env: TaskEnv) -> Task:
    """VQA's Task; env.saved_state["answers"]: the vocabulary of the checkpoint being resumed or evaluated."""
    from functools import partial

    from megavl.data.text import build_tokenizer
    from megavl.tasks.base import (collators, finetune_params, loader, rank_world, split_file, student_loader,
                                   train_stream)

    t = cfg.task
    roots = {"vqa": t.image_root, **({"vg": t.vg_image_root} if t.vg_image_root else {})}
    train_items, _ = load_vqa(t.train, roots, need_answers=True)
    minival: list[VQAItem] | None = None
    if t.minival_images:
        train_items, minival, counts = holdout_minival(train_items, t.minival_images, cfg.run.seed)
        log.info("VQA minival held out of the training pool: %s", counts)
    answers = env.saved_state.get("answers")
    answers = list(answers) if answers else build_answer_vocab(train_items, t.min_answer_count)
    label_of = {a: i for i, a in enumerate(answers)}
    module = VQAModule(cfg.model, answers, t.fusion_mode)
    train_collate, eval_collate = collators(cfg, build_tokenizer(cfg.data.tokenizer))
    cache: dict[str, tuple[list[VQAItem], dict[int, str]]] = {}

    def evaluate_split(split: str) -> dict:
        if split == "val" and minival is not None:
            items = minival
        else:
            items, _ = load_vqa([split_file(cfg, split)], roots, need_answers=False)
        preds = predict(module, loader(items, _eval_fields, eval_collate, cfg, train=False),
                        items, env.device, env.dtype)
        cache[split] = (items, preds)
        metrics = {"questions": float(len(items))}
        if any(it.answers for it in items):
            metrics.update(evaluate(preds, items))
        return metrics

    def write_results(split: str, out_dir: str) -> list[str]:
        items, preds = cache[split]
        path = os.path.join(out_dir, f"vqa_result_{split}.json")
        if rank_world()[0] == 0:
            os.makedirs(out_dir, exist_ok=True)
            write_result_file(path, preds, items)
        return [path]

    return Task(name="vqa", module=module, params=finetune_params(module),
                train_loader=train_stream(train_items, partial(_train_fields, label_of), train_collate, cfg),
                load_weights=student_loader(module), evaluate=evaluate_split,
                has_val=bool(t.val) or minival is not None, has_test=bool(t.test), best_metric="overall",
                write_results=write_results, extra_state={"answers": answers})
