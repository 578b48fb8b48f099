"""Image-text matching (ITM): negative sampling that never pairs an image with its own captions, and the loss.

Shapes: B rows (the anchors: images for image->text sampling, texts for text->image), C candidate
columns (possibly gathered across ranks, so C >= B). Paper: ALBEF (Li et al., NeurIPS 2021) draws one
hard negative per anchor with torch.multinomial over softmaxed ITC similarities; SCL (Ji et al.,
CVPR 2023) uses random negatives. We draw from the same distributions by inverting each row's
cumulative weights at one uniform per row, so that a row's draw does not depend on which rank holds it.

"Same image" is decided by image ids, not by the diagonal: datasets such as COCO have five captions
per image, and a caption of the same image is a positive, not a negative.

Clips of T frames: a pair is (clip, caption); the fusion sees the clip [CLS] and all T*N patch
tokens, the head reads the fused clip [CLS] and text [CLS]; negatives are other clips / captions.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .distributed import RowPlan, gather_features, is_distributed, local_rows


def _valid_columns(image_ids_rows: torch.Tensor, image_ids_cols: torch.Tensor) -> torch.Tensor:
    """(B, C) bool: True where column c shows a different image from row b. Raises if a row has none."""
    if image_ids_rows.dim() != 1 or image_ids_cols.dim() != 1:
        raise ValueError(f"image ids must be 1-D; got {tuple(image_ids_rows.shape)} and {tuple(image_ids_cols.shape)}")
    valid = image_ids_rows[:, None] != image_ids_cols[None, :]
    # A row without any negative would otherwise draw from an all-zero row (a column of no weight, or
    # with tiny smoothing weights a positive). On CUDA a device-side assert, so the step does not wait
    # on the device; on CPU a clear error naming the rows.
    stranded = ~valid.any(dim=1)
    if valid.is_cuda:
        torch._assert_async(~stranded.any(), "a row has no candidate with a different image id, so no ITM "
                                             "negative exists (batch of one image?)")
    elif bool(stranded.any()):
        rows = stranded.nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} have no candidate with a different image id; every candidate shows "
                         f"the same image, so no ITM negative exists (batch of one image?)")
    return valid


def _uniforms(n: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """n draws from U[0, 1) on the generator's device (a CPU generator gives the same draws for CUDA
    inputs), moved to `device`."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=gen_device).to(device)


