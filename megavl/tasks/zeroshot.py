"""Zero-shot image classification with the ITC towers (CLIP, Radford et al. 2021, section 3.1.4).

Each class is the mean of its prompts' normalised ITC text embeddings (one prompt per template,
its `{}` or `{c}` replaced by the class name), normalised again; an image is assigned the classes whose embeddings are
most similar to its ITC image embedding. The metrics are CLIP_benchmark's (acc1, acc5,
mean_per_class_recall, fractions) plus the recall of every class, and `clip_benchmark_result` writes
them in CLIP_benchmark's result JSON, so a megavl figure and one computed by `clip_benchmark` on the
OpenCLIP export of the same model sit side by side.

Under several ranks every rank scores its share of the images (the class embeddings are computed on
each rank: every rank makes the same forward calls, which ZeRO-3 needs) and the per-class counts are
summed; the result is the same on every rank.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

from megavl.data.classification import fill_template
from megavl.models.vlp import VLPModel
from megavl.tasks.retrieval_eval import _any_rank, _rank_world

TOPK = (1, 5)


@torch.no_grad()
def class_embeddings(model: VLPModel, tokenizer, classnames: list[str], templates: list[str], max_len: int,
                     device: torch.device, dtype: torch.dtype = torch.float32, batch_size: int = 256) -> torch.Tensor:
    """(C, E) fp32 unit vectors: per class, the normalised mean of its prompts' ITC text embeddings."""
    prompts = [fill_template(t, name) for name in classnames for t in templates]
    embeddings = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start:start + batch_size], padding="max_length", truncation=True,
                           max_length=max_len, return_tensors="pt")
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        embeddings.append(model.text_embedding(model.encode_text(ids, mask)).float())
    per_prompt_CTE = torch.cat(embeddings).view(len(classnames), len(templates), -1)
    return torch.nn.functional.normalize(per_prompt_CTE.mean(dim=1), dim=-1)


@torch.no_grad()
def classify(model: VLPModel, batches: Iterable[dict], classes_CE: torch.Tensor, device: torch.device,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(C, 1 + len(TOPK)) int64 counts summed over ranks: per true class, [images, top-1 hits, top-5 hits].

    batches: {"images": (B, 3, S, S), "labels": (B,)}. A rank whose share ran out keeps making the
    forward calls on a dummy batch while another rank still has images."""
    C = classes_CE.shape[0]
    counts = torch.zeros(C, 1 + len(TOPK), dtype=torch.long, device=device)
    iterator = iter(batches)
    dummy = None
    while True:
        batch = next(iterator, None)
        if not _any_rank(batch is not None, device):
            break
        if batch is None:
            images, labels = dummy, None
        else:
            images, labels = batch["images"].to(device, dtype), batch["labels"].to(device)
            dummy = images[:1]
        if images is None:  # this rank never had an image: its probe is one black image
            size = model.vision.img_size
            dummy = images = torch.zeros(1, 3, size[0], size[1], device=device, dtype=dtype)
        logits_BC = model.image_embedding(model.encode_image(images)).float() @ classes_CE.t()
        if labels is None:
            continue
        ranked_BK = logits_BC.topk(min(max(TOPK), C), dim=-1).indices
        hit_BK = ranked_BK == labels[:, None]
        counts[:, 0] += torch.bincount(labels, minlength=C)
        for column, k in enumerate(TOPK, start=1):
            counts[:, column] += torch.bincount(labels[hit_BK[:, :k].any(dim=-1)], minlength=C)
    if _rank_world()[1] > 1:
        dist.all_reduce(counts)
    return counts.cpu()


def zeroshot_metrics(counts: torch.Tensor, classnames: list[str]) -> dict:
    """CLIP_benchmark's metrics from `classify` counts: acc1, acc5 (None under 5 classes, as there),
    mean_per_class_recall over the classes that have images, and per_class_recall {name: recall}."""
    total = int(counts[:, 0].sum())
    if total == 0:
        raise ValueError("no image could be scored (every image skipped?)")
    present = counts[:, 0] > 0
    recall = counts[:, 1].double() / counts[:, 0].clamp(min=1).double()
    return {"acc1": float(counts[:, 1].sum()) / total,
            "acc5": float(counts[:, 2].sum()) / total if len(classnames) >= 5 else None,
            "mean_per_class_recall": float(recall[present].mean()),
            "per_class_recall": {name: float(r) for name, r, p in zip(classnames, recall, present) if p},
            "num_images": total}


def clip_benchmark_result(metrics: dict, dataset: str, model: str, pretrained: str, language: str = "en") -> dict:
    """The JSON CLIP_benchmark's `eval` writes for task zeroshot_classification."""
    return {"dataset": dataset, "model": model, "pretrained": pretrained, "task": "zeroshot_classification",
            "metrics": metrics, "language": language}
