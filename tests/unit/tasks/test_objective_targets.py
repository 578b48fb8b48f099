"""Pre-training targets on one process: the EMA teacher is always in eval mode; SCL's targets follow
IIGROUP/SCL's code (cross-pass) or the documented `intact` option, with its own masks when configured;
captions of the same image are positives in ITC (batch and queue) and SCL, against float64 loop references."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megavl.config import OBJECTIVE_NAMES, load_config
from megavl.tasks import pretrain as pretrain_mod
from megavl.objectives.itc import itc_distill_loss, itc_loss
from megavl.tasks.pretrain import EMPTY_QUEUE_ID, PretrainModule
from megavl.objectives.scl import scl_loss


def _feats(n: int, e: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, e, generator=g, dtype=torch.float64), dim=-1)


def _log_softmax_row(v: list[float]) -> list[float]:
    mx = max(v)
    log_z = mx + math.log(sum(math.exp(x - mx) for x in v))
    return [x - log_z for x in v]


def _softmax_row(v: list[float]) -> list[float]:
    return [math.exp(x) for x in _log_softmax_row(v)]


def _dot(a, b) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b))


def _truth_row(my_id: int, ids: list[int]) -> list[float]:
    """ALBEF retrieval: every entry with my image id is a positive, equally weighted."""
    hits = [1.0 if i == my_id else 0.0 for i in ids]
    return [h / sum(hits) for h in hits]


def ref_itc_ids(img, txt, ids, temp) -> float:
    """In-batch ITC, written out: each direction is CE against the same-image targets."""
    B = img.shape[0]
    total = 0.0
    for anchors, bank in ((img, txt), (txt, img)):
        for i in range(B):
            logp = _log_softmax_row([_dot(anchors[i], bank[j]) / temp for j in range(B)])
            total -= sum(t * lp for t, lp in zip(_truth_row(ids[i], ids), logp)) / B
    return total / 2


def ref_itc_distill_ids(img, txt, img_m, txt_m, img_q, txt_q, ids, queue_ids, temp, alpha) -> float:
    B, Q = img.shape[0], img_q.shape[0]
    all_ids = list(ids) + list(queue_ids)
    img_all = [img_m[i] for i in range(B)] + [img_q[q] for q in range(Q)]
    txt_all = [txt_m[i] for i in range(B)] + [txt_q[q] for q in range(Q)]
    total = 0.0
    for anchors, anchors_m, bank in ((img, img_m, txt_all), (txt, txt_m, img_all)):
        for i in range(B):
            soft = _softmax_row([_dot(anchors_m[i], c) / temp for c in bank])
            truth = _truth_row(ids[i], all_ids)
            tgt = [alpha * s + (1 - alpha) * t for s, t in zip(soft, truth)]
            logp = _log_softmax_row([_dot(anchors[i], c) / temp for c in bank])
            total -= sum(t * lp for t, lp in zip(tgt, logp)) / B
    return total / 2


IDS = [7, 3, 7, 9, 3, 7]  # three captions of image 7, two of image 3


def test_itc_same_image_captions_are_positives():
    img, txt = _feats(6, 5, 1), _feats(6, 5, 2)
    ids = torch.tensor(IDS)
    got = itc_loss(img, txt, 0.1, image_ids=ids)
    assert got.item() == pytest.approx(ref_itc_ids(img, txt, IDS, 0.1), abs=1e-10)
    # Distinct ids reduce to the plain diagonal InfoNCE; repeated ids really change the loss.
    assert itc_loss(img, txt, 0.1, image_ids=torch.arange(6)).item() == pytest.approx(itc_loss(img, txt, 0.1).item())
    assert abs(got.item() - itc_loss(img, txt, 0.1).item()) > 1e-3
    with pytest.raises(ValueError, match="not both"):
        itc_loss(img, txt, 0.1, sim_targets=torch.eye(6, dtype=torch.float64), image_ids=ids)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_itc_queue_same_image_positives(alpha):
    B, Q, E = 6, 5, 4
    img, txt, img_m, txt_m = (_feats(B, E, s) for s in (1, 2, 3, 4))
    img_q, txt_q = _feats(Q, E, 5), _feats(Q, E, 6)
    queue_ids = [3, EMPTY_QUEUE_ID, 9, 11, 7]  # the queue holds older captions of images 3, 9, 7
    got = itc_distill_loss(img, txt, img_m, txt_m, img_q, txt_q, 0.2, alpha, image_ids=torch.tensor(IDS),
                           queue_ids=torch.tensor(queue_ids))
    ref = ref_itc_distill_ids(img, txt, img_m, txt_m, img_q, txt_q, IDS, queue_ids, 0.2, alpha)
    assert got.item() == pytest.approx(ref, abs=1e-10)
    with pytest.raises(ValueError, match="both"):
        itc_distill_loss(img, txt, img_m, txt_m, img_q, txt_q, 0.2, alpha, image_ids=torch.tensor(IDS))


def test_scl_same_image_positives_against_reference():
    g = torch.Generator().manual_seed(3)
    vm, v, tm, t = (torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(4))
    n = lambda x: F.normalize(x, dim=-1)  # noqa: E731
    ref = ref_itc_ids(n(vm), n(v), IDS, 0.03) + ref_itc_ids(n(tm), n(t), IDS, 0.03)
    assert scl_loss(vm, v, tm, t, 0.03, image_ids=torch.tensor(IDS)).item() == pytest.approx(ref, abs=1e-9)


def test_itc_logits_run_in_fp32_for_bf16_features():
    img, txt = _feats(6, 8, 1), _feats(6, 8, 2)
    exact = itc_loss(img, txt, 0.05).item()
    got = itc_loss(img.bfloat16(), txt.bfloat16(), torch.tensor([0.05], dtype=torch.bfloat16))
    assert got.dtype == torch.float32
    # Only the inputs' bf16 rounding remains (a bf16 softmax would be off by ~1e-2).
    ref = itc_loss(img.bfloat16().double(), txt.bfloat16().double(), float(torch.tensor(0.05).bfloat16())).item()
    assert got.item() == pytest.approx(ref, abs=1e-5) and got.item() == pytest.approx(exact, abs=0.1)


# ------------------------------------------------------------------------------ in the module
def _batch(B=6, L=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 1100, (B, L), generator=g)
    ids[:, 0] = 101
    mask = (torch.arange(L)[None] < torch.randint(6, L + 1, (B,), generator=g)[:, None]).long()
    picked = (torch.rand(B, L, generator=g) < 0.3) & mask.bool()
    picked[:, 0] = False
    scl_picked = (torch.rand(B, L, generator=g) < 0.4) & mask.bool()
    scl_picked[:, 0] = False
    return {"images": torch.randn(B, 3, 64, 64, generator=g), "input_ids": ids * mask, "attention_mask": mask,
            "mlm_input_ids": torch.where(picked, torch.full_like(ids, 103), ids * mask),
            "mlm_labels": torch.where(picked, ids, torch.full_like(ids, -100)),
            "scl_input_ids": torch.where(scl_picked, torch.full_like(ids, 103), ids * mask),
            "image_ids": torch.tensor(IDS[:B])}


def _module(*overrides: str, objectives=OBJECTIVE_NAMES) -> PretrainModule:
    torch.manual_seed(0)
    cfg = load_config("configs/tiny.yaml", ["data.max_text_len=12", *overrides])
    return PretrainModule(cfg.model, cfg.objectives, {"single": list(objectives), "two": list(objectives)})


def test_teacher_is_always_in_eval_mode_and_deterministic():
    module = _module("model.vision.drop_path=0.5", "objectives.itc.queue_size=12")
    batch = _batch()
    assert set(module.ema_teachers()) == {"", "itc_teacher."}
    for mode in (True, False, True):
        module.train(mode)
        assert module.student.training is mode
        for teacher in module.ema_teachers().values():
            assert not any(m.training for m in teacher.modules()), "teacher left in train mode"
    module.train()
    inputs = batch["images"], batch["input_ids"], batch["attention_mask"]
    runs = [{**module._teacher_pass(*inputs, "two", True, True), **module._momentum_features(*inputs)}
            for _ in range(2)]
    assert set(runs[0]) == {"relevance", "logits", "img_emb", "txt_emb"}
    for key in runs[0]:
        torch.testing.assert_close(runs[0][key], runs[1][key], rtol=0, atol=0, msg=key)
    # The student still drops paths in train mode: its outputs do differ between two calls.
    a, b = (module.student.encode_image(batch["images"]) for _ in range(2))
    assert not torch.equal(a, b)


class _Spy:
    """Records every student.fuse call (its output and whether it built a graph) and scl_loss's arguments."""

    def __init__(self, module, monkeypatch):
        self.fused, self.scl_args, self.text_inputs = [], None, []
        fuse, encode_text = module.student.fuse, module.student.encode_text

        def spy_fuse(*args, **kwargs):
            out = fuse(*args, **kwargs)
            self.fused.append(out)
            return out

        def spy_encode_text(input_ids, mask):
            self.text_inputs.append(input_ids)
            return encode_text(input_ids, mask)

        def spy_scl(*args, **kwargs):
            self.scl_args = (args, kwargs)
            return scl_loss(*args, **kwargs)

        monkeypatch.setattr(module.student, "fuse", spy_fuse)
        monkeypatch.setattr(module.student, "encode_text", spy_encode_text)
        monkeypatch.setattr(pretrain_mod, "scl_loss", spy_scl)


