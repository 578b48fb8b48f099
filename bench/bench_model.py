"""Model-level figures: masked encoding, attention backends, FLOP accounting.

  masked encoding  ViT forward+backward on 25% of the patches (keep_ids) vs all of them.
  attention        megavl's chosen kernel vs its reference at ViT-B and BERT-base shapes, fwd+bwd:
                   sdpa vs math everywhere, flash vs sdpa on CUDA (bf16): flash's dense kernel for the
                   unmasked ViT shape, its varlen kernel for the padded BERT shapes.
  FLOP accounting  engine.flops.step_flops vs torch's FlopCounterMode on the same PretrainModule step
                   (attention "math" so the counter sees the attention matmuls).

Legend: B batch, H heads, L query length, S key length, D head width, N patches, K kept patches.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from megavl.config import load_config
from megavl.tasks.curriculum import objectives_by_mode
from megavl.tasks.pretrain_flops import step_flops
from megavl.models.attention import attention
from megavl.models.vision import VisionTransformer
from megavl.objectives.masking import num_kept
from megavl.tasks.pretrain import PretrainModule

from harness import RECIPES, Row, interleaved_median, synthetic_batch


# ----------------------------------------------------------------------------------- masked encoding
def masked_encoding(device: torch.device, quick: bool) -> list[Row]:
    """ViT-B/16 at 224 px (quick: a 2-block, 96-wide ViT at 224 px, same N) with 75% of patches dropped."""
    if quick:
        geometry, batch, reps = dict(width=96, depth=2, heads=3), 2, 2
        case = "ViT 224/16 w96 d2"
    else:
        geometry, batch, reps = dict(width=768, depth=12, heads=12), (2 if device.type == "cpu" else 64), \
            (3 if device.type == "cpu" else 10)
        case = "ViT-B/16 224"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = VisionTransformer(img_size=224, patch_size=16, **geometry).to(device, dtype)
    n = model.num_patches
    k = num_kept(n, 0.75)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 224, 224, generator=gen).to(device, dtype)
    keep_ids = torch.rand(batch, n, generator=gen).argsort(dim=1)[:, :k].sort(dim=1).values.to(device)

    def step(keep: torch.Tensor | None):
        def run() -> None:
            model(images, keep).float().mean().backward()
            model.zero_grad(set_to_none=True)
        return run

    t = interleaved_median({"masked": step(keep_ids), "full": step(None)}, device, reps)
    return [Row("masked encoding", f"{case}, B={batch}, keep {k}/{n}", "fwd+bwd ms",
                t["masked"] * 1e3, t["full"] * 1e3, "full sequence", "<= 0.35x",
                note=f"{str(dtype).removeprefix('torch.')}, median of {reps}")]


# ----------------------------------------------------------------------------------------- attention
def _attention_inputs(B: int, H: int, L: int, D: int, lengths: list[int] | None, device, dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=gen).to(device, dtype).requires_grad_() for _ in range(3))
    mask_BS = None
    if lengths is not None:
        mask_BS = (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]).to(device)
    return q, k, v, mask_BS


def _fwd_bwd(q, k, v, mask_BS, backend: str):
    def run() -> None:
        attention(q, k, v, mask_BS, backend).float().sum().backward()
        q.grad = k.grad = v.grad = None
    return run


def attention_backends(device: torch.device, quick: bool) -> list[Row]:
    cpu = device.type == "cpu"
    dtype = torch.float32 if cpu else torch.bfloat16
    b_vit, b_bert = (2, 4) if cpu else (64, 64)
    shapes = [("ViT-B", b_vit, 197, None)]
    bert_lens = [30] if quick else [30, 64, 128]
    for L in bert_lens:
        # Padding: lengths spread from L/2 to L, as a batch of captions padded to its longest.
        lengths = [L - (i * (L // 2)) // max(1, b_bert - 1) for i in range(b_bert)]
        shapes.append((f"BERT-base L={L} padded", b_bert, L, lengths))
    pairs = [("sdpa", "math")] + ([] if cpu else [("flash", "sdpa")])
    reps = 3 if quick else (10 if cpu else 30)
    rows = []
    for name, B, L, lengths in shapes:
        q, k, v, mask_BS = _attention_inputs(B, 12, L, 64, lengths, device, dtype, seed=L)
        for ours, ref in pairs:
            t = interleaved_median({ours: _fwd_bwd(q, k, v, mask_BS, ours), ref: _fwd_bwd(q, k, v, mask_BS, ref)},
                                   device, reps)
            rows.append(Row("attention", f"{name}, B={B} H=12 D=64", f"{ours} vs {ref} fwd+bwd ms",
                            t[ours] * 1e3, t[ref] * 1e3, ref, "<= 1.00x",
                            note=f"{str(dtype).removeprefix('torch.')}, median of {reps}"
                                 + ("" if ours != "flash" else ", varlen kernel" if lengths else ", dense kernel")))
    return rows


# ----------------------------------------------------------------------------------- FLOP accounting
def flop_accounting(device: torch.device, quick: bool) -> list[Row]:
    """Analytic vs counted FLOPs of one step per curriculum mode, tiny geometry (CPU, fp32)."""
    del device  # counting FLOPs needs no speed: always the CPU, where "math" attention is exact
    batch_size, text_len = 4, 16
    cfg = load_config(RECIPES["tiny"], ["model.attention=math"])
    torch.manual_seed(0)
    module = PretrainModule(cfg.model, cfg.objectives, objectives_by_mode(cfg.curriculum))
    batch = synthetic_batch(cfg, batch_size, text_len, torch.device("cpu"))
    num_mlm = int((batch["mlm_labels"] != -100).sum())
    rows = []
    for mode in ("single", "two"):
        with FlopCounterMode(display=False) as counter:
            total, _ = module(batch, mode, torch.Generator().manual_seed(0))
            total.backward()
        module.zero_grad(set_to_none=True)
        analytic = step_flops(cfg.model, cfg.objectives, module.active(mode), mode, batch_size, text_len,
                              num_mlm).total
        rows.append(Row("FLOP accounting", f"tiny, {mode} mode, B={batch_size} L={text_len}",
                        "GFLOP per step", analytic / 1e9, counter.get_total_flops() / 1e9,
                        "FlopCounterMode", "within 5%", note="all objectives, attention math"))
    return rows
