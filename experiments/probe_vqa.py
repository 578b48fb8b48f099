"""Why does (or doesn't) pre-training help shapes-VQA? A frozen-backbone probe, no fine-tuning budget.

    python bench/probe_vqa.py --export outputs/bench_finetune/pretrain100/export \
        --synth outputs/bench_finetune/shapes_downstream [--iters 300]

The fused pooled pair (the VQA head's input) of every train and minival question is computed once
with the backbone frozen, from the export and from random init (seed 0); the VQA head alone
(configs/finetune_vqa_tiny.yaml's MLP, BCE x num_answers on the soft targets) is then trained
full-batch with Adam on each. The minival accuracy (official metric) says whether the pre-trained
features carry the answers: if they do and fine-tuning does not show it, the fine-tuning budget
(steps, head lr) is what hides it, not the export.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def features(parts, items, eval_collate, cfg) -> torch.Tensor:
    """(N, 2W) pooled pairs of `items` in order (the backbone in eval mode)."""
    from megavl.tasks import vqa
    from megavl.tasks.base import loader, pooled_pair

    module = parts.module
    module.eval()
    out = torch.zeros(len(items), 2 * cfg.model.fusion.width)
    for batch in loader(items, vqa._eval_fields, eval_collate, cfg, train=False):
        pooled = pooled_pair(module.student, batch["images"], batch["input_ids"],
                             batch["attention_mask"], module.mode)
        for row, (index, valid) in enumerate(zip(batch["index"].tolist(), batch["valid"].tolist())):
            if valid:
                out[index] = pooled[row]
    return out


def probe(cfg, export: str, iters: int, lr: float) -> dict:
    from megavl.data.annotations import load_vqa
    from megavl.data.text import build_tokenizer
    from megavl.engine.task_init import read_init
    from megavl.tasks import vqa
    from megavl.tasks.base import collators, load_backbone

    torch.manual_seed(0)
    from megavl.tasks.task import TaskEnv

    parts = vqa.build(cfg, TaskEnv(torch.device("cpu"), torch.float32, 0, 1, {}))
    if export:
        state, source_cfg = read_init(export)
        load_backbone(parts.module.student, state, source_cfg, export)
    roots = {"vqa": cfg.task.image_root}
    train_items, _ = load_vqa(cfg.task.train, roots, need_answers=True)
    val_items, _ = load_vqa([cfg.task.val], roots, need_answers=True)
    _, eval_collate = collators(cfg, build_tokenizer(cfg.data.tokenizer))
    x_train, x_val = (features(parts, its, eval_collate, cfg) for its in (train_items, val_items))
    label_of = {a: i for i, a in enumerate(parts.module.answers)}
    target = torch.stack([vqa.soft_target(it.answers, label_of) for it in train_items])
    head = parts.module.head
    head.train()
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(iters):
        loss = F.binary_cross_entropy_with_logits(head(x_train), target) * target.shape[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        best = head(x_val).argmax(-1).tolist()
    predictions = {it.question_id: parts.module.answers[b] for it, b in zip(val_items, best)}
    return {"train_loss": round(loss.item(), 3), **vqa.evaluate(predictions, val_items)}


def main(argv: list[str] | None = None) -> int:
    from megavl.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export", required=True)
    parser.add_argument("--synth", required=True)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    synth = Path(args.synth).resolve()
    cfg = load_config(REPO / "configs/finetune_vqa_tiny.yaml",
                      [f"task.image_root={synth}", f"task.train=[{synth}/vqa_train.json]",
                       f"task.val={synth}/vqa_val.json", f"task.test={synth}/vqa_test.json"])
    torch.set_num_threads(1)
    result = {name: probe(cfg, init, args.iters, args.lr)
              for name, init in (("pretrained", args.export), ("random", ""))}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
