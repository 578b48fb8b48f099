"""FLIP patch dropout (model.vision.patch_dropout) on the pre-training unimodal pass.

The vision tower's calls are recorded by a forward hook: a training step encodes K = N/2 patches in
its unimodal pass and the MIM pass keeps its own mask; module.eval() and the plain model encode all.
"""
from __future__ import annotations

import torch

from megavl.config import load_config
from megavl.models.vlp import VLPModel
from megavl.objectives.masking import num_kept
from megavl.tasks.base import architecture_mismatch
from megavl.tasks.pretrain import PretrainModule

B, L, VOCAB = 3, 8, 200


def batch() -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (B, L), generator=gen)
    labels = torch.full((B, L), -100)
    labels[:, 2] = ids[:, 2]
    return {"images": torch.randn(B, 3, 64, 64, generator=gen), "input_ids": ids,
            "attention_mask": torch.ones(B, L, dtype=torch.long), "mlm_input_ids": ids.masked_fill(labels != -100, 2),
            "mlm_labels": labels, "image_ids": torch.arange(B)}


def module(objectives: list[str], dropout: float = 0.5) -> PretrainModule:
    cfg = load_config("configs/tiny.yaml", [f"model.vision.patch_dropout={dropout} model.attention=math",
                                            "objectives.masking.text_guided=false"])
    torch.manual_seed(0)
    return PretrainModule(cfg.model, cfg.objectives, {"single": objectives, "two": objectives})


def vision_token_counts(m: PretrainModule, mode: str = "two") -> list[int]:
    counts: list[int] = []
    hook = m.student.vision.register_forward_hook(lambda mod, args, out: counts.append(out.shape[1]))
    try:
        total, _ = m(batch(), mode, torch.Generator().manual_seed(1))
    finally:
        hook.remove()
    m.total = total
    return counts


def test_unimodal_pass_keeps_half_the_patches_and_mim_keeps_its_mask():
    m = module(["itc", "itm", "mim_pixel"])
    n = m.student.num_patches
    # the unimodal pass (1 + N/2 tokens, [CLS] first), then the masked-image pass at the MIM ratio
    assert vision_token_counts(m) == [1 + num_kept(n, 0.5), 1 + num_kept(n, 0.6)]
    keep = m._patch_dropout_keep(B, torch.device("cpu"), torch.Generator().manual_seed(2), 1)
    assert keep.shape == (B, n // 2) and len({tuple(row.tolist()) for row in keep}) == B  # random per sample
    assert bool((keep.diff(dim=1) > 0).all()) and 0 <= int(keep.min()) and int(keep.max()) < n
    vision = m.student.vision
    cls = vision.embed(batch()["images"], keep)[:, 0]
    assert torch.equal(cls, (vision.cls_token + vision.pos_embed[:, :1])[:, 0].expand(B, -1))  # [CLS] kept


def test_eval_and_the_plain_model_encode_every_patch():
    m = module(["itc", "itm"]).eval()
    n = m.student.num_patches
    assert vision_token_counts(m) == [1 + n]
    assert m._patch_dropout_keep(B, torch.device("cpu"), None, 1) is None
    # fine-tuning and evaluation call the model's passes, which take keep_ids only when told
    pretrained = load_config("configs/tiny.yaml", ["model.vision.patch_dropout=0.5"]).model
    model = VLPModel(pretrained).train()
    assert model.encode_image(batch()["images"]).shape[1] == 1 + n
    # a fine-tuning recipe without patch dropout starts from those weights; another layout does not
    assert architecture_mismatch(pretrained, load_config("configs/tiny.yaml").model) == []
    assert architecture_mismatch(pretrained, load_config("configs/tiny.yaml", ["model.layout=albef"]).model) == [
        "layout: 'stacked' -> 'albef'"]


def test_gradient_flows_through_the_kept_patches():
    m = module(["itc"])
    vision_token_counts(m)
    m.total.backward()
    vision = m.student.vision
    assert vision.patch_embed.proj.weight.grad.abs().sum() > 0
    assert vision.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    # position rows get gradient exactly where some sample kept the patch (the step's first draw)
    keep = m._patch_dropout_keep(B, torch.device("cpu"), torch.Generator().manual_seed(1), 1)
    used = torch.zeros(m.student.num_patches, dtype=torch.bool)
    used[keep.flatten()] = True
    assert torch.equal(vision.pos_embed.grad[0, 1:].abs().sum(-1) > 0, used) and not bool(used.all())
