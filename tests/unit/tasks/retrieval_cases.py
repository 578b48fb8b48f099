"""Shared inputs of the retrieval-evaluation tests (imported by the test and by its 2-rank worker):
the tiny recipe's student with seed-0 weights, a pair "loader" (several captions per image, one image
on both sides of the rank split), and a plain per-query evaluation (one ITM fusion call per query)
as the reference."""
from __future__ import annotations

from pathlib import Path

import torch

from megavl.config import OBJECTIVE_NAMES, load_config
from megavl.models.vlp import VLPModel

NUM_IMAGES, TEXT_LEN, K = 12, 16, 10  # K >= 10: R@10 never looks past the re-ranked top-k
REPO = Path(__file__).resolve().parents[3]


def tiny_config(*sets: str):
    return load_config(REPO / "configs/tiny.yaml", [f"data.max_text_len={TEXT_LEN}", "run.precision=fp32", *sets])


def tiny_student(cfg=None):
    from megavl.tasks.pretrain import PretrainModule

    torch.manual_seed(0)
    cfg = cfg or tiny_config()
    module = PretrainModule(cfg.model, cfg.objectives, {"single": list(OBJECTIVE_NAMES), "two": list(OBJECTIVE_NAMES)})
    return module


def pair_batches() -> list[dict]:
    """(image, caption) pair batches in val-loader form: 12 images with 1-4 captions each (29 texts),
    one batch per caption round (12, 10, 5, 2 pairs), so an image's captions are in different batches
    (an evaluation that collects images per batch would count such an image twice); image ids unsorted."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(NUM_IMAGES, 3, 64, 64, generator=g)
    image_ids = torch.tensor([37, 5, 12, 90, 41, 8, 66, 23, 70, 3, 55, 19])
    per_image = torch.tensor([1, 2, 4, 3, 2, 1, 3, 2, 4, 1, 3, 3])
    batches = []
    for caption_round in range(int(per_image.max())):
        r = torch.nonzero(per_image > caption_round).flatten()
        r = r[torch.randperm(len(r), generator=g)]
        n = len(r)
        ids = torch.randint(1000, 1100, (n, TEXT_LEN), generator=g)
        ids[:, 0] = 101
        mask = (torch.arange(TEXT_LEN)[None] < torch.randint(4, TEXT_LEN + 1, (n,), generator=g)[:, None]).long()
        batches.append({"images": images[r], "input_ids": ids * mask, "attention_mask": mask,
                        "image_ids": image_ids[r]})
    return batches


# ------------------------------------------- the reference: one query at a time, one ITM call per query
def recall_at_k(sim, image_ids, text_image_ids, ks=(1, 5, 10), sim_t2i=None):
    sim_t2i = sim if sim_t2i is None else sim_t2i
    positives = image_ids[:, None] == text_image_ids[None, :]  # (Ni, Nt)
    if not positives.any(dim=0).all():
        raise ValueError("some texts have no image among the evaluated images")
    out = {}
    for k in ks:
        top_texts = sim.topk(min(k, sim.shape[1]), dim=1).indices  # (Ni, k)
        out[f"i2t_r{k}"] = positives.gather(1, top_texts).any(dim=1).float().mean().item()
        top_images = sim_t2i.topk(min(k, sim.shape[0]), dim=0).indices  # (k, Nt)
        out[f"t2i_r{k}"] = positives.gather(0, top_images).any(dim=0).float().mean().item()
    return out


@torch.no_grad()
def embed_dataset(model: VLPModel, loader, device, dtype):
    image_ids, text_image_ids, img_emb, txt_emb, img_tok, txt_tok, txt_mask = [], [], [], [], [], [], []
    seen: set[int] = set()
    for batch in loader:
        images = batch["images"].to(device, dtype)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        i_tok, t_tok = model.encode_image(images), model.encode_text(ids, mask)
        txt_emb.append(model.text_embedding(t_tok).float())
        txt_tok.append(t_tok)
        txt_mask.append(mask)
        text_image_ids.append(batch["image_ids"])
        new = [i for i, iid in enumerate(batch["image_ids"].tolist()) if iid not in seen]
        seen.update(batch["image_ids"][new].tolist())
        if new:
            keep = torch.tensor(new, device=device)
            img_emb.append(model.image_embedding(i_tok[keep]).float())
            img_tok.append(i_tok[keep])
            image_ids.append(batch["image_ids"][new])
    return (torch.cat(image_ids), torch.cat(text_image_ids), torch.cat(img_emb), torch.cat(txt_emb),
            torch.cat(img_tok), torch.cat(txt_tok), torch.cat(txt_mask))


@torch.no_grad()
def reference_evaluate(model, loader, device, dtype=torch.float32, itm_rerank_k=0, mode="two"):
    """The reference evaluate_retrieval; also returns its score matrices, rows = images in first-seen order."""
    was_training = model.training
    model.eval()
    try:
        image_ids, text_image_ids, img_emb, txt_emb, img_tok, txt_tok, txt_mask = embed_dataset(
            model, loader, device, dtype)
        sim = sim_t2i = img_emb @ txt_emb.t()
        if itm_rerank_k > 0:
            sim, sim_t2i = reference_itm_rerank(model, sim, img_tok, txt_tok, txt_mask, itm_rerank_k, mode)
        metrics = recall_at_k(sim.cpu(), image_ids.cpu(), text_image_ids.cpu(), sim_t2i=sim_t2i.cpu())
    finally:
        model.train(was_training)
    metrics["num_images"], metrics["num_texts"] = float(sim.shape[0]), float(sim.shape[1])
    return metrics, sim, sim_t2i, image_ids


def reference_itm_rerank(model, sim, img_tok, txt_tok, txt_mask, k, mode):
    k = min(k, sim.shape[0], sim.shape[1])

    def itm_scores(i_idx, t_idx):
        fused = model.fuse(img_tok[i_idx], txt_tok[t_idx], txt_mask[t_idx], mode)
        logits = model.itm_head(fused.image_global, fused.text_global).float()
        return logits[:, 1] - logits[:, 0]

    i2t = torch.full_like(sim, float("-inf"))
    for i in range(sim.shape[0]):
        top = sim[i].topk(k).indices
        i2t[i, top] = itm_scores(torch.full_like(top, i), top)
    t2i = torch.full_like(sim, float("-inf"))
    for j in range(sim.shape[1]):
        top = sim[:, j].topk(k).indices
        t2i[top, j] = itm_scores(top, torch.full_like(top, j))
    return i2t, t2i


def dense_batches(pairs: list[dict]):
    """The same data as (image batches, text batches) with dense global indices: images numbered by
    ascending image id (the scorer's row order), texts by position."""
    all_ids = torch.cat([b["image_ids"] for b in pairs])
    order = torch.unique(all_ids)
    images, texts, seen, pos = [], [], set(), 0
    for b in pairs:
        keep = [r for r, i in enumerate(b["image_ids"].tolist()) if not (i in seen or seen.add(i))]
        keep = torch.tensor(keep, dtype=torch.long)
        images.append({"images": b["images"][keep],
                       "index": torch.searchsorted(order, b["image_ids"][keep])})
        n = len(b["image_ids"])
        texts.append({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
                      "index": torch.arange(pos, pos + n)})
        pos += n
    return images, texts


def clip_batches() -> tuple[list[dict], list[dict]]:
    """6 clips of 2 frames (one batch) and 6 captions, dense indices: for the rank that holds no clip."""
    g = torch.Generator().manual_seed(2)
    clips = torch.randn(6, 2, 3, 64, 64, generator=g)
    ids = torch.randint(1000, 2000, (6, TEXT_LEN), generator=g)
    ids[:, 0] = 101
    images = [{"images": clips, "index": torch.arange(6)}]
    texts = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "index": torch.arange(6)}]
    return images, texts
