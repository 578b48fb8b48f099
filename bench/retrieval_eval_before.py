"""The gathering of retrieval evaluation's unimodal tokens as it was before row_blocks.py, for the
memory rows of bench_retrieval.py (--memory) only: each rank pads its text batches and concatenates
them, pads to the global length, then all-gathers every tensor into W padded buffers, concatenates
them and reorders the rows by index (three to four copies of the gathered tokens at the peak). The
re-rank that follows is megavl's own, on the same rows."""
from __future__ import annotations

import torch

from megavl.tasks import retrieval_eval
from megavl.tasks.retrieval_eval import _any_rank, _embed_images, _max_over_ranks, _next_nonempty, all_gather_rows
from megavl.tasks.row_blocks import RowBlocks


def _embed_texts_before(model, batches, device, dtype):
    index, tokens, masks, embeds = [], [], [], []
    width = None
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
        width = tok.shape[-1]
        if batch is None:
            continue
        index.append(torch.as_tensor(batch["index"], dtype=torch.long).to(device))
        tokens.append(tok)
        masks.append(mask)
        embeds.append(emb)
    length = max([t.shape[1] for t in tokens], default=1)
    tokens = [torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[1])) for t in tokens]
    masks = [torch.nn.functional.pad(m, (0, length - m.shape[1])) for m in masks]
    if not tokens:
        return (torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, 1, width, device=device, dtype=dtype),
                torch.zeros(0, 1, dtype=torch.long, device=device), torch.zeros(0, model.cfg.embed_dim, device=device))
    return torch.cat(index), torch.cat(tokens), torch.cat(masks), torch.cat(embeds)


def _gather_by_index_before(index, *tensors):
    index = all_gather_rows(index)
    gathered = [all_gather_rows(t) for t in tensors]
    unique, inverse = torch.unique(index, return_inverse=True)
    first = torch.full((len(unique),), len(index), dtype=torch.long, device=index.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(index), device=index.device), reduce="amin")
    return (unique, *(g[first] for g in gathered))


@torch.no_grad()
def gather_tokens_before(model, image_batches, text_batches, *, device, dtype):
    """Embedding and the gathering of the tokens alone, as retrieval_scores_before does them."""
    img_index, img_tok, _ = _embed_images(model, image_batches, device, dtype)
    txt_index, txt_tok, txt_mask, _ = _embed_texts_before(model, text_batches, device, dtype)
    length = _max_over_ranks(txt_tok.shape[1], device)
    txt_tok = torch.nn.functional.pad(txt_tok, (0, 0, 0, length - txt_tok.shape[1]))
    txt_mask = torch.nn.functional.pad(txt_mask, (0, length - txt_mask.shape[1]))
    return _gather_by_index_before(img_index, img_tok), _gather_by_index_before(txt_index, txt_tok, txt_mask)


@torch.no_grad()
def retrieval_scores_before(model, image_batches, text_batches, *, device, dtype, k: int, mode: str,
                            rerank: str = "itm", pair_batch: int = 512):
    """retrieval_scores with the earlier gathering (rerank "itm" or "itm+itc")."""
    model.eval()
    img_index, img_tok, img_emb = _embed_images(model, image_batches, device, dtype)
    txt_index, txt_tok, txt_mask, txt_emb = _embed_texts_before(model, text_batches, device, dtype)
    length = _max_over_ranks(txt_tok.shape[1], device)
    txt_tok = torch.nn.functional.pad(txt_tok, (0, 0, 0, length - txt_tok.shape[1]))
    txt_mask = torch.nn.functional.pad(txt_mask, (0, length - txt_mask.shape[1]))
    _, img_emb, img_tok = _gather_by_index_before(img_index, img_emb, img_tok)
    _, txt_emb, txt_tok, txt_mask = _gather_by_index_before(txt_index, txt_emb, txt_tok, txt_mask)
    sim = img_emb @ txt_emb.t()
    k = min(k, sim.shape[0], sim.shape[1])
    images, texts = RowBlocks.whole(img_tok), RowBlocks.whole(txt_tok, txt_mask)
    i2t = retrieval_eval._rerank(model, sim, True, images, texts, k, mode, rerank, pair_batch)
    t2i = retrieval_eval._rerank(model, sim.t(), False, images, texts, k, mode, rerank, pair_batch)
    return i2t.cpu(), t2i.cpu()
