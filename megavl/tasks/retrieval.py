"""Image-text and video-text retrieval fine-tuning (ALBEF `models/model_retrieval.py`, BLIP
negative_all_rank). Video (task.video_root set): MSRVTT-style `{"video", "caption"}` files, each
video a clip of data.num_frames frames (images (B, T, 3, S, S)); the losses and the evaluation are
the same, the clip embedding being the mean of the frame [CLS] tokens.

Batch: one caption per row (images, input_ids, attention_mask, image_index = which image of the
annotation set the caption describes). Losses over the GLOBAL batch (features gathered from all
ranks, so the loss does not depend on the world size; each rank computes its own rows against the
gathered columns, and the mean over ranks is the global loss):
  ITC  every caption of the same image is a positive: targets = same-image mask / its row sum
       (ALBEF's `idx` targets), symmetric soft cross-entropy with a learnable temperature;
  ITM  one hard negative text per image and one hard negative image per text, drawn from
       softmax(ITC similarity) over the global batch with same-image columns excluded; only the
       picked rows' tokens cross ranks (objectives.itm.itm_pairs, shared with pre-training).
With task.itc_queue_size > 0 (ALBEF `model_retrieval.py`): an EMA teacher of the student
(objectives/teacher.py, momentum task.itc_momentum, on ZeRO-3 partitions; a copy of the initialised
student at step 0) gives momentum features; a queue of them with their image ids
(objectives/itc.py) extends the ITC bank, queue entries of the row's image being positives too, and
the targets mix in the teacher's softmax with weight alpha (objectives.itc.itc_distill_loss):
  alpha(step) = itc_distill_alpha * min(1, step / steps_per_epoch)  in the first epoch (ALBEF
  warm_up), itc_distill_alpha after. Teacher, its fp32 master and the queue are checkpointed.
Evaluation: megavl.tasks.retrieval_eval.retrieval_scores (ITC over all pairs, top-k re-scored by
ITM, sharded over ranks) and megavl.tasks.metrics.retrieval_metrics; the best checkpoint by r_mean.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from megavl.config import ModelConfig
from megavl.models.vlp import VLPModel
from megavl.objectives.distributed import gather_features, local_rows
from megavl.objectives.itc import (QUEUE_BUFFERS, TEMP_MAX, TEMP_MIN, clamp_temperature_,
                                   enqueue_momentum_features_, itc_distill_loss, itc_loss, register_itc_queue,
                                   same_image_targets)
from megavl.objectives.itm import itm_loss, itm_pairs
from megavl.objectives.teacher import distill_alpha, ema_update_, make_teacher
from megavl.objectives.temperature import clamp_trained_temperature_
from megavl.tasks.base import rank_world
from megavl.tasks.task import StepPlan, Task, TaskEnv

__all__ = ["RetrievalModule", "distill_alpha", "same_image_targets", "build", "evaluate"]


def _unimodal(model: VLPModel, batch: dict):
    """(image tokens (B, 1+N, Wv), text tokens (B, L, Wt), image and text embeddings (B, E)) of the
    student, or of the teacher for the momentum features."""
    img = model.encode_image(batch["images"])
    txt = model.encode_text(batch["input_ids"], batch["attention_mask"])
    return img, txt, model.image_embedding(img), model.text_embedding(txt)


class RetrievalModule(nn.Module):
    def __init__(self, model_cfg: ModelConfig, temp_init: float = 0.07, itm_weight: float = 1.0,
                 mode: str = "two", queue_size: int = 0, temp_bounds: tuple[float, float] = (TEMP_MIN, TEMP_MAX)):
        super().__init__()
        self.student = VLPModel(model_cfg)
        self.temp = nn.Parameter(torch.full((1,), float(temp_init)))  # (1,): see PretrainModule
        self.temp_bounds = temp_bounds
        self.itm_weight, self.mode, self.queue_size = itm_weight, mode, queue_size
        self.alpha = 0.0  # this step's distillation weight, set by before_step
        if queue_size > 0:
            # the whole VLPModel is mirrored (one module tree for DeepSpeed to partition alike); only
            # its unimodal encoders and projections run
            self.teacher = make_teacher(self.student)
            self.teacher.eval()
            self.teacher_master: dict[str, torch.Tensor] = {}  # fp32 EMA state of bf16 teacher shards
            register_itc_queue(self, queue_size, model_cfg.embed_dim)

    def train(self, mode: bool = True) -> "RetrievalModule":
        """The teacher stays in eval mode (its momentum features are not dropout draws)."""
        super().train(mode)
        if self.queue_size > 0:
            self.teacher.eval()
        return self

    @torch.no_grad()
    def clamp_temperature(self) -> None:
        """Clamp the temperature's optimizer master and working copies to its bounds; call on every
        rank right after each optimizer step (objectives/temperature.py: a clamp of the working copy
        alone is undone by the next step under ZeRO and bf16)."""
        clamp_trained_temperature_(self.temp, *self.temp_bounds)

    @torch.no_grad()
    def before_step(self, momentum: float, alpha: float) -> None:
        """teacher <- EMA(teacher, student) on this rank's shards (ALBEF's _momentum_update before the
        step's momentum features; momentum 0 copies the student), and this step's alpha."""
        ema_update_(self.teacher, self.student, momentum, master=self.teacher_master)
        self.alpha = alpha

    def forward(self, batch: dict, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        idx = batch["image_index"]
        with torch.no_grad():
            clamp_temperature_(self.temp, *self.temp_bounds)
        img, txt, img_emb, txt_emb = _unimodal(self.student, batch)
        idx_all = gather_features(idx, with_grad=False)
        if self.queue_size > 0:
            itc = self._itc_queue(batch, img_emb, txt_emb, idx_all)
        else:
            itc = itc_loss(gather_features(img_emb), gather_features(txt_emb), self.temp[0],
                           image_ids=idx_all, rows=local_rows(idx.shape[0]))
        losses = {"itc": itc}
        if self.itm_weight > 0:
            losses["itm"] = self._itm(img, txt, img_emb, txt_emb, batch, generator)
        total = itc + self.itm_weight * losses.get("itm", 0.0)
        return total, {k: v.detach() for k, v in losses.items()}

    def _itc_queue(self, batch, img_emb, txt_emb, idx_all) -> torch.Tensor:
        """ITC over [global batch ; queue] with momentum distillation; then enqueue the batch."""
        with torch.no_grad():
            _, _, img_m, txt_m = _unimodal(self.teacher, batch)
            img_m, txt_m = gather_features(img_m, with_grad=False), gather_features(txt_m, with_grad=False)
        loss = itc_distill_loss(img_emb, txt_emb, img_m, txt_m,
                                self.image_queue, self.text_queue, self.temp[0],
                                self.alpha, image_ids=idx_all, queue_ids=self.queue_image_ids,
                                rows=local_rows(img_emb.shape[0]))
        enqueue_momentum_features_(self, img_m, txt_m, idx_all)
        return loss

    def _itm(self, img, txt, img_emb, txt_emb, batch, generator) -> torch.Tensor:
        """ITM over [positives ; hard negatives from the global batch] (objectives.itm.itm_pairs: only
        the picked negative rows cross ranks)."""
        images, texts, masks, labels = itm_pairs(img, txt, batch["attention_mask"], batch["image_index"],
                                                 img_emb, txt_emb, self.temp, hard=True, generator=generator)
        fused = self.student.fuse(images, texts, masks, self.mode)
        return itm_loss(self.student.itm_head(fused.image_global, fused.text_global), labels)


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


def build(cfg, env: TaskEnv) -> Task:
    from megavl.data.annotations import load_retrieval, load_video_retrieval
    from megavl.data.text import build_tokenizer
    from megavl.tasks.base import collators, finetune_params, loader, split_file, student_loader, train_stream

    t, itc = cfg.task, cfg.objectives.itc
    video = bool(t.video_root)
    read, root = (load_video_retrieval, t.video_root) if video else (load_retrieval, t.image_root)
    items = []
    offset = 0
    for path in t.train:  # several files: image indices kept distinct across files
        part = read(path, root)
        items += [(part.images[i], text, offset + i) for text, i in zip(part.texts, part.txt2img)]
        offset += len(part.images)
    module = RetrievalModule(cfg.model, itc.temp_init, t.itm_weight, t.fusion_mode, t.itc_queue_size,
                             (itc.temp_min, itc.temp_max))
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    # a bad training item is replaced, not dropped: the losses gather equal shapes over ranks
    train_collate, eval_collate = collators(cfg, tokenizer, video, keep_batch_size=True)
    train_loader = train_stream(items, _train_fields, train_collate, cfg, video=video)

    def evaluate_split(split: str) -> dict:
        ann = read(split_file(cfg, split), root)
        images = _valid_rows(loader(ann.images, _image_fields, eval_collate, cfg, train=False,
                                    video=video))
        texts = text_batches(ann.texts, tokenizer, cfg.data.max_text_len, cfg.data.batch_size)
        return evaluate(module, images, texts, ann.img2txt, ann.txt2img, device=env.device,
                        dtype=env.dtype, k=min(t.retrieval_k, len(ann.images), len(ann.texts)),
                        rerank=t.retrieval_rerank)

    steps_per_epoch = max(1, train_loader.steps_per_epoch())

    def before_step(step: int) -> StepPlan:
        # step 0: the teacher becomes a copy of the initialised student (ALBEF copy_params)
        momentum = 0.0 if step == 0 else t.itc_momentum
        alpha = distill_alpha(t.itc_distill_alpha, step, steps_per_epoch, t.itc_alpha_warmup)
        module.before_step(momentum, alpha)
        return StepPlan(log_scalars={"train/teacher_momentum": momentum, "train/itc_distill_alpha": alpha})

    queue = t.itc_queue_size > 0
    return Task(name="retrieval", module=module, params=finetune_params(module), train_loader=train_loader,
                load_weights=student_loader(module), evaluate=evaluate_split, has_val=bool(t.val),
                has_test=bool(t.test), best_metric="r_mean", before_step=before_step if queue else None,
                after_optimizer_step=module.clamp_temperature,
                training_only=QUEUE_BUFFERS + ("teacher.",) if queue else ())