def _draw_one(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One column per row of weights (B, C) >= 0, with probability weights[b, c] / sum_c weights[b],
    by inverting the row's cumulative sum at uniform (B,) in [0, 1) -> (B,) long.

    One uniform per row, so a row's draw depends only on its own weights and uniform: drawn for a
    global batch's rows on whichever rank holds them, it is the same draw. A column of weight zero is
    never returned (its cumulative sum equals its predecessor's); a uniform that rounds up to the
    row's total is held to the last column of positive weight."""
    cdf = weights.cumsum(dim=1)
    total = cdf[:, -1:].contiguous()
    picked = torch.searchsorted(cdf, uniform.to(cdf.dtype)[:, None] * total, right=True)
    last_positive = torch.searchsorted(cdf, total)
    return torch.minimum(picked, last_positive).squeeze(1)


def sample_hard_negatives(sim: torch.Tensor, image_ids_rows: torch.Tensor, image_ids_cols: torch.Tensor,
                          generator: torch.Generator | None = None, eps: float = 0.0,
                          uniform: torch.Tensor | None = None) -> torch.Tensor:
    """Draw one hard negative column per row, with probability softmax(sim[b]) over valid columns.

    sim (B, C): similarities (e.g. ITC logits img @ txt.T / T; pass sim.T with ids swapped for text->image).
    image_ids_rows (B,), image_ids_cols (C,): integer image ids; columns with the row's image id get
    weight ZERO, so a returned pair never shares the image.
    eps: added to every valid column's probability before sampling (ALBEF adds 1e-4; default 0 samples
    exactly softmax). A row with no valid column raises ValueError.
    uniform (B,) in [0, 1) optional: the rows' draws (`itm_pairs` draws them for the global batch so
    that a row's negative does not depend on the rank computing it); default drawn from generator.

        w[b, c] = softmax_c(sim[b, c] masked to -inf where ids equal) + eps * valid[b, c]
        neg_idx[b] = the c where the cumulative sum of w[b] / sum w[b] first exceeds uniform[b]

    Returns neg_idx (B,) long, indices into the C columns. No gradient flows (sampling is discrete).
    """
    if sim.dim() != 2 or sim.shape != (image_ids_rows.shape[0], image_ids_cols.shape[0]):
        raise ValueError(f"sim must be (B, C) = ({image_ids_rows.shape[0]}, {image_ids_cols.shape[0]}); "
                         f"got {tuple(sim.shape)}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0; got {eps}")
    valid = _valid_columns(image_ids_rows, image_ids_cols)
    if uniform is None:
        uniform = _uniforms(sim.shape[0], sim.device, generator)
    with torch.no_grad():
        # Mask BEFORE the softmax: masking after (as ALBEF does) can leave a row of all-underflowed
        # zeros when a same-image column dominates.
        logits = sim.detach().float().masked_fill(~valid, float("-inf"))
        weights = F.softmax(logits, dim=1) + eps * valid.float()
        return _draw_one(weights, uniform)


def sample_random_negatives(image_ids_rows: torch.Tensor, image_ids_cols: torch.Tensor,
                            generator: torch.Generator | None = None,
                            uniform: torch.Tensor | None = None) -> torch.Tensor:
    """Draw one negative column per row uniformly among columns showing a different image (SCL's ITM).

    image_ids_rows (B,), image_ids_cols (C,) -> neg_idx (B,) long. A row with no valid column raises
    ValueError. uniform (B,): the rows' draws, as in `sample_hard_negatives`.
    """
    valid = _valid_columns(image_ids_rows, image_ids_cols)
    if uniform is None:
        uniform = _uniforms(valid.shape[0], valid.device, generator)
    return _draw_one(valid.float(), uniform)


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary match / no-match cross-entropy: mean_n -log softmax(logits[n])[labels[n]].

    logits (N, 2) from the ITM head on [positives ; negatives]; labels (N,) long, 1 = matched, 0 = not.
    """
    if logits.dim() != 2 or logits.shape[1] != 2:
        raise ValueError(f"ITM logits must be (N, 2); got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must be ({logits.shape[0]},); got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32, torch.uint8, torch.bool):
        raise TypeError(f"labels must be integer class ids; got {labels.dtype}")
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels.long())


def itm_pairs(img: torch.Tensor, txt: torch.Tensor, text_mask: torch.Tensor, image_ids: torch.Tensor,
              img_emb: torch.Tensor, txt_emb: torch.Tensor, temp: torch.Tensor, *, hard: bool,
              generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ALBEF's ITM batch [positives ; (neg image, text) ; (image, neg text)] with negatives drawn
    from the GLOBAL batch, moving only the picked rows across ranks (pre-training and retrieval).

    img (B, Ni, Wv) image/clip tokens, txt (B, L, Wt) text tokens, text_mask (B, L), image_ids (B,)
    long, img_emb / txt_emb (B, E) ITC embeddings, temp (1,) ITC temperature; B equal on every rank.
    Each rank draws the negatives of its own rows against the gathered columns: with hard=True from
    its B x W*B similarities (img_emb @ txt_all.T / temp for its images' negative texts, txt_emb @
    img_all.T / temp for its texts' negative images), with hard=False uniformly (SCL). The uniforms
    are drawn for all W*B rows with a generator seeded alike on every rank (text negatives first,
    then image negatives) and each rank takes its rows', so the negatives do not depend on the world
    size. The picked ids are all-gathered, and a `RowPlan` moves the picked rows' tokens (one
    all_to_all, their gradients sent back in backward) instead of an all-gather of every rank's token
    tensors (whose backward all-reduces the whole gathered tensor). On an accelerator the plan uses
    fixed splits, so nothing waits for the device; on CPU, where the ids are already on the host,
    exact splits that move fewer rows.

    Returns images (3B, Ni, Wv), texts (3B, L, Wt), masks (3B, L) and labels (3B,) long (1 for the
    first B rows, 0 after) for fusion -> ITM head -> itm_loss.
    """
    B = img.shape[0]
    distributed = is_distributed()
    world = dist.get_world_size() if distributed else 1
    rows = local_rows(B)
    ids_all = gather_features(image_ids, with_grad=False)
    draws = _uniforms(2 * world * B, img.device, generator).view(2, world * B)[:, rows]
    if hard:
        img_rows, txt_rows = img_emb.detach(), txt_emb.detach()
        img_cols = gather_features(img_rows, with_grad=False)
        txt_cols = gather_features(txt_rows, with_grad=False)
        sim_i2t = img_rows @ txt_cols.t() / temp.detach()  # (B, W*B)
        # One process: the same matrix serves both directions.
        sim_t2i = sim_i2t.t() if not distributed else txt_rows @ img_cols.t() / temp.detach()
        neg_txt = sample_hard_negatives(sim_i2t, image_ids, ids_all, uniform=draws[0])
        neg_img = sample_hard_negatives(sim_t2i, image_ids, ids_all, uniform=draws[1])
    else:
        neg_txt = sample_random_negatives(image_ids, ids_all, uniform=draws[0])
        neg_img = sample_random_negatives(image_ids, ids_all, uniform=draws[1])
    if distributed:
        wanted = gather_features(torch.stack([neg_txt, neg_img]).t().contiguous(), with_grad=False)  # (W*B, 2)
        splits = "exact" if img.device.type == "cpu" else "fixed"
        txt_plan = RowPlan(wanted[:, 0].reshape(world, B), B, splits)
        img_plan = RowPlan(wanted[:, 1].reshape(world, B), B, splits)
        neg_img_tokens = img_plan.gather(img, "itm/image_tokens")
        neg_txt_tokens, neg_mask = txt_plan.gather(txt, "itm/text_tokens"), txt_plan.gather(text_mask, "itm/mask")
    else:
        neg_img_tokens, neg_txt_tokens, neg_mask = img[neg_img], txt[neg_txt], text_mask[neg_txt]
    labels = torch.cat([torch.ones(B, dtype=torch.long, device=img.device),
                        torch.zeros(2 * B, dtype=torch.long, device=img.device)])
    return (torch.cat([img, neg_img_tokens, img]), torch.cat([txt, txt, neg_txt_tokens]),
            torch.cat([text_mask, text_mask, neg_mask]), labels)
