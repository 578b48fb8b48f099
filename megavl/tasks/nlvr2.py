"""NLVR2 the SCL/METER way (`compute_nlvr2`): the fusion runs once per image with the sentence;
the two pooled pairs (fused image [CLS] ++ text [CLS], 2W each) are concatenated (4W) into an MLP
(4W -> 2W -> 2) trained with cross-entropy. Both passes go through ONE fusion call over the
stacked [left ; right] batch. Metric: accuracy in percent (dev, test-P).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megavl.config import ModelConfig
from megavl.models.vlp import VLPModel
from megavl.tasks.base import eval_logits, gather_objects, mlp_head, pooled_pair
from megavl.tasks.task import Task, TaskEnv


class NLVR2Module(nn.Module):
    """forward(batch) -> (loss, {"nlvr2": loss}); batch: images (B, 2, 3, S, S), input_ids,
    attention_mask, label (B,) in {0, 1}."""

    def __init__(self, model_cfg: ModelConfig, mode: str = "two"):
        super().__init__()
        self.student = VLPModel(model_cfg)
        self.mode = mode
        width = model_cfg.fusion.width
        self.head = mlp_head(4 * width, 2 * width, 2)

    def logits(self, batch: dict) -> torch.Tensor:
        images = batch["images"]
        if images.dim() != 5 or images.shape[1] != 2:
            raise ValueError(f"NLVR2 needs images (B, 2, 3, S, S); got {tuple(images.shape)}")
        B = images.shape[0]
        stacked = torch.cat([images[:, 0], images[:, 1]])  # (2B, 3, S, S): left then right
        ids = batch["input_ids"].repeat(2, 1)
        mask = batch["attention_mask"].repeat(2, 1)
        pooled = pooled_pair(self.student, stacked, ids, mask, self.mode)
        return self.head(torch.cat([pooled[:B], pooled[B:]], dim=-1))

    def forward(self, batch: dict, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = F.cross_entropy(self.logits(batch).float(), batch["label"])
        return loss, {"nlvr2": loss.detach()}


@torch.no_grad()
def accuracy(module: NLVR2Module, loader, device, dtype) -> dict:
    """{"accuracy": percent, "count": n} over the loader's split, all ranks together."""
    local = []
    for batch, logits in eval_logits(module, loader, device, dtype):
        right = (logits.argmax(-1) == batch["label"]).tolist()
        local += [(i, r) for i, r, v in zip(batch["index"].tolist(), right,
                                            batch["valid"].tolist()) if v]
    scored = dict(gather_objects(local))  # index -> correct (each index once)
    if not scored:
        raise ValueError("NLVR2 evaluation saw no item")
    return {"accuracy": 100.0 * sum(scored.values()) / len(scored), "count": len(scored)}


def _fields(item):
    return [item.left, item.right], {"text": item.sentence, "label": item.label}


def build(cfg, env: TaskEnv) -> Task:
    from megavl.data.annotations import load_nlvr2
    from megavl.data.text import build_tokenizer
    from megavl.tasks.base import collators, finetune_params, loader, split_file, student_loader, train_stream

    t = cfg.task
    train_items = [it for path in t.train for it in load_nlvr2(path, t.image_root)[0]]
    module = NLVR2Module(cfg.model, t.fusion_mode)
    train_collate, eval_collate = collators(cfg, build_tokenizer(cfg.data.tokenizer))

    def evaluate_split(split: str) -> dict:
        items, _ = load_nlvr2(split_file(cfg, split), t.image_root)
        return accuracy(module, loader(items, _fields, eval_collate, cfg, train=False), env.device, env.dtype)

    return Task(name="nlvr2", module=module, params=finetune_params(module),
                train_loader=train_stream(train_items, _fields, train_collate, cfg),
                load_weights=student_loader(module), evaluate=evaluate_split, has_val=bool(t.val),
                has_test=bool(t.test), best_metric="accuracy")
