"""Zero-shot image<->text retrieval on held-out shards: R@1/5/10 both ways, optional ITM re-ranking.

Under ZeRO-3 a forward pass is a collective (parameters are gathered from every rank), so EVERY rank
runs the same evaluation over the whole validation set; the numbers are identical on all ranks.
"""
from __future__ import annotations

import torch

from megavl.models.vlp import VLPModel


def recall_at_k(sim: torch.Tensor, image_ids: torch.Tensor, text_image_ids: torch.Tensor,
                ks: tuple[int, ...] = (1, 5, 10), sim_t2i: torch.Tensor | None = None) -> dict[str, float]:
    """sim (Ni, Nt): image-text scores; image_ids (Ni,) distinct; text_image_ids (Nt,) the image of
    each text. i2t hit@k: any of the top-k texts belongs to the image; t2i: its image is in the top-k.
    sim_t2i (Ni, Nt), when given, scores the t2i direction (ITM re-ranking scores each direction apart)."""
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
def embed_dataset(model: VLPModel, loader, device: torch.device, dtype: torch.dtype):
    """Unimodal tokens and ITC embeddings of every val sample; images deduplicated by image id."""
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
def evaluate_retrieval(model: VLPModel, loader, device: torch.device, dtype: torch.dtype = torch.float32,
                       itm_rerank_k: int = 0, mode: str = "two") -> dict[str, float]:
    """ITC similarity retrieval; with itm_rerank_k > 0 the top-k of each query are re-scored by the
    ITM head on fused pairs (ALBEF's k_test), in fusion `mode`."""
    was_training = model.training
    model.eval()
    try:
        image_ids, text_image_ids, img_emb, txt_emb, img_tok, txt_tok, txt_mask = embed_dataset(
            model, loader, device, dtype)
        sim = sim_t2i = img_emb @ txt_emb.t()
        if itm_rerank_k > 0:
            sim, sim_t2i = _itm_rerank(model, sim, img_tok, txt_tok, txt_mask, itm_rerank_k, mode)
        metrics = recall_at_k(sim.cpu(), image_ids.cpu(), text_image_ids.cpu(), sim_t2i=sim_t2i.cpu())
    finally:
        model.train(was_training)
    metrics["num_images"], metrics["num_texts"] = float(sim.shape[0]), float(sim.shape[1])
    return metrics


def _itm_rerank(model: VLPModel, sim, img_tok, txt_tok, txt_mask, k: int, mode: str):
    """(i2t, t2i) scores: the top-k of each row (i2t) / column (t2i) re-scored by the ITM head, the
    rest -inf."""
    k = min(k, sim.shape[0], sim.shape[1])

    def itm_scores(i_idx: torch.Tensor, t_idx: torch.Tensor) -> torch.Tensor:
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
