"""Zero-shot image<->text retrieval on the held-out shards (and, where run.eval_zeroshot_* name a
class set, zero-shot classification): pre-training's evaluation (a thin caller).

The scoring is `megavl.tasks.retrieval_eval.retrieval_scores` (sharded over the ranks, batched ITM
re-ranking) and the metrics are `megavl.tasks.metrics.retrieval_metrics`, the same code the
fine-tuned retrieval task uses. Here the val loader yields (image, caption) PAIRS, each rank its own
share: `PairBatches` turns that into the image and text batches the scorer wants (an image counted
once per image id, texts indexed by (rank, position)). Every rank must call `evaluate_retrieval`
at the same step; the numbers are identical on all ranks.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from megavl.models.vlp import VLPModel
from megavl.tasks.metrics import RETRIEVAL_KS, retrieval_metrics
from megavl.tasks.retrieval_eval import _rank_world, all_gather_rows, retrieval_scores

_POSITION_BITS = 40  # text index = rank << 40 | position in the rank's share: unique, in global order


class PairBatches:
    """Images and texts of one pass over a rank's pair loader (images first, texts cached meanwhile)."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.rank = _rank_world()[0]
        self.text_batches: list[dict] = []
        self.text_image_ids: list[torch.Tensor] = []  # aligned with the text indices
        self.text_index: list[torch.Tensor] = []

    def images(self) -> Iterator[dict]:
        seen: set[int] = set()
        position = 0
        for batch in self.loader:
            image_ids = batch["image_ids"].long()
            index = (self.rank << _POSITION_BITS) + torch.arange(position, position + len(image_ids))
            position += len(image_ids)
            self.text_batches.append({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                                      "index": index})
            self.text_image_ids.append(image_ids)
            self.text_index.append(index)
            new = []
            for row, image_id in enumerate(image_ids.tolist()):
                if image_id not in seen:
                    seen.add(image_id)
                    new.append(row)
            keep = torch.tensor(new, dtype=torch.long)
            yield {"images": batch["images"][keep], "index": image_ids[keep]}

    def texts(self) -> Iterator[dict]:
        yield from self.text_batches

    def text_to_image_rows(self, device: torch.device) -> tuple[list[list[int]], list[int]]:
        """(img2txt, txt2img) in the scorer's row order: images by ascending id, texts by index."""
        pairs = torch.stack([torch.cat(self.text_index or [torch.zeros(0, dtype=torch.long)]),
                             torch.cat(self.text_image_ids or [torch.zeros(0, dtype=torch.long)])], dim=1)
        pairs = all_gather_rows(pairs.to(device)).cpu()
        pairs = pairs[pairs[:, 0].argsort()]
        image_ids = torch.unique(pairs[:, 1])
        txt2img = torch.searchsorted(image_ids, pairs[:, 1].contiguous()).tolist()
        img2txt: list[list[int]] = [[] for _ in range(len(image_ids))]
        for text, image in enumerate(txt2img):
            img2txt[image].append(text)
        return img2txt, txt2img


@torch.no_grad()
def evaluate_retrieval(model: VLPModel, loader, device: torch.device, dtype: torch.dtype = torch.float32,
                       itm_rerank_k: int = 0, mode: str = "two", rerank: str = "itm",
                       pair_batch: int = 512) -> dict[str, float]:
    """ITC retrieval over this rank's share of `loader` (all ranks together cover the val set); with
    itm_rerank_k > 0 each query's top-k re-scored by ITM (ALBEF's k_test) in fusion `mode`.

    Returns the ALBEF keys of `retrieval_metrics` (percent) plus the pre-training eval's own:
    i2t_r{1,5,10} / t2i_r{1,5,10} as fractions (the eval/* TensorBoard tags), num_images, num_texts."""
    pairs = PairBatches(loader)
    scores_i2t, scores_t2i = retrieval_scores(model, pairs.images(), pairs.texts(), device=device, dtype=dtype,
                                              k=itm_rerank_k, mode=mode,
                                              rerank=rerank if itm_rerank_k > 0 else "none",
                                              pair_batch=pair_batch)
    img2txt, txt2img = pairs.text_to_image_rows(device)
    metrics = retrieval_metrics(scores_i2t, img2txt, txt2img, scores_t2i)
    for k in RETRIEVAL_KS:
        metrics[f"i2t_r{k}"], metrics[f"t2i_r{k}"] = metrics[f"tr{k}"] / 100, metrics[f"ir{k}"] / 100
    metrics["num_images"], metrics["num_texts"] = float(scores_i2t.shape[0]), float(scores_i2t.shape[1])
    return metrics


def eval_fusion_mode(requested: str, cross_attention: bool, curriculum) -> str:
    """run.eval_mode -> the fusion mode of the ITM re-ranking. auto: the mode in which the curriculum
    trains the ITM head, two-stream when it does so in both (ALBEF/SemVLP's evaluation), and
    single-stream for a model without cross-attention."""
    if requested != "auto":
        return requested
    if not cross_attention:
        return "single"
    used = set(curriculum.epoch_modes) if curriculum.epoch_modes else {mode for mode, _ in curriculum.cycle}
    itm_modes = {m for m in used if "itm" in (curriculum.objectives_two if m == "two" else curriculum.objectives_single)}
    candidates = itm_modes or used
    return "two" if "two" in candidates else "single"


