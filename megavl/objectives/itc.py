"""Image-text contrastive (ITC) losses: in-batch InfoNCE and ALBEF's queue + momentum distillation.

Shapes: B batch, E embedding width, Q queue length. Features are L2-normalised by the caller.
Clips of T frames: the image feature is the clip embedding, the projected clip [CLS] (mean of the
T frame [CLS] tokens, models/vision.py); the loss is the same, one row per clip.
Papers: CLIP (Radford et al. 2021); ALBEF (Li et al., NeurIPS 2021, salesforce/ALBEF
`models/model_pretrain.py`), whose learnable temperature is clamped to [0.001, 0.5].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

TEMP_MIN, TEMP_MAX = 0.001, 0.5


def _check_feats(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"{name_a} and {name_b} must be (B, E); got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} and {name_b} widths differ: {a.shape[1]} vs {b.shape[1]}")


def _check_temperature(temperature: float | torch.Tensor) -> None:
    # A tensor temperature is not read back to the host (that would sync every step); clamp it instead.
    if torch.is_tensor(temperature):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a scalar; got shape {tuple(temperature.shape)}")
    elif temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")


def _soft_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean_i -sum_j targets[i, j] log softmax(logits[i])_j."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def clamp_temperature_(temp: torch.Tensor, min_temp: float = TEMP_MIN, max_temp: float = TEMP_MAX) -> torch.Tensor:
    """Clamp a learnable temperature parameter in place (ALBEF: [0.001, 0.5]), outside autograd.

    Call it before the forward pass each step, as ALBEF does (`with torch.no_grad(): self.temp.clamp_(...)`).
    """
    if min_temp <= 0 or min_temp > max_temp:
        raise ValueError(f"need 0 < min_temp <= max_temp; got {min_temp}, {max_temp}")
    with torch.no_grad():
        temp.clamp_(min_temp, max_temp)
    return temp


def same_image_targets(ids_rows: torch.Tensor, ids_cols: torch.Tensor, dtype: torch.dtype = torch.float32
                       ) -> torch.Tensor:
    """ALBEF retrieval's `idx` targets: every column showing the row's image is a positive, equally weighted.

    ids_rows (B,), ids_cols (C,) integer image ids -> (B, C) with row b = (ids_cols == ids_rows[b]) / count.
    Each row must contain its own sample among the columns (the caller puts the batch first), so no row
    is empty. COCO/VG give 5+ captions per image: without this they would be each other's negatives.
    """
    if ids_rows.dim() != 1 or ids_cols.dim() != 1:
        raise ValueError(f"image ids must be 1-D; got {tuple(ids_rows.shape)} and {tuple(ids_cols.shape)}")
    pos = (ids_rows[:, None] == ids_cols[None, :]).to(dtype)
    return pos / pos.sum(dim=1, keepdim=True).clamp_min(1.0)


def _fp32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Logits and softmax in at least float32 (bf16 features otherwise lose the small logit gaps)."""
    return [t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors]


def _rows_of(rows: slice | None, n: int) -> slice:
    """`rows` checked against n gathered pairs; None is every row."""
    if rows is None:
        return slice(0, n)
    start, stop, step = rows.indices(n)
    if step != 1 or stop <= start or (rows.stop is not None and rows.stop > n):
        raise ValueError(f"rows must be a non-empty contiguous slice of the {n} gathered pairs; got {rows}")
    return slice(start, stop)


