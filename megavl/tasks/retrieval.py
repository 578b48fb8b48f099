"""Image-text and video-text retrieval fine-tuning (ALBEF `models/model_retrieval.py`, BLIP
negative_all_rank). Video (task.video_root set): MSRVTT-style `{"video", "caption"}` files, each
video a clip of data.num_frames frames (images (B, T, 3, S, S)); the losses and the evaluation are
the same, the clip embedding being the mean of the frame [CLS] tokens.

Batch: one caption per row (images, input_ids, attention_mask, image_index = which image of the
annotation set the caption describes). Losses over the GLOBAL batch (features gathered from all
ranks, so the loss does not depend on the world size):
  ITC  every caption of the same image is a positive: targets = same-image mask / its row sum
       (ALBEF's `idx` targets), symmetric soft cross-entropy with a learnable temperature;
  ITM  one hard negative text per image and one hard negative image per text, drawn from
       softmax(ITC similarity) over the global batch with same-image columns excluded.
Evaluation: megavl.tasks.retrieval_eval.retrieval_scores (ITC over all pairs, top-k re-scored by
ITM, sharded over ranks) and megavl.tasks.metrics.retrieval_metrics; the best checkpoint by r_mean.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from megavl.config import ModelConfig
from megavl.models.vlp import VLPModel
from megavl.objectives.distributed import gather_features
from megavl.objectives.itc import clamp_temperature_, itc_loss
from megavl.objectives.itm import itm_loss, sample_hard_negatives
from megavl.tasks.base import rank_world


def same_image_targets(index_rows: torch.Tensor, index_cols: torch.Tensor) -> torch.Tensor:
    """(R, C) rows summing to 1 over the columns that show the row's image."""
    pos = (index_rows[:, None] == index_cols[None, :]).float()
    return pos / pos.sum(dim=1, keepdim=True)


class RetrievalModule(nn.Module):
    def __init__(self, model_cfg: ModelConfig, temp_init: float = 0.07, itm_weight: float = 1.0,
                 mode: str = "two"):
        super().__init__()
        self.student = VLPModel(model_cfg)
        self.temp = nn.Parameter(torch.full((1,), float(temp_init)))  # (1,): see PretrainModule
        self.itm_weight, self.mode = itm_weight, mode

    def forward(self, batch: dict, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m, idx = self.student, batch["image_index"]
        with torch.no_grad():
            clamp_temperature_(self.temp)
        img = m.encode_image(batch["images"])
        txt = m.encode_text(batch["input_ids"], batch["attention_mask"])
        img_emb, txt_emb = m.image_embedding(img), m.text_embedding(txt)
        idx_all = gather_features(idx, with_grad=False)
        targets = same_image_targets(idx_all, idx_all)
        itc = itc_loss(gather_features(img_emb), gather_features(txt_emb), self.temp[0], targets)
        losses = {"itc": itc}
        if self.itm_weight > 0:
            losses["itm"] = self._itm(img, txt, img_emb, txt_emb, batch, idx_all, generator)
        total = itc + self.itm_weight * losses.get("itm", 0.0)
        return total, {k: v.detach() for k, v in losses.items()}

    def _itm(self, img, txt, img_emb, txt_emb, batch, idx_all, generator) -> torch.Tensor:
        rank, _ = rank_world()
        B, mask = img.shape[0], batch["attention_mask"]
        with torch.no_grad():
            sim = (gather_features(img_emb.detach(), with_grad=False)
                   @ gather_features(txt_emb.detach(), with_grad=False).t()) / self.temp.detach()
            neg_txt = sample_hard_negatives(sim, idx_all, idx_all, generator=generator)
            neg_img = sample_hard_negatives(sim.t(), idx_all, idx_all, generator=generator)
        mine = slice(rank * B, (rank + 1) * B)
        neg_txt, neg_img = neg_txt[mine].to(img.device), neg_img[mine].to(img.device)
        img_all, txt_all = gather_features(img), gather_features(txt)
        mask_all = gather_features(mask, with_grad=False)
        fused = self.student.fuse(torch.cat([img, img_all[neg_img], img]),
                                torch.cat([txt, txt, txt_all[neg_txt]]),
                                torch.cat([mask, mask, mask_all[neg_txt]]), self.mode)
        logits = self.student.itm_head(fused.image_global, fused.text_global)
        labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)])
        return itm_loss(logits, labels.to(img.device))


