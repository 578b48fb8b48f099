"""Image-text retrieval scores at evaluation scale: sharded embedding, ITC over all pairs, top-k ITM.

ALBEF/BLIP's protocol (`evaluation()` in their retrieval scripts), made to scale with the ranks:

1. every rank embeds ITS share of the images and texts (unimodal tokens kept in the compute dtype,
   ITC embeddings in fp32) and the shares are gathered, so every rank holds the whole set; the
   tokens once (row_blocks.py: each rank's block broadcast into a buffer of its size, never
   concatenated), so a rank's peak is one copy of all tokens;
2. ITC similarity over all pairs (N_img x N_txt), identical on every rank;
3. re-ranking: the top-k texts of every image and the top-k images of every text are re-scored by
   the ITM head on fused pairs. The queries are split over the ranks in EQUAL counts (the last
   rank's block is padded with repeats that are thrown away), and the k pairs of several queries go
   through one fusion call (`pair_batch` pairs per call), so every rank makes the same sequence of
   forward calls: under ZeRO-3 a forward is a collective. Scores outside a query's top-k are -100
   (ALBEF's convention); the per-rank blocks are all-gathered, so the result is identical on every rank.

Every loop that runs forward passes first agrees over the ranks whether any rank still has a batch;
a rank that has run out runs a one-sample dummy pass, for the same reason.
"""
from __future__ import annotations

import itertools
import math
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from megavl.models.vlp import VLPModel
from megavl.tasks.row_blocks import RowBlocks, _rank_world, gather_row_blocks

RERANK_CHOICES = ("none", "itm", "itm+itc")
MODE_CHOICES = ("single", "two")
NOT_RERANKED = -100.0  # ALBEF: score_matrix_i2t = torch.full(..., -100.0)


# ------------------------------------------------------------------------------ collectives
def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's (n_r, ...) tensor concatenated along dim 0 in rank order (n_r may differ; the
    trailing dims must agree)."""
    _, world = _rank_world()
    if world == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s) for s in sizes]
    padded = t.new_zeros((max(counts), *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def _any_rank(flag: bool, device: torch.device) -> bool:
    _, world = _rank_world()
    if world == 1:
        return flag
    t = torch.tensor([1 if flag else 0], device=device, dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _max_over_ranks(value: int, device: torch.device) -> int:
    _, world = _rank_world()
    if world == 1:
        return value
    t = torch.tensor([value], device=device, dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


# ------------------------------------------------------------------------------- embedding
def _next_nonempty(it: Iterator[dict]) -> dict | None:
    for batch in it:
        if len(batch["index"]) > 0:
            return batch
    return None


def _embed_images(model: VLPModel, batches: Iterable[dict], device, dtype):
    """-> (index (n,), tokens (n, 1+N, Wv) in dtype, embeddings (n, E) fp32) of this rank's share."""
    size = model.cfg.vision.img_size
    index, tokens, embeds = [], [], []
    shape_probe = None
    it = iter(batches)
    first = _next_nonempty(it)
    # the dummy pass of a rank without images must give the tokens of a real batch: clips (B, T, 3, S, S)
    # give 1 + T*N tokens, so the ranks agree on T first (0: this rank has no image at all)
    local_frames = 0 if first is None else (first["images"].shape[1] if first["images"].ndim == 5 else 1)
    frames = _max_over_ranks(local_frames, device)
    dummy_shape = (1, frames, 3, size, size) if frames > 1 else (1, 3, size, size)
    it = itertools.chain([first] if first is not None else [], it)
    while True:
        batch = _next_nonempty(it)
        if not _any_rank(batch is not None, device):
            break
        images = (batch["images"] if batch is not None else torch.zeros(dummy_shape)).to(device, dtype)
        tok = model.encode_image(images)
        emb = model.image_embedding(tok).float()
        if batch is None:  # keeps this rank in step with the others; only its shape is used
            shape_probe = tok[:0]
            continue
        index.append(torch.as_tensor(batch["index"], dtype=torch.long).to(device))
        tokens.append(tok)
        embeds.append(emb)
    if not tokens:
        if shape_probe is None:
            raise ValueError("retrieval_scores: no rank has any image")
        return (torch.zeros(0, dtype=torch.long, device=device), shape_probe,
                torch.zeros(0, model.cfg.embed_dim, device=device))
    return torch.cat(index), torch.cat(tokens), torch.cat(embeds)


