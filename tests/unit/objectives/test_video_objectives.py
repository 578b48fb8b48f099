"""The masked-image objectives on clips (B, T, 3, S, S), each against a slow per-frame reference
written here: tube masks (the same positions in every frame), MIM-pixel and SemMIM scored at every
masked (frame, position), SCL on the clip-level globals. Also: a T = 1 clip is the image path bit
for bit, a full step on clips with every objective trains every parameter, and clips that cannot
work raise a clear ValueError before any pass runs.

Legend: B batch, T frames, N patches per frame, K kept, M masked, P pixels per patch.
"""
from __future__ import annotations

import pytest
import torch

from megavl.config import OBJECTIVE_NAMES, load_config
from megavl.objectives.masking import random_masking, text_guided_masking
from megavl.objectives.mim_pixel import mim_pixel_loss
from megavl.objectives.mim_semantic import semantic_mim_loss
from megavl.tasks.pretrain import PretrainModule
from megavl.objectives.scl import scl_loss

B, T, L, S, PATCH = 2, 3, 10, 32, 8
SMALL = ["model.vision.img_size=32 data.image_size=32 model.vision.num_frames=4 data.max_text_len=16",
         "model.attention=math"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: extra intra-op threads only add synchronisation on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_module(objectives: list[str], overrides: list[str] = ()) -> PretrainModule:
    cfg = load_config("configs/tiny.yaml", SMALL + list(overrides))
    torch.manual_seed(0)
    module = PretrainModule(cfg.model, cfg.objectives, {"single": objectives, "two": objectives})
    return module.eval()  # no stochastic layers either way; eval says the reference may rerun passes


def make_batch(frames: int = T, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 1100, (B, L), generator=g)
    ids[:, 0] = 101
    mask = (torch.arange(L)[None] < torch.tensor([L, 6])[:, None]).long()
    labels = torch.full((B, L), -100)
    labels[0, [2, 5]], labels[1, [3]] = ids[0, [2, 5]], ids[1, [3]]
    shape = (B, 3, S, S) if frames == 0 else (B, frames, 3, S, S)  # frames = 0: a batch of images
    return {"images": torch.randn(*shape, generator=g), "input_ids": ids * mask, "attention_mask": mask,
            "mlm_input_ids": torch.where(labels != -100, torch.full_like(ids, 103), ids * mask),
            "mlm_labels": labels, "image_ids": torch.arange(B)}


def patch_pixels(frame_CHW: torch.Tensor, index: int, norm: bool = True) -> torch.Tensor:
    """Patch `index` (raster order) of one frame as (i, j, c) pixels, normalised by its own mean and
    unbiased variance (MAE's norm_pix) -> (P,)."""
    grid = S // PATCH
    top, left = (index // grid) * PATCH, (index % grid) * PATCH
    x = frame_CHW[:, top:top + PATCH, left:left + PATCH].permute(1, 2, 0).reshape(-1)
    return (x - x.mean()) / (x.var() + 1e-6) ** 0.5 if norm else x


def frame_kept_states(fused_states: torch.Tensor, frame: int, num_keep: int) -> torch.Tensor:
    """Fused image states of one frame's kept patches: token 0 is the clip [CLS], then frame-major."""
    return fused_states[:, 1 + frame * num_keep:1 + (frame + 1) * num_keep]


# ------------------------------------------------------------------------------------ MIM-pixel
def test_mim_pixel_on_a_clip_is_the_mean_over_frames_of_the_per_frame_image_loss():
    """Every masked patch of every frame is predicted from that frame's fused kept states by the
    per-frame decoder; targets are the frame's own normalised pixels at the tube-masked positions."""
    module = make_module(["mim_pixel"], ["objectives.masking.text_guided=false"])
    batch, s = make_batch(), module.student
    _, losses = module(batch, "two", torch.Generator().manual_seed(7))

    # The mask: the step's first draw is the (B, N) noise of the random mask, one row per clip.
    noise = torch.rand((B, s.num_patches), generator=torch.Generator().manual_seed(7))
    spec = random_masking(B, s.num_patches, module.cfg.masking.image_mask_ratio, noise=noise)
    with torch.no_grad():
        fused = s.fuse(s.encode_image(batch["images"], spec.keep_ids),
                       s.encode_text(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"], "two")
        per_frame = []
        for t in range(T):
            decoded = s.decoder(frame_kept_states(fused.image_states, t, spec.num_keep), spec.ids_restore)
            pred = s.decoder.pixels(torch.stack([decoded[b, spec.ids_masked[b]] for b in range(B)]))
            target = torch.stack([torch.stack([patch_pixels(batch["images"][b, t], int(n))
                                               for n in spec.ids_masked[b]]) for b in range(B)])
            per_frame.append(((pred - target) ** 2).mean())
    torch.testing.assert_close(losses["mim_pixel"].detach(), torch.stack(per_frame).mean(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------- SemMIM
def test_semantic_mim_on_a_clip_against_the_per_frame_reference():
    """Text-guided tube mask from the teacher's relevance summed over frames; teacher targets on the
    INTACT clip at every masked (frame, position) and at the clip [CLS]; centres over all of them."""
    module = make_module(["mim_sem"])
    batch, s, t_model, cfg = make_batch(), module.student, module.teacher, module.cfg
    _, losses = module(batch, "two", torch.Generator().manual_seed(3))
    N = s.num_patches
    m = cfg.masking

    with torch.no_grad():
        text_mask = batch["attention_mask"]
        t_fused = t_model.fuse(t_model.encode_image(batch["images"]),
                               t_model.encode_text(batch["input_ids"], text_mask), text_mask, "two",
                               return_text_to_image_attn=True)
        relevance = t_fused.text_to_image_attn[:, 1:]                      # (B, T*N), frame-major
        summed = sum(relevance[:, t * N:(t + 1) * N] for t in range(T))    # (B, N)
        noise = torch.rand((B, N), generator=torch.Generator().manual_seed(3))
        spec = text_guided_masking(summed, m.image_mask_ratio, m.guided_randomness, noise=noise)
        t_logits = t_model.prototype_head(t_fused.image_states)           # (B, 1 + T*N, Kp)

        fused = s.fuse(s.encode_image(batch["images"], spec.keep_ids),
                       s.encode_text(batch["input_ids"], text_mask), text_mask, "two")
        zero = torch.zeros_like(module.center_patch)
        args = (cfg.mim_sem.student_temp, cfg.mim_sem.teacher_temp)
        patch_terms, teacher_patches = [], []
        for t in range(T):
            decoded = s.decoder(frame_kept_states(fused.image_states, t, spec.num_keep), spec.ids_restore)
            s_patch = s.prototype_head(s.decoder.semantic(
                torch.stack([decoded[b, spec.ids_masked[b]] for b in range(B)])))
            t_patch = torch.stack([t_logits[b, 1 + t * N + spec.ids_masked[b]] for b in range(B)])
            patch_terms.append(semantic_mim_loss(s_patch, t_patch, zero, *args))
            teacher_patches.append(t_patch)
        agree = semantic_mim_loss(s.prototype_head(fused.image_global), t_logits[:, 0], zero, *args)
        expected = torch.stack(patch_terms).mean() + cfg.mim_sem.global_weight * agree
    torch.testing.assert_close(losses["mim_sem"].detach(), expected, rtol=1e-5, atol=1e-5)
    # The patch centre moves towards the mean teacher logits over every masked (frame, position).
    mean_patch = torch.cat([p.reshape(-1, p.shape[-1]) for p in teacher_patches]).mean(dim=0)
    torch.testing.assert_close(module.center_patch, (1 - cfg.mim_sem.center_momentum) * mean_patch,
                               rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ SCL
@pytest.mark.parametrize("own_masks", [False, True])
def test_scl_on_a_clip_contrasts_clip_level_globals(own_masks: bool):
    """Vision query: fused clip [CLS] of the tube-masked clip (mean of the frame [CLS] tokens, then
    the frames' kept patches); targets from the passes where each modality is intact (`cross`)."""
    over = ["objectives.masking.text_guided=false"]
    if own_masks:  # SCL's own random mask at 0.8 (its text mask needs scl_input_ids)
        over += ["objectives.scl.image_mask_ratio=0.8"]
    module = make_module(["scl"], over)
    batch, s = make_batch(), module.student
    _, losses = module(batch, "single", torch.Generator().manual_seed(5))

    ratio = 0.8 if own_masks else module.cfg.masking.image_mask_ratio
    noise = torch.rand((B, s.num_patches), generator=torch.Generator().manual_seed(5))
    spec = random_masking(B, s.num_patches, ratio, noise=noise)

    def clip_tokens(keep_ids):  # the clip's token layout written out frame by frame
        frames = s.vision.forward_frames(batch["images"], keep_ids)     # (B, T, 1 + K, E)
        cls = sum(frames[:, t, :1] for t in range(T)) / T
        return torch.cat([cls] + [frames[:, t, 1:] for t in range(T)], dim=1)

    with torch.no_grad():
        text_mask = batch["attention_mask"]
        txt = s.encode_text(batch["input_ids"], text_mask)
        masked_image = s.fuse(clip_tokens(spec.keep_ids), txt, text_mask, "single")
        masked_text = s.fuse(clip_tokens(None), s.encode_text(batch["mlm_input_ids"], text_mask), text_mask,
                             "single")
        expected = scl_loss(masked_image.image_global, masked_text.image_global, masked_text.text_global,
                            masked_image.text_global, temperature=module.cfg.scl.temperature,
                            image_ids=batch["image_ids"])
    torch.testing.assert_close(losses["scl"].detach(), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ T = 1, the whole step
def test_a_one_frame_clip_is_the_image_path_bit_for_bit():
    """(B, 1, 3, S, S) and (B, 3, S, S): the same losses and the same gradients, exactly."""
    module = make_module(list(OBJECTIVE_NAMES))
    image_batch, state = make_batch(frames=0), {k: v.clone() for k, v in module.state_dict().items()}
    # the queues and centres are non-persistent (megavl saves them itself): outside the state dict
    buffers = {k: v.clone() for k, v in module.named_buffers()}
    clip_batch = dict(image_batch, images=image_batch["images"].unsqueeze(1))
    results = []
    for batch in (image_batch, clip_batch):
        module.load_state_dict(state)
        with torch.no_grad():
            for name, buffer in module.named_buffers():
                buffer.copy_(buffers[name])
        module.zero_grad(set_to_none=True)
        total, losses = module(batch, "two", torch.Generator().manual_seed(1))
        total.backward()
        results.append((losses, {n: p.grad.clone() for n, p in module.student_parameters() if p.grad is not None}))
    (image_losses, image_grads), (clip_losses, clip_grads) = results
    assert all(torch.equal(image_losses[k], clip_losses[k]) for k in OBJECTIVE_NAMES)
    assert image_grads.keys() == clip_grads.keys()
    assert all(torch.equal(image_grads[n], clip_grads[n]) for n in image_grads)


@pytest.mark.parametrize("mode", ["single", "two"])
def test_a_step_on_clips_with_every_objective_trains_every_parameter(mode: str):
    module = make_module(list(OBJECTIVE_NAMES)).train()
    total, losses = module(make_batch(), mode, torch.Generator().manual_seed(0))
    assert sorted(losses) == sorted(OBJECTIVE_NAMES)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    total.backward()
    unused = {"two": (), "single": ("cross.",)}[mode]  # single-stream steps unplug the cross-attention
    missing = [n for n, p in module.student_parameters() if p.grad is None and not any(u in n for u in unused)]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for _, p in module.student_parameters() if p.grad is not None)
    assert module.student.vision.temporal_embed.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ clear errors
def test_clips_that_cannot_work_raise_before_any_pass(monkeypatch):
    """A clear ValueError on every rank alike, before the teacher pass or any collective runs."""
    image_only = make_module(list(OBJECTIVE_NAMES), ["model.vision.num_frames=1"])
    ran = []
    monkeypatch.setattr(image_only, "_teacher_pass", lambda *a, **k: ran.append("teacher"))
    with pytest.raises(ValueError, match="model.vision.num_frames"):
        image_only(make_batch(), "two", torch.Generator().manual_seed(0))
    bad = make_batch()
    with pytest.raises(ValueError, match="images"):
        image_only(dict(bad, images=bad["images"][:, 0, 0]), "two")  # (B, S, S): no channels
    with pytest.raises(ValueError, match="images_fp32"):
        image_only(dict(bad, images=bad["images"][:, 0], images_fp32=bad["images"]), "two")
    assert not ran


# ----------------------------------------------------------------------------------------- GPU
def clip_step_losses(device: torch.device, kernels: str, monkeypatch) -> dict[str, torch.Tensor]:
    """One clip step (every objective, mode two) with megavl_kernels forced to `kernels`."""
    monkeypatch.setenv("MEGAVL_KERNELS", kernels)
    module = make_module(list(OBJECTIVE_NAMES)).to(device)
    batch = {k: v.to(device) for k, v in make_batch().items()}
    total, losses = module(batch, "two", torch.Generator(device=device).manual_seed(0))
    total.backward()
    return {k: v.detach().cpu() for k, v in losses.items()}


@pytest.mark.gpu
def test_clip_step_on_cuda_triton_equals_the_torch_reference_without_host_sync(monkeypatch):
    """The compiled gather/scatter/patch-target kernels on B*T frame rows give the reference's losses,
    and a steady-state clip step does not wait on the device (as the image step, test_sync_free_step)."""
    device = torch.device("cuda")
    reference = clip_step_losses(device, "torch", monkeypatch)
    triton = clip_step_losses(device, "triton", monkeypatch)
    for name in OBJECTIVE_NAMES:
        torch.testing.assert_close(triton[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)

    module = make_module(list(OBJECTIVE_NAMES)).to(device)
    batch = {k: v.to(device) for k, v in make_batch().items()}
    batch["mlm_count"] = int((batch["mlm_labels"] != -100).sum())  # from the CPU batch in the Trainer
    for i in range(2):  # the first steps build lazy state; the third must not sync
        total, _ = module(batch, ("single", "two")[i], torch.Generator(device=device).manual_seed(i))
        total.backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total, _ = module(batch, "two", torch.Generator(device=device).manual_seed(2))
        total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
