"""Where does the motion get lost? Two probes on the synthetic twin clips of bench_video_retrieval.

    python bench/probe_video_motion.py --videos outputs/bench_video_retrieval/videos mlm --export EXPORT
    python bench/probe_video_motion.py --videos ... supervised [--steps 1500] [--attention scl|joint]
                                       [--temporal-init zero|random] [--temporal-lr-mult 10]

mlm: the export's MLM head predicts the masked motion word (left|right|up|down|grows|shrinks, 6-way)
from the fused clip, with the frames in order and reversed: equal accuracies = the fused tokens
carry no frame order.
supervised: a fresh tiny ViT (configs/tiny.yaml's vision tower at 32 px, 4 frames) + a linear head
trained to classify the motion from the clip [CLS], then val accuracy with the frames in order and
reversed: can the encoder learn the direction at all when told it? (50% = the axis known, the
direction guessed; reversed far below in-order = the order is used.) The temporal embedding trains at
lr x --temporal-lr-mult (the recipe's optim.temporal_lr_mult; 1 = the tower's rate).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
MOTION_WORDS = ["left", "right", "up", "down", "grows", "shrinks"]


def _data_config(videos: Path):
    from megavl.config import load_config

    cfg = load_config(REPO / "configs/tiny.yaml", ["model.vision.img_size=32", "data.image_size=32",
                                                   "model.vision.num_frames=4", "data.num_frames=4",
                                                   "data.num_workers=1"])
    cfg.data.train_shards = sorted(str(p) for p in videos.glob("train-*.tar"))
    cfg.data.val_shards = sorted(str(p) for p in videos.glob("val-*.tar"))
    return cfg


def _motion_ids(tokenizer) -> torch.Tensor:
    """The first word piece of each motion word ("shrinks" is "shrink ##s" in bert-base-uncased)."""
    pieces = [tokenizer.tokenize(w)[0] for w in MOTION_WORDS]
    if len(set(pieces)) != len(pieces):
        raise ValueError(f"motion words share a first word piece: {pieces}")
    return torch.tensor(tokenizer.convert_tokens_to_ids(pieces))


def _continuation_pieces(tokenizer) -> torch.Tensor:
    """(V,) bool: the vocabulary's "##" pieces, which continue the word before them."""
    return torch.tensor([t.startswith("##") for t in tokenizer.convert_ids_to_tokens(range(len(tokenizer)))])


