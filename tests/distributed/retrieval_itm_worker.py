"""One rank of test_retrieval_itm_exchange.py: retrieval fine-tuning's ITM with the row exchange
(RetrievalModule._itm -> objectives.itm.itm_pairs) vs the all-gather version it replaced, kept here
verbatim as the slow reference; loss, every parameter's gradient, and the bytes each side moved.

Usage (env RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set): retrieval_itm_worker.py OUT_DIR
Writes OUT_DIR/rank{r}.json.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megavl.config import load_config
from megavl.objectives.distributed import gather_features, traffic
from megavl.objectives.itm import itm_loss, sample_hard_negatives
from megavl.tasks.retrieval import RetrievalModule, _unimodal

REPO = Path(__file__).resolve().parents[2]
B, L, SEED = 4, 12, 7


def reference_itm(module, img, txt, img_emb, txt_emb, batch, generator):
    """The pre-RowPlan RetrievalModule._itm: all-gather every rank's full token tensors with gradient,
    index the negatives. Also returns this rank's negative ids (neg_img, neg_txt) into the global batch."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mask = batch["attention_mask"]
    idx_all = gather_features(batch["image_index"], with_grad=False)
    with torch.no_grad():
        sim = (gather_features(img_emb.detach(), with_grad=False)
               @ gather_features(txt_emb.detach(), with_grad=False).t()) / module.temp.detach()
        draws = torch.rand(2, world * B, generator=generator)  # one uniform per global row, as itm_pairs
        neg_txt = sample_hard_negatives(sim, idx_all, idx_all, uniform=draws[0])
        neg_img = sample_hard_negatives(sim.t(), idx_all, idx_all, uniform=draws[1])
    mine = slice(rank * B, (rank + 1) * B)
    neg_txt, neg_img = neg_txt[mine], neg_img[mine]
    img_all, txt_all = gather_features(img), gather_features(txt)
    mask_all = gather_features(mask, with_grad=False)
    fused = module.student.fuse(torch.cat([img, img_all[neg_img], img]),
                                torch.cat([txt, txt, txt_all[neg_txt]]),
                                torch.cat([mask, mask, mask_all[neg_txt]]), module.mode)
    logits = module.student.itm_head(fused.image_global, fused.text_global)
    labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)])
    return itm_loss(logits, labels), neg_img, neg_txt


def _batch(rank: int, cfg) -> dict:
    g = torch.Generator().manual_seed(100 + rank)
    size = cfg.model.vision.img_size
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 5:] = 0  # ragged captions: the negatives' masks must travel with their tokens
    mask[3, 8:] = 0
    # image ids (rank*B + i + 1) // 2: two captions per image, image 2 on both ranks (excluded across ranks)
    return {"images": torch.randn(B, 3, size, size, generator=g, dtype=torch.float64),
            "input_ids": torch.randint(5, 100, (B, L), generator=g), "attention_mask": mask,
            "image_index": (torch.arange(B) + rank * B + 1) // 2}


def _loss_and_grads(module, batch, itm):
    """(loss, {name: grad}, bytes received by tag, bytes sent by tag, itm's output) of one ITM pass."""
    module.zero_grad(set_to_none=True)
    img, txt, img_emb, txt_emb = _unimodal(module.student, batch)
    traffic.reset()  # count the ITM's collectives only (forward and backward)
    out = itm(img, txt, img_emb, txt_emb, batch, torch.Generator().manual_seed(SEED))
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), grads, dict(traffic.received), dict(traffic.sent), out


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(REPO / "configs/tiny.yaml", [f"data.max_text_len={L}", "run.precision=fp32"])
    torch.manual_seed(0)  # the same weights on every rank
    module = RetrievalModule(cfg.model, temp_init=0.1).double().eval()  # eval: no dropout draws
    batch = _batch(rank, cfg)

    loss, grads, received, sent, _ = _loss_and_grads(module, batch, module._itm)
    ref_loss, ref_grads, ref_received, ref_sent, (_, neg_img, neg_txt) = _loss_and_grads(
        module, batch, lambda *a: reference_itm(module, *a))
    v = cfg.model.vision
    row_bytes = {"img": (1 + (v.img_size // v.patch_size) ** 2) * v.width * 8, "txt": L * cfg.model.text.width * 8}
    remote = {side: len({int(i) for i in ids if int(i) // B != rank}) for side, ids in
              (("img", neg_img), ("txt", neg_txt))}
    out = {"loss": float(loss), "ref_loss": float(ref_loss),
           "same_params": sorted(grads) == sorted(ref_grads),
           # relative to the largest gradient entry: some gradients are exactly zero in theory (key
           # biases: softmax is shift-invariant) and pure rounding noise in practice
           "grad_max_rel": max(float((grads[n] - ref_grads[n]).abs().max()) for n in ref_grads)
                           / max(float(g.abs().max()) for g in ref_grads.values()),
           "grad_norm": float(sum(g.pow(2).sum() for g in grads.values()).sqrt()),
           "received": received, "sent": sent, "ref_received": ref_received, "ref_sent": ref_sent,
           "expected_image_received": remote["img"] * row_bytes["img"],
           "expected_text_received": remote["txt"] * row_bytes["txt"],
           "remote_negatives": remote["img"] + remote["txt"], "row_bytes": row_bytes,
           # int64 image id + two float64 embeddings + the row's two picked negative ids (int64)
           "gathered_row_bytes": 8 + 2 * cfg.model.embed_dim * 8 + 2 * 8}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