def zeroshot_evaluation(cfg, env) -> Callable[[VLPModel], dict]:
    """Zero-shot classification of run.eval_zeroshot_images, each rank scoring its share: {"zeroshot_top1",
    "zeroshot_top5" (top-5 counts as top-1 under 5 classes), "zeroshot_images", "zeroshot_skipped"}.
    The inputs are read (and a bad one reported, naming the file) at the first evaluation."""
    from megavl.data.classification import LabelledImages, image_folder_items, read_classnames, read_templates
    from megavl.data.text import build_tokenizer
    from megavl.errors import DataError
    from megavl.tasks.zeroshot import class_embeddings, classify, zeroshot_metrics

    run, data = cfg.run, cfg.data
    inputs: dict = {}

    def evaluate(model: VLPModel) -> dict:
        if not inputs:
            names = read_classnames(run.eval_zeroshot_classnames)
            folders, items = image_folder_items(run.eval_zeroshot_images)
            if len(folders) != len(names):
                raise DataError(f"run.eval_zeroshot_classnames: {len(names)} class names for {len(folders)} class "
                                f"folders under {run.eval_zeroshot_images}")
            inputs.update(names=names, items=items, templates=read_templates(run.eval_zeroshot_templates),
                          tokenizer=build_tokenizer(data.tokenizer))
        images = LabelledImages(image_size=cfg.model.vision.img_size, mean=data.mean, std=data.std,
                                batch_size=data.batch_size, max_pixels=data.max_image_pixels, rank=env.rank,
                                world=env.world_size, num_classes=len(inputs["names"]))
        classes = class_embeddings(model, inputs["tokenizer"], inputs["names"], inputs["templates"],
                                   data.max_text_len, env.device, env.dtype)
        counts = classify(model, images.from_folder(inputs["items"]), classes, env.device, env.dtype)
        metrics = zeroshot_metrics(counts, inputs["names"])
        skipped = torch.tensor([sum(images.skips.values())], device=env.device)
        if env.world_size > 1:
            torch.distributed.all_reduce(skipped)
        return {"zeroshot_top1": metrics["acc1"], "zeroshot_top5": metrics["acc5"] or metrics["acc1"],
                "zeroshot_images": float(metrics["num_images"]), "zeroshot_skipped": float(skipped.item())}

    return evaluate


def pretrain_evaluation(cfg, module, env) -> tuple[Callable[[str], dict | None], Callable[[str, dict, str], tuple[dict, str]]]:
    """(evaluate, report) of the pre-training Task: retrieval on data.val_shards, each rank embedding
    its share, and zero-shot classification where run.eval_zeroshot_images is set; the report keeps
    the eval/* tags and, at the end, the before -> after lines."""
    from megavl.data import build_eval_loader, size_val_shards

    run = cfg.run
    mode = eval_fusion_mode(run.eval_mode, cfg.model.fusion.cross_attention, cfg.curriculum)
    first: dict = {}
    val: list = []  # the val set, sized at the first evaluation and kept for the run
    zeroshot = zeroshot_evaluation(cfg, env) if run.eval_zeroshot_images else None

    def evaluate(split: str) -> dict:
        metrics: dict = {}
        if cfg.data.val_shards:
            if not val:
                val.append(size_val_shards(cfg.data, world_size=env.world_size))
            loader = build_eval_loader(cfg.data, rank=env.rank, world_size=env.world_size, val=val[0])
            metrics = evaluate_retrieval(module.student, loader, env.device, env.dtype,
                                         itm_rerank_k=run.eval_itm_rerank_k, mode=mode, rerank=run.eval_rerank,
                                         pair_batch=run.eval_pair_batch)
        if zeroshot is not None:
            metrics.update(zeroshot(module.student))
        return metrics

    def report(split: str, metrics: dict, when: str) -> tuple[dict, str]:
        if when == "start":
            first["metrics"] = metrics
        before = first.get("metrics")
        scalars, lines = {}, []
        if "zeroshot_top1" in metrics:
            scalars = {"eval/zeroshot_top1": metrics["zeroshot_top1"], "eval/zeroshot_top5": metrics["zeroshot_top5"]}
            lines.append(f"zero-shot classification top-1 {metrics['zeroshot_top1']:.3f} top-5 "
                         f"{metrics['zeroshot_top5']:.3f} ({int(metrics['zeroshot_images'])} images, "
                         f"{int(metrics['zeroshot_skipped'])} skipped)")
            if when == "end" and before is not None and "zeroshot_top1" in before:
                lines.append(f"zero-shot top-1 before -> after: {before['zeroshot_top1']:.3f} -> "
                             f"{metrics['zeroshot_top1']:.3f}")
        if "r_mean" not in metrics:
            return scalars, "\n".join(lines)
        retrieval_scalars, line = _retrieval_report(metrics, before, when)
        return {**retrieval_scalars, **scalars}, "\n".join([line, *lines])

    def _retrieval_report(metrics: dict, before: dict | None, when: str) -> tuple[dict, str]:
        scalars = {f"eval/{d}_r{k}": metrics[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RETRIEVAL_KS}
        scalars["eval/r_mean"] = metrics["r_mean"]
        chance = 1.0 / metrics["num_texts"]
        line = (f"retrieval i2t R@1 {metrics['i2t_r1']:.3f} t2i R@1 {metrics['t2i_r1']:.3f} (chance {chance:.4f}, "
                f"{int(metrics['num_images'])} images, ITM re-rank k={run.eval_itm_rerank_k} in {mode}-stream mode)")
        if when == "end" and before is not None and "i2t_r1" in before:
            line += (f"\nretrieval R@1 before -> after: i2t {before['i2t_r1']:.3f} -> {metrics['i2t_r1']:.3f}, "
                     f"t2i {before['t2i_r1']:.3f} -> {metrics['t2i_r1']:.3f}; chance {chance:.4f} "
                     f"(after = {metrics['i2t_r1'] / chance:.1f}x chance i2t, {metrics['t2i_r1'] / chance:.1f}x t2i)")
        return scalars, line

    return evaluate, report