def test_scl_cross_targets_need_no_extra_fusion_pass(monkeypatch):
    """IIGROUP/SCL: image target from (intact image + masked text), text target from (masked image + intact
    text); with ITM off exactly the two masked passes run, no intact one."""
    module = _module(objectives=["scl"])
    spy = _Spy(module, monkeypatch)
    _, losses = module(_batch(), "two", torch.Generator().manual_seed(0))
    assert list(losses) == ["scl"] and len(spy.fused) == 2
    masked_image, masked_text = spy.fused
    (v_m, v_t, t_m, t_t), kwargs = spy.scl_args
    torch.testing.assert_close(v_m, masked_image.image_global)
    torch.testing.assert_close(v_t, masked_text.image_global)
    torch.testing.assert_close(t_m, masked_text.text_global)
    torch.testing.assert_close(t_t, masked_image.text_global)
    assert not v_t.requires_grad and not t_t.requires_grad
    torch.testing.assert_close(kwargs["image_ids"], torch.tensor(IDS))  # same-image positives on by default


def test_scl_intact_targets_without_itm_run_without_graph(monkeypatch):
    module = _module("objectives.scl.targets=intact", "objectives.scl.same_image_positives=false",
                     objectives=["scl", "mlm"])
    spy = _Spy(module, monkeypatch)
    module(_batch(), "two", torch.Generator().manual_seed(0))
    assert len(spy.fused) == 3
    intact = spy.fused[0]  # the intact/intact pass runs first, under no_grad
    assert not intact.image_global.requires_grad and not intact.text_global.requires_grad
    (_, v_t, _, t_t), kwargs = spy.scl_args
    torch.testing.assert_close(v_t, intact.image_global)
    torch.testing.assert_close(t_t, intact.text_global)
    assert kwargs["image_ids"] is None