@torch.no_grad()
def evaluate(module: RetrievalModule, image_batches, text_batches, img2txt, txt2img, *, device,
             dtype, k: int, rerank: str, mode: str | None = None) -> dict:
    """TR/IR@1/5/10 and the r_means (percent) of one split; every rank returns the same dict.

    image_batches yield this rank's share {"images", "index"}; text_batches {"input_ids",
    "attention_mask", "index"} (the contract of eval12's retrieval_scores)."""
    from megavl.tasks.metrics import retrieval_metrics
    from megavl.tasks.retrieval_eval import retrieval_scores

    was_training = module.training
    module.eval()
    scores_i2t, scores_t2i = retrieval_scores(module.student, image_batches, text_batches,
                                              device=device, dtype=dtype, k=k,
                                              mode=mode or module.mode, rerank=rerank)
    module.train(was_training)
    return retrieval_metrics(scores_i2t, img2txt, txt2img, scores_t2i=scores_t2i)


# ------------------------------------------------------------------------------ engine parts
def _train_fields(item):
    path, text, image_index = item
    return [path], {"text": text, "image_index": image_index}


def _image_fields(path):
    return [path], {}


def _valid_rows(batches):
    """Drop the padding rows of eval batches: the contract wants this rank's share exactly once."""
    for batch in batches:
        keep = batch.pop("valid")
        if keep.any():
            yield {k: v[keep] if torch.is_tensor(v) else v for k, v in batch.items()}


def text_batches(texts: list[str], tokenizer, max_len: int, batch_size: int):
    """This rank's contiguous share of the texts, tokenised in batches {input_ids, attention_mask,
    index}."""
    import math

    rank, world = rank_world()
    per_rank = math.ceil(len(texts) / world)
    lo, hi = min(rank * per_rank, len(texts)), min((rank + 1) * per_rank, len(texts))
    for start in range(lo, hi, batch_size):
        stop = min(start + batch_size, hi)
        tokens = tokenizer(texts[start:stop], padding="max_length", truncation=True,
                           max_length=max_len, return_tensors="pt")
        yield {"input_ids": tokens["input_ids"].long(),
               "attention_mask": tokens["attention_mask"].long(),
               "index": torch.arange(start, stop)}


def build_parts(cfg, tokenizer, device, dtype, **_):
    from megavl.data.annotations import load_retrieval, load_video_retrieval
    from megavl.tasks.base import TaskParts, collators, loader, split_file

    t = cfg.task
    video = bool(t.video_root)
    read, root = (load_video_retrieval, t.video_root) if video else (load_retrieval, t.image_root)
    items = []
    offset = 0
    for path in t.train:  # several files: image indices kept distinct across files
        part = read(path, root)
        items += [(part.images[i], text, offset + i) for text, i in zip(part.texts, part.txt2img)]
        offset += len(part.images)
    module = RetrievalModule(cfg.model, cfg.objectives.itc.temp_init, t.itm_weight, t.fusion_mode)
    # a bad training item is replaced, not dropped: the losses gather equal shapes over ranks
    train_collate, eval_collate = collators(cfg, tokenizer, video, keep_batch_size=True)

    def evaluate_split(split: str) -> dict:
        ann = read(split_file(cfg, split), root)
        images = _valid_rows(loader(ann.images, _image_fields, eval_collate, cfg, train=False,
                                    video=video))
        texts = text_batches(ann.texts, tokenizer, cfg.data.max_text_len, cfg.data.batch_size)
        return evaluate(module, images, texts, ann.img2txt, ann.txt2img, device=device,
                        dtype=dtype, k=min(t.retrieval_k, len(ann.images), len(ann.texts)),
                        rerank=t.retrieval_rerank)

    return TaskParts(module=module, train_loader=loader(items, _train_fields, train_collate, cfg,
                                                        train=True, video=video),
                     evaluate=evaluate_split, best_metric="r_mean")