def itc_loss(img_feat: torch.Tensor, txt_feat: torch.Tensor, temperature: float | torch.Tensor,
             sim_targets: torch.Tensor | None = None, image_ids: torch.Tensor | None = None,
             rows: slice | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matched pairs, on the rows `rows` of the batch.

    img_feat (N, E), txt_feat (N, E): L2-normalised, row i of each is a matched pair (pass features
    already gathered across ranks for a global batch, with gradient). temperature: float or 0-dim
    tensor (learnable). sim_targets (N, N) optional soft targets for both directions (rows sum to 1;
    e.g. ALBEF momentum distillation); the t2i direction uses sim_targets.T. image_ids (N,) optional:
    captions of the same image are all positives (`same_image_targets`; exclusive with sim_targets).
    Default: identity.
    rows: the pairs whose two loss terms this call computes, B of the N (this rank's: `local_rows`);
    every pair is still a column. Default: all N.

        s_i2t = img[rows] @ txt.T / T,   s_t2i = txt[rows] @ img.T / T          (B, N)
        L = 1/2 [ mean_{i in rows} CE(s_i2t[i], y[i]) + mean_{j in rows} CE(s_t2i[j], y.T[j]) ]

    With rows, each rank holds B x N logits instead of N x N, and the mean over ranks of their losses
    is the loss over all N rows: with features gathered with gradient (`gather_features`), the
    gradients DeepSpeed averages over ranks are those of the global loss (OpenCLIP's
    `local_loss=True, gather_with_grad=True`). Computed in at least float32. Returns a scalar: the
    MEAN of the image-to-text and text-to-image losses over the rows.
    """
    _check_feats("img_feat", img_feat, "txt_feat", txt_feat)
    if img_feat.shape[0] != txt_feat.shape[0]:
        raise ValueError(f"itc_loss needs as many images as texts; got {img_feat.shape[0]} and {txt_feat.shape[0]}")
    _check_temperature(temperature)
    if sim_targets is not None and image_ids is not None:
        raise ValueError("pass sim_targets or image_ids, not both")
    N = img_feat.shape[0]
    rows = _rows_of(rows, N)
    whole = rows == slice(0, N)
    img_feat, txt_feat = _fp32(img_feat, txt_feat)
    if torch.is_tensor(temperature):
        temperature = temperature.to(img_feat.dtype)
    logits_i2t = img_feat[rows] @ txt_feat.t() / temperature  # (B, N)
    # All rows: one product serves both directions; otherwise each direction has its own B rows.
    logits_t2i = logits_i2t.t() if whole else txt_feat[rows] @ img_feat.t() / temperature
    if image_ids is not None:
        if image_ids.shape != (N,):
            raise ValueError(f"image_ids must be ({N},); got {tuple(image_ids.shape)}")
        # Symmetric (a caption's row and its image's column count the same positives), so y.T = y.
        targets = same_image_targets(image_ids[rows], image_ids, logits_i2t.dtype)
        return 0.5 * (_soft_ce(logits_i2t, targets) + _soft_ce(logits_t2i, targets))
    if sim_targets is None:
        labels = torch.arange(rows.start, rows.stop, device=img_feat.device)
        return 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))
    if sim_targets.shape != (N, N):
        raise ValueError(f"sim_targets must be ({N}, {N}); got {tuple(sim_targets.shape)}")
    sim_targets = sim_targets.to(logits_i2t.dtype)
    return 0.5 * (_soft_ce(logits_i2t, sim_targets[rows]) + _soft_ce(logits_t2i, sim_targets[:, rows].t()))


def itc_distill_loss(img_feat: torch.Tensor, txt_feat: torch.Tensor,
                     img_feat_m: torch.Tensor, txt_feat_m: torch.Tensor,
                     img_queue: torch.Tensor, txt_queue: torch.Tensor,
                     temperature: float | torch.Tensor, alpha: float,
                     image_ids: torch.Tensor | None = None, queue_ids: torch.Tensor | None = None,
                     rows: slice | None = None) -> torch.Tensor:
    """ALBEF ITC with a feature queue and momentum distillation, on the rows `rows` of the batch.

    img_feat, txt_feat (B, E): online features of the rows; img_feat_m, txt_feat_m (N, E): momentum-
    encoder features of the whole (gathered) batch, rows `rows` of which are the online rows' pairs
    (default: all, B = N); img_queue, txt_queue (Q, E): momentum features of earlier batches (ALBEF
    stores the queues as (E, Q); pass the transpose). All L2-normalised. alpha in [0, 1].
    image_ids (N,), queue_ids (Q,) optional, together: the ground truth is ALBEF retrieval's `idx` targets
    (every batch or queue entry showing the row's image is a positive, `same_image_targets`) instead of
    the one-hot [I_N | 0] rows. A queue slot never filled should carry an id no image has.

        img_all = [img_m ; img_queue]  (N+Q, E),   txt_all = [txt_m ; txt_queue]
        y_i2t = alpha * softmax(img_m[rows] @ txt_all.T / T) + (1 - alpha) * G[rows],  G = [I_N | 0] or idx targets
        y_t2i = alpha * softmax(txt_m[rows] @ img_all.T / T) + (1 - alpha) * G[rows]
        L = 1/2 [ -mean sum y_i2t log softmax(img @ txt_all.T / T)
                  -mean sum y_t2i log softmax(txt @ img_all.T / T) ]

    The columns carry no gradient, so the online features are only rows: each rank passes its own
    (no gather) and holds B x (N+Q) logits; the mean over ranks is the loss over all N rows, and
    DeepSpeed's average over ranks gives its gradient (ALBEF computes its rows the same way). Targets
    carry no gradient. Computed in at least float32. Queue updates (enqueue the gathered momentum
    features and ids) are the caller's job; the queues are copied into the columns here, so the
    caller may update them in place before the backward without cloning them. Returns a scalar.
    """
    _check_feats("img_feat", img_feat, "txt_feat", txt_feat)
    _check_feats("img_feat_m", img_feat_m, "txt_feat_m", txt_feat_m)
    N = img_feat_m.shape[0]
    rows = _rows_of(rows, N)
    B = rows.stop - rows.start
    for name, t in (("img_feat", img_feat), ("txt_feat", txt_feat)):
        if t.shape[0] != B:
            raise ValueError(f"{name} has {t.shape[0]} rows; rows {rows} of the momentum batch of {N} are {B}")
    if txt_feat_m.shape[0] != N:
        raise ValueError(f"txt_feat_m has {txt_feat_m.shape[0]} rows, img_feat_m has {N}")
    _check_feats("img_feat", img_feat, "img_feat_m", img_feat_m)
    _check_feats("img_feat", img_feat, "img_queue", img_queue)
    _check_feats("txt_feat", txt_feat, "txt_queue", txt_queue)
    if img_queue.shape[0] != txt_queue.shape[0]:
        raise ValueError(f"queues differ in length: {img_queue.shape[0]} vs {txt_queue.shape[0]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
    if (image_ids is None) != (queue_ids is None):
        raise ValueError("pass both image_ids and queue_ids, or neither")
    _check_temperature(temperature)
    img_feat, txt_feat, img_feat_m, txt_feat_m, img_queue, txt_queue = _fp32(
        img_feat, txt_feat, img_feat_m, txt_feat_m, img_queue, txt_queue)
    if torch.is_tensor(temperature):
        temperature = temperature.to(img_feat.dtype)
    with torch.no_grad():
        img_all = torch.cat([img_feat_m, img_queue], dim=0).detach()
        txt_all = torch.cat([txt_feat_m, txt_queue], dim=0).detach()
        if image_ids is not None:
            if image_ids.shape != (N,) or queue_ids.shape != (img_queue.shape[0],):
                raise ValueError(f"image_ids must be ({N},) and queue_ids ({img_queue.shape[0]},); got "
                                 f"{tuple(image_ids.shape)} and {tuple(queue_ids.shape)}")
            truth = same_image_targets(image_ids[rows], torch.cat([image_ids, queue_ids.to(image_ids.device)]),
                                       img_feat.dtype)
        else:
            truth = torch.zeros(B, img_all.shape[0], dtype=img_feat.dtype, device=img_feat.device)
            truth[:, rows] = torch.eye(B, dtype=img_feat.dtype, device=img_feat.device)
        targets_i2t = alpha * F.softmax(img_feat_m[rows] @ txt_all.t() / temperature, dim=1) + (1 - alpha) * truth
        targets_t2i = alpha * F.softmax(txt_feat_m[rows] @ img_all.t() / temperature, dim=1) + (1 - alpha) * truth
    loss_i2t = _soft_ce(img_feat @ txt_all.t() / temperature, targets_i2t)
    loss_t2i = _soft_ce(txt_feat @ img_all.t() / temperature, targets_t2i)
    return 0.5 * (loss_i2t + loss_t2i)


# ------------------------------------------------------------------- ALBEF's queue of momentum features
EMPTY_QUEUE_ID = torch.iinfo(torch.int64).min  # image id of a queue slot never filled: matches no image
QUEUE_BUFFERS = ("image_queue", "text_queue", "queue_image_ids", "queue_ptr")


def register_itc_queue(module: torch.nn.Module, queue_size: int, embed_dim: int) -> None:
    """Give `module` ALBEF's ITC queue as buffers: image_queue, text_queue (Q, E) random unit rows
    (ALBEF's start), queue_image_ids (Q,) the image id of each slot (EMPTY_QUEUE_ID until filled),
    queue_ptr () the next slot to write.

    Non-persistent: the queue is identical on every rank, and the training checkpoint saves every
    buffer once itself; in the module's state dict it would also go into each ZeRO-3 rank's model
    file (2 x 65,536 x 256 fp32 = 128 MiB per rank), and no export needs it."""
    normalize = torch.nn.functional.normalize
    module.register_buffer("image_queue", normalize(torch.randn(queue_size, embed_dim), dim=-1), persistent=False)
    module.register_buffer("text_queue", normalize(torch.randn(queue_size, embed_dim), dim=-1), persistent=False)
    module.register_buffer("queue_image_ids", torch.full((queue_size,), EMPTY_QUEUE_ID, dtype=torch.long),
                           persistent=False)
    module.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long), persistent=False)


@torch.no_grad()
def enqueue_momentum_features_(module: torch.nn.Module, img_m: torch.Tensor, txt_m: torch.Tensor,
                               image_ids: torch.Tensor) -> None:
    """Write the gathered momentum features (N, E) and their image ids (N,) into the ring buffer that
    `register_itc_queue` gave `module`, oldest slots first (identical on every rank)."""
    q, n = module.image_queue.shape[0], img_m.shape[0]
    if n > q:  # two rows would land in one slot: which write wins is undefined on CUDA (ranks could differ)
        raise ValueError(f"the ITC queue holds {q} entries, fewer than the gathered batch of {n} it must take "
                         "each step: raise objectives.itc.queue_size (pre-training) or task.itc_queue_size "
                         "(retrieval) to at least data.batch_size x world size")
    idx = (module.queue_ptr + torch.arange(n, device=img_m.device)) % q
    module.image_queue[idx] = img_m.to(module.image_queue.dtype)
    module.text_queue[idx] = txt_m.to(module.text_queue.dtype)
    module.queue_image_ids[idx] = image_ids.to(module.queue_image_ids.device)
    module.queue_ptr.copy_((module.queue_ptr + n) % q)