def test_scl_intact_targets_with_itm_reuse_the_positives(monkeypatch):
    module = _module("objectives.scl.targets=intact", objectives=["scl", "itm"])
    spy = _Spy(module, monkeypatch)
    batch = _batch()
    module(batch, "two", torch.Generator().manual_seed(0))
    assert len(spy.fused) == 3  # ITM's [pos ; negatives], masked image, masked text
    (_, v_t, _, _), _ = spy.scl_args
    torch.testing.assert_close(v_t, spy.fused[0].image_global[:batch["images"].shape[0]])


def test_scl_own_masks_use_scl_input_ids_and_own_image_ratio(monkeypatch):
    module = _module("objectives.scl.image_mask_ratio=0.8", "objectives.scl.text_mask_prob=0.4",
                     objectives=["scl", "mlm", "mim_pixel"])
    spy = _Spy(module, monkeypatch)
    batch = _batch()
    _, losses = module(batch, "two", torch.Generator().manual_seed(0))
    assert sorted(losses) == ["mim_pixel", "mlm", "scl"]
    assert len(spy.fused) == 4  # MIM's masked image, SCL's masked image, MLM's text, SCL's text
    assert any(torch.equal(t, batch["scl_input_ids"]) for t in spy.text_inputs)
    mim_image, scl_image, _, scl_text = spy.fused
    n = module.student.num_patches
    assert mim_image.image_states.shape[1] == 1 + round(n * 0.4)  # the shared mask keeps 40% (tiny: 0.6 masked)
    assert scl_image.image_states.shape[1] == 1 + round(n * 0.2)  # SCL keeps 20%
    (v_m, v_t, t_m, _), _ = spy.scl_args
    torch.testing.assert_close(v_m, scl_image.image_global)
    torch.testing.assert_close(v_t, scl_text.image_global)
    torch.testing.assert_close(t_m, scl_text.text_global)