def _word_positions(input_ids: torch.Tensor, ids: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the motion word's pieces, its "##" continuations too (they would give it away)."""
    where = torch.isin(input_ids, ids)
    while True:
        follows = torch.zeros_like(where)
        follows[:, 1:] = where[:, :-1] & continuation[input_ids[:, 1:]]
        if not (follows & ~where).any():
            return where
        where = where | follows


def motion_labels(input_ids: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B,) index of the caption's motion word in MOTION_WORDS (by its first piece), -100 without one."""
    labels = torch.full((len(input_ids),), -100)
    rows, cols = torch.isin(input_ids, ids).nonzero(as_tuple=True)
    labels[rows] = (input_ids[rows, cols, None] == ids).float().argmax(-1)
    return labels


@torch.no_grad()
def mlm_probe(export: Path, videos: Path) -> dict:
    from megavl import load_pretrained
    from megavl.data import build_eval_loader
    from megavl.data.text import build_tokenizer

    model = load_pretrained(export).eval()
    cfg = _data_config(videos)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    ids, continuation = _motion_ids(tokenizer), _continuation_pieces(tokenizer)
    result = {}
    for mode in ("two", "single"):
        hits, count = {"in_order": 0, "reversed": 0}, 0
        for batch in build_eval_loader(cfg.data, rank=0, world_size=1):
            first = torch.isin(batch["input_ids"], ids)
            target = batch["input_ids"][first]
            masked = batch["input_ids"].masked_fill(_word_positions(batch["input_ids"], ids, continuation),
                                                    tokenizer.mask_token_id)
            text = model.encode_text(masked, batch["attention_mask"])
            for key, clips in (("in_order", batch["images"]), ("reversed", batch["images"].flip(1))):
                fused = model.fuse(model.encode_image(clips), text, batch["attention_mask"], mode)
                picked = model.mlm_head(fused.text_states[first])[:, ids].argmax(-1)
                hits[key] += (ids[picked] == target).sum().item()
            count += len(target)
        result[mode] = {k: 100 * v / max(count, 1) for k, v in hits.items()} | {"words": count}
    return result


def supervised_probe(videos: Path, steps: int, attention: str, temporal_init: str,
                     temporal_lr_mult: float | None = None) -> dict:
    from megavl.data import build_eval_loader, build_train_loader
    from megavl.data.text import build_tokenizer
    from megavl.models.vision import VisionTransformer

    torch.manual_seed(0)
    cfg = _data_config(videos)
    v = cfg.model.vision
    ids = _motion_ids(build_tokenizer(cfg.data.tokenizer))
    vit = VisionTransformer(img_size=v.img_size, patch_size=v.patch_size, width=v.width, depth=v.depth,
                            heads=v.heads, mlp_ratio=v.mlp_ratio, num_frames=4)
    if temporal_init == "random":
        torch.nn.init.trunc_normal_(vit.temporal_embed, std=0.02)
    head = torch.nn.Linear(v.width, len(MOTION_WORDS))

    def clip_cls(clips: torch.Tensor) -> torch.Tensor:
        if attention == "scl":
            return vit(clips)[:, 0]
        x = vit.norm_pre(vit.embed(clips))  # joint: every token attends to the whole clip
        for block in vit.blocks:
            x = block(x, 1)
        frames = vit.norm(x).unflatten(1, (clips.shape[1], -1))
        return frames[:, :, 0].mean(1)

    mult = cfg.optim.temporal_lr_mult if temporal_lr_mult is None else temporal_lr_mult
    rest = [p for name, p in vit.named_parameters() if name != "temporal_embed"]
    opt = torch.optim.AdamW([{"params": [*rest, *head.parameters()]},
                             {"params": [vit.temporal_embed], "lr": cfg.optim.lr * mult, "weight_decay": 0.0}],
                            lr=cfg.optim.lr, weight_decay=0.02)
    loader = build_train_loader(cfg.data, rank=0, world_size=1, mlm_prob=0.0, scl_mask_prob=0.0,
                                global_batch_size=cfg.data.batch_size)
    for step, batch in enumerate(loader, 1):
        loss = F.cross_entropy(head(clip_cls(batch["images"])), motion_labels(batch["input_ids"], ids),
                               ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == steps:
            break
    vit.eval()
    hits, count = {"in_order": 0, "reversed": 0}, 0
    with torch.no_grad():
        for batch in build_eval_loader(cfg.data, rank=0, world_size=1):
            labels = motion_labels(batch["input_ids"], ids)
            known = labels >= 0
            for key, clips in (("in_order", batch["images"]), ("reversed", batch["images"].flip(1))):
                hits[key] += (head(clip_cls(clips)).argmax(-1)[known] == labels[known]).sum().item()
            count += known.sum().item()
    return {"val_accuracy": 100 * hits["in_order"] / max(count, 1),
            "val_accuracy_reversed": 100 * hits["reversed"] / max(count, 1), "clips": count,
            "temporal_lr_mult": mult, "final_loss": loss.item()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=Path, default=REPO / "outputs/bench_video_retrieval/videos")
    sub = parser.add_subparsers(dest="probe", required=True)
    mlm = sub.add_parser("mlm")
    mlm.add_argument("--export", type=Path, required=True)
    sup = sub.add_parser("supervised")
    sup.add_argument("--steps", type=int, default=1500)
    sup.add_argument("--attention", choices=("scl", "joint"), default="scl")
    sup.add_argument("--temporal-init", choices=("zero", "random"), default="zero")
    sup.add_argument("--temporal-lr-mult", type=float, default=None, help="default: the recipe's")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.probe == "mlm":
        print(mlm_probe(args.export, args.videos))
    else:
        print(supervised_probe(args.videos, args.steps, args.attention, args.temporal_init, args.temporal_lr_mult))
    return 0


if __name__ == "__main__":
    sys.exit(main())