def _embed_texts(model: VLPModel, batches: Iterable[dict], device, dtype):
    """-> (index (n,), tokens (n, L, Wt), masks (n, L), embeddings (n, E) fp32), L the longest text
    over all ranks. The batches' tokens are copied into one buffer as they are released, so this
    rank holds at most two copies of its own share."""
    index, tokens, masks, embeds = [], [], [], []
    width = tok_dtype = None
    it = iter(batches)
    while True:
        batch = _next_nonempty(it)
        if not _any_rank(batch is not None, device):
            break
        if batch is None:
            ids = torch.zeros(1, 1, dtype=torch.long, device=device)
            mask = torch.ones(1, 1, dtype=torch.long, device=device)
        else:
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        tok = model.encode_text(ids, mask)
        emb = model.text_embedding(tok).float()
        width, tok_dtype = tok.shape[-1], tok.dtype
        if batch is None:
            continue
        index.append(torch.as_tensor(batch["index"], dtype=torch.long).to(device))
        tokens.append(tok)
        masks.append(mask)
        embeds.append(emb)
    if width is None:
        raise ValueError("retrieval_scores: no rank has any text")
    length = _max_over_ranks(max([t.shape[1] for t in tokens], default=1), device)
    rows = sum(len(t) for t in tokens)
    all_tokens = torch.zeros(rows, length, width, device=device, dtype=tok_dtype)
    all_masks = torch.zeros(rows, length, dtype=torch.long, device=device)
    start = 0
    while tokens:
        tok, mask = tokens.pop(0), masks.pop(0)
        all_tokens[start:start + len(tok), :tok.shape[1]] = tok
        all_masks[start:start + len(tok), :mask.shape[1]] = mask
        start += len(tok)
    if not index:
        return (torch.zeros(0, dtype=torch.long, device=device), all_tokens, all_masks,
                torch.zeros(0, model.cfg.embed_dim, device=device))
    return torch.cat(index), all_tokens, all_masks, torch.cat(embeds)