def test_queue_stores_image_ids_and_wraps():
    module = _module("objectives.itc.queue_size=8", "objectives.itc.distill_alpha=0.4", objectives=["itc"])
    assert bool((module.queue_image_ids == EMPTY_QUEUE_ID).all())
    for step in range(3):  # 6 rows per step into 8 slots: the pointer wraps in step 2
        batch = _batch(seed=step)
        batch["image_ids"] = torch.arange(6) + 100 * step
        module(batch, "two")
    assert int(module.queue_ptr) == 18 % 8
    slots = {(100 * s + r): (6 * s + r) % 8 for s in range(3) for r in range(6)}
    expected = torch.empty(8, dtype=torch.long)
    for image_id, slot in sorted(slots.items()):  # later steps overwrite earlier ones
        expected[slot] = image_id
    torch.testing.assert_close(module.queue_image_ids, expected)


def test_queue_smaller_than_the_gathered_batch_is_an_error():
    """6 rows into 4 slots would write two rows into one slot (undefined order on CUDA)."""
    module = _module("objectives.itc.queue_size=4", "objectives.itc.distill_alpha=0.4", objectives=["itc"])
    with pytest.raises(ValueError, match="queue_size"):
        module(_batch(seed=0), "two")


def test_clamp_trained_temperature_plain_parameter_and_bounds():
    from megavl.objectives.temperature import clamp_trained_temperature_

    t = torch.nn.Parameter(torch.tensor([0.9]))
    clamp_trained_temperature_(t, 0.01, 0.5)
    assert t.item() == 0.5 and t.requires_grad
    with pytest.raises(ValueError):
        clamp_trained_temperature_(t, 0.5, 0.1)


def test_mim_pixel_targets_come_from_the_fp32_images(monkeypatch):
    """Under bf16 the Trainer casts the batch to bf16 and keeps `images_fp32`; the pixel targets use it."""
    from megavl.engine.step import to_device

    batch = _batch()
    moved = to_device(batch, torch.device("cpu"), torch.bfloat16)
    assert moved["images"].dtype == torch.bfloat16 and moved["images_fp32"].dtype == torch.float32
    assert torch.equal(moved["images_fp32"], batch["images"])
    assert "images_fp32" not in to_device(batch, torch.device("cpu"), torch.float32)

    module = _module(objectives=["mim_pixel"])
    seen = []
    real = pretrain_mod.masked_patch_targets
    monkeypatch.setattr(pretrain_mod, "masked_patch_targets", lambda images, *a, **k: seen.append(images) or real(images, *a, **k))
    batch["images_fp32"] = batch["images"] + 1.0  # a marker: the model itself reads "images"
    module(batch, "two", torch.Generator().manual_seed(0))
    assert len(seen) == 1 and seen[0] is batch["images_fp32"]
