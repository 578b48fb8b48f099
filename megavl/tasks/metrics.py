"""Metric functions of the downstream tasks, each tested against hand-computed cases.

Retrieval follows ALBEF's `itm_eval`: a query's rank is the rank of its best-ranked positive, and
R@k is the share of queries whose rank is < k, in percent.
"""
from __future__ import annotations

import torch

RETRIEVAL_KS = (1, 5, 10)


def _best_positive_ranks(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """scores (Q, C), positives (Q, C) bool with >= 1 True per row -> (Q,) rank of the best positive.

    rank = the number of negatives scored >= the best positive. Without ties this is ALBEF's argsort
    rank; on ties (e.g. the -100 of entries outside the re-ranked top-k) ALBEF's order is arbitrary,
    and here the tie counts against the query, so a result never depends on the sort's tie order.
    """
    best = scores.masked_fill(~positives, float("-inf")).amax(dim=1, keepdim=True)
    return ((scores >= best) & ~positives).sum(dim=1)


def _recalls(ranks: torch.Tensor) -> list[float]:
    return [100.0 * (ranks < k).float().mean().item() for k in RETRIEVAL_KS]


def retrieval_metrics(scores_i2t: torch.Tensor, img2txt: list[list[int]], txt2img: list[int],
                      scores_t2i: torch.Tensor | None = None) -> dict[str, float]:
    """Text retrieval (image queries) and image retrieval (text queries) recall, in percent.

    scores_i2t (N_images, N_texts); img2txt[i] the indices of image i's captions; txt2img[t] the
    image of text t; scores_t2i (N_texts, N_images) scores the text queries (ITM re-ranking scores
    each direction apart), default scores_i2t.T.
    Keys: tr1 tr5 tr10 ir1 ir5 ir10 txt_r_mean img_r_mean r_mean.
    """
    scores_i2t = scores_i2t.detach().float().cpu()
    scores_t2i = scores_i2t.t() if scores_t2i is None else scores_t2i.detach().float().cpu()
    n_img, n_txt = scores_i2t.shape
    if scores_t2i.shape != (n_txt, n_img):
        raise ValueError(f"scores_t2i has shape {tuple(scores_t2i.shape)}, expected ({n_txt}, {n_img})")
    if len(img2txt) != n_img or len(txt2img) != n_txt:
        raise ValueError(f"img2txt has {len(img2txt)} entries and txt2img {len(txt2img)} for scores of "
                         f"shape ({n_img}, {n_txt})")
    if any(len(texts) == 0 for texts in img2txt):
        raise ValueError("an image has no caption in img2txt: its rank is undefined")
    positives = torch.zeros(n_img, n_txt, dtype=torch.bool)
    rows = torch.tensor([i for i, texts in enumerate(img2txt) for _ in texts], dtype=torch.long)
    cols = torch.tensor([t for texts in img2txt for t in texts], dtype=torch.long)
    positives[rows, cols] = True
    txt_pos = torch.zeros(n_txt, n_img, dtype=torch.bool)
    txt_pos[torch.arange(n_txt), torch.as_tensor(txt2img, dtype=torch.long)] = True

    tr1, tr5, tr10 = _recalls(_best_positive_ranks(scores_i2t, positives))
    ir1, ir5, ir10 = _recalls(_best_positive_ranks(scores_t2i, txt_pos))
    txt_r_mean, img_r_mean = (tr1 + tr5 + tr10) / 3, (ir1 + ir5 + ir10) / 3
    return {"tr1": tr1, "tr5": tr5, "tr10": tr10, "ir1": ir1, "ir5": ir5, "ir10": ir10,
            "txt_r_mean": txt_r_mean, "img_r_mean": img_r_mean, "r_mean": (txt_r_mean + img_r_mean) / 2}