def _gather_by_index(index: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every rank's rows of the (small) `tensors` as whole tensors, by ascending global index; an
    index that more than one rank holds (an image seen on both sides of a share boundary) is kept once."""
    unique, rows = gather_row_blocks(index, *tensors)
    return (unique, *rows.take(torch.arange(len(rows), device=index.device)))


# ------------------------------------------------------------------------------- re-ranking
def _itm_scores(model: VLPModel, images: RowBlocks, texts: RowBlocks, i_idx, t_idx, mode: str) -> torch.Tensor:
    """ITM match score (logit of 'match' minus logit of 'no match') of the pairs (i_idx[p], t_idx[p]);
    `images` holds the image tokens, `texts` the text tokens and masks."""
    (img_tok,) = images.take(i_idx)
    txt_tok, txt_mask = texts.take(t_idx)
    fused = model.fuse(img_tok, txt_tok, txt_mask, mode)
    logits = model.itm_head(fused.image_global, fused.text_global).float()
    return logits[:, 1] - logits[:, 0]


def _rerank(model: VLPModel, sim_rows: torch.Tensor, queries_are_images: bool, images: RowBlocks,
            texts: RowBlocks, k: int, mode: str, rerank: str, pair_batch: int) -> torch.Tensor:
    """Scores (Q_total, C) of the queries (rows of sim_rows): each row's top-k re-scored, the rest -100."""
    rank, world = _rank_world()
    num_queries, num_candidates = sim_rows.shape
    per_rank = math.ceil(num_queries / world)
    # this rank's block, padded with repeats of the last query so every rank makes the same calls
    queries = torch.arange(rank * per_rank, (rank + 1) * per_rank, device=sim_rows.device).clamp_(max=num_queries - 1)
    top_sim, top_idx = sim_rows[queries].topk(k, dim=1)  # (per_rank, k)
    scores = torch.empty_like(top_sim)
    queries_per_call = max(1, pair_batch // k)
    for start in range(0, per_rank, queries_per_call):
        q = queries[start:start + queries_per_call]
        cand = top_idx[start:start + queries_per_call]
        q_idx = q[:, None].expand_as(cand).reshape(-1)
        i_idx, t_idx = (q_idx, cand.reshape(-1)) if queries_are_images else (cand.reshape(-1), q_idx)
        scores[start:start + len(q)] = _itm_scores(model, images, texts, i_idx, t_idx, mode).view(len(q), k)
    if rerank == "itm+itc":  # BLIP: score + topk_sim
        scores += top_sim
    scores = all_gather_rows(scores)[:num_queries]
    top_idx = all_gather_rows(top_idx)[:num_queries]
    out = torch.full((num_queries, num_candidates), NOT_RERANKED, device=sim_rows.device)
    return out.scatter_(1, top_idx, scores)


# ------------------------------------------------------------------------------------ entry
@torch.no_grad()
def retrieval_scores(model: VLPModel, image_batches: Iterable[dict], text_batches: Iterable[dict], *,
                     device: torch.device, dtype: torch.dtype, k: int, mode: str, rerank: str = "itm",
                     pair_batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores_i2t (N_img, N_txt), scores_t2i (N_txt, N_img)), fp32 on CPU, identical on every rank.

    image_batches: THIS rank's share, dicts {"images": (B, 3, H, W), "index": (B,) global image index};
    text_batches: {"input_ids": (B, L), "attention_mask": (B, L), "index": (B,) global text index}.
    image_batches is consumed completely before text_batches is started (an adapter over a pair loader
    may cache the texts while it yields the images). Rows and columns follow ascending global index
    (dense indices 0..N-1 give row = index); an index held by several ranks counts once.
    rerank: "none" (ITC over all pairs), "itm" (ALBEF: the top-k re-scored by ITM, the rest -100) or
    "itm+itc" (BLIP: ITM score + ITC similarity on the top-k). mode: the fusion mode of the ITM pass.
    Every rank must call this at the same point (the forward passes are collectives under ZeRO-3).
    """
    if rerank not in RERANK_CHOICES:
        raise ValueError(f"rerank must be one of {RERANK_CHOICES}, got {rerank!r}")
    if mode not in MODE_CHOICES:
        raise ValueError(f"mode must be one of {MODE_CHOICES}, got {mode!r}")
    if rerank != "none" and k <= 0:
        raise ValueError(f"k must be positive to re-rank with {rerank!r}, got {k}")
    if pair_batch <= 0:
        raise ValueError(f"pair_batch must be positive, got {pair_batch}")
    was_training = model.training
    model.eval()
    try:
        img_index, img_tok, img_emb = _embed_images(model, image_batches, device, dtype)
        txt_index, txt_tok, txt_mask, txt_emb = _embed_texts(model, text_batches, device, dtype)
        if rerank == "none":  # the tokens are not needed: gather the small embeddings only
            _, img_emb = _gather_by_index(img_index, img_emb)
            _, txt_emb = _gather_by_index(txt_index, txt_emb)
            sim = img_emb @ txt_emb.t()
            return sim.cpu(), sim.t().contiguous().cpu()
        _, img_emb = _gather_by_index(img_index, img_emb)
        _, txt_emb = _gather_by_index(txt_index, txt_emb)
        _, images = gather_row_blocks(img_index, img_tok)
        _, texts = gather_row_blocks(txt_index, txt_tok, txt_mask)
        del img_tok, txt_tok, txt_mask  # the blocks hold this rank's rows; no second reference
        sim = img_emb @ txt_emb.t()
        k = min(k, sim.shape[0], sim.shape[1])
        i2t = _rerank(model, sim, True, images, texts, k, mode, rerank, pair_batch).cpu()  # off the device now
        t2i = _rerank(model, sim.t(), False, images, texts, k, mode, rerank, pair_batch)
        return i2t, t2i.cpu()
    finally:
        model.train(was_training)
