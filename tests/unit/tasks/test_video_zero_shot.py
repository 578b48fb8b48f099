"""Zero-shot video retrieval as pre-training runs it (tasks/pretrain_eval.py over the video val shards):
the sharded, batched scores on clips equal a per-clip reference (each clip and caption encoded alone,
ITC similarities, top-k re-scored by ITM one pair at a time)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megavl.config import DataConfig, ModelConfig
from megavl.data import build_eval_loader
from megavl.data.writer import ShardWriter
from megavl.tasks.pretrain_eval import PairBatches, evaluate_retrieval
from megavl.models.vlp import VLPModel
from megavl.tasks.metrics import retrieval_metrics
from megavl.tasks.retrieval_eval import retrieval_scores
from megavl.tools.synth_videos import encode_mp4


@pytest.fixture
def shards(tmp_path) -> str:
    rng = np.random.default_rng(0)
    with ShardWriter(str(tmp_path), samples_per_shard=4, prefix="val-") as writer:
        for c in range(7):
            frames = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(6)]
            writer.write(f"clip{c}", {"mp4": encode_mp4(frames, crf=0), "txt": f"clip number {c} moves".encode(),
                                      "json": json.dumps({"image_id": c}).encode()})
    return f"{tmp_path}/val-{{000000..000001}}.tar"


def tiny_model() -> VLPModel:
    cfg = ModelConfig()
    cfg.vision.img_size, cfg.vision.patch_size, cfg.vision.width, cfg.vision.depth = 16, 8, 32, 1
    cfg.vision.heads, cfg.vision.num_frames = 2, 4
    cfg.text.width, cfg.text.depth, cfg.text.heads, cfg.text.intermediate, cfg.text.max_position = 32, 1, 2, 64, 16
    cfg.fusion.width, cfg.fusion.depth, cfg.fusion.heads = 32, 1, 2
    cfg.decoder.width, cfg.decoder.depth, cfg.decoder.heads = 16, 1, 2
    cfg.embed_dim = 16
    torch.manual_seed(0)
    model = VLPModel(cfg)
    with torch.no_grad():  # a non-zero temporal table: frame order changes the clip embedding
        model.vision.temporal_embed.normal_(std=0.5)
    return model.eval()


@torch.no_grad()
def reference(model: VLPModel, batches: list[dict], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores_i2t, scores_t2i) computed one clip, one caption, one pair at a time."""
    clips = torch.cat([b["images"] for b in batches])
    ids, mask = torch.cat([b["input_ids"] for b in batches]), torch.cat([b["attention_mask"] for b in batches])
    img = [model.encode_image(clips[i:i + 1]) for i in range(len(clips))]
    txt = [model.encode_text(ids[i:i + 1], mask[i:i + 1]) for i in range(len(ids))]
    sim = torch.stack([torch.cat([model.image_embedding(a) @ model.text_embedding(t).t() for t in txt], 1)[0]
                       for a in img])
    i2t = torch.full_like(sim, -100.0)
    t2i = torch.full_like(sim.t(), -100.0)
    for i in range(len(img)):
        for j in sim[i].topk(k).indices.tolist():
            logits = model.itm_head(*_fused(model, img[i], txt[j], mask[j:j + 1]))
            i2t[i, j] = logits[0, 1] - logits[0, 0]
    for j in range(len(txt)):
        for i in sim[:, j].topk(k).indices.tolist():
            logits = model.itm_head(*_fused(model, img[i], txt[j], mask[j:j + 1]))
            t2i[j, i] = logits[0, 1] - logits[0, 0]
    return i2t, t2i


def _fused(model, img, txt, mask):
    fused = model.fuse(img, txt, mask, "two")
    return fused.image_global, fused.text_global


def test_zero_shot_video_retrieval_equals_the_per_clip_reference(shards):
    cfg = DataConfig(val_shards=[shards], batch_size=3, num_workers=0, image_size=16, max_text_len=8,
                     num_frames=4)
    model = tiny_model()
    batches = list(build_eval_loader(cfg, rank=0, world_size=1))
    assert batches[0]["images"].shape[1:] == (4, 3, 16, 16)
    assert torch.cat([b["image_ids"] for b in batches]).tolist() == list(range(7))
    ref_i2t, ref_t2i = reference(model, batches, 3)
    pairs = PairBatches(build_eval_loader(cfg, rank=0, world_size=1))
    i2t, t2i = retrieval_scores(model, pairs.images(), pairs.texts(), device=torch.device("cpu"),
                                dtype=torch.float32, k=3, mode="two", pair_batch=4)
    assert torch.allclose(i2t, ref_i2t, atol=1e-5) and torch.allclose(t2i, ref_t2i, atol=1e-5)
    # the clips' frame order matters to these scores (so the check above sees the frames it should)
    reversed_i2t, _ = reference(model, [dict(b, images=b["images"].flip(1)) for b in batches], 3)
    assert (reversed_i2t - ref_i2t).abs().max() > 10 * 1e-5
    metrics = evaluate_retrieval(model, build_eval_loader(cfg, rank=0, world_size=1), torch.device("cpu"),
                                 itm_rerank_k=3, mode="two", pair_batch=4)
    expected = retrieval_metrics(ref_i2t, [[i] for i in range(7)], list(range(7)), ref_t2i)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key
    assert metrics["num_images"] == 7
