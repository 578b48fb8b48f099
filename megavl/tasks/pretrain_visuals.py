"""Pictures for TensorBoard: random vs text-guided masks, and the MIM reconstruction.

Under ZeRO-3 every forward is a collective, so every rank calls `log_mask_images` at the same
steps (on the first sample of its batch); only rank 0's Monitor writes. A clip goes through the
same passes as in training (tube mask over all frames, per-frame decoding); its first frame is shown.
"""
from __future__ import annotations

import torch

from megavl.config import Config
from megavl.objectives.masking import random_masking, text_guided_masking
from megavl.tasks.pretrain import clip_frames
from megavl_kernels import patchify


def unpatchify(patches_BNP: torch.Tensor, patch: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of megavl_kernels.patchify: (B, N, p*p*C) -> (B, C, H, W)."""
    B, N, P = patches_BNP.shape
    C = P // (patch * patch)
    h, w = grid
    x = patches_BNP.reshape(B, h, w, patch, patch, C)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(B, C, h * patch, w * patch)


def prediction_to_pixels(pred_BNP: torch.Tensor, images_BCHW: torch.Tensor, patch: int, mean: list[float],
                         std: list[float], norm_pix: bool, eps: float = 1e-6) -> torch.Tensor:
    """Decoder pixel predictions (B, N, P) -> displayable pixels (B, N, P), [0, 1] for a perfect one.

    The MIM target (`masked_patch_targets`) is built from the images the model sees, which are
    already normalised per channel by data.mean/std; with norm_pix each patch of THOSE is further
    normalised by its own mean and (unbiased) variance. So undo in reverse order: the per-patch
    statistics of the normalised image first, then x * std + mean per channel. Patch vectors are in
    (p, q, c) order, so the channel is the fastest axis.
    """
    pred = pred_BNP.float()
    if norm_pix:
        seen = patchify(images_BCHW.float(), patch)
        mu, var = seen.mean(-1, keepdim=True), seen.var(-1, keepdim=True)
        pred = pred * (var + eps).sqrt() + mu
    std_P = torch.tensor(std, device=pred.device).repeat(patch * patch)
    mean_P = torch.tensor(mean, device=pred.device).repeat(patch * patch)
    return pred * std_P + mean_P


def _masked_view(patches_1NP: torch.Tensor, mask_1N: torch.Tensor) -> torch.Tensor:
    return patches_1NP * (~mask_1N).unsqueeze(-1) + 0.5 * mask_1N.unsqueeze(-1)


@torch.no_grad()
def log_mask_images(module, batch: dict, mode: str, monitor, step: int, cfg: Config) -> None:
    student = module.student
    was_training = student.training
    student.eval()
    try:
        images = batch["images"][:1]  # (1, 3, S, S) or a clip (1, T, 3, S, S)
        frames = clip_frames(images, student.vision.num_frames)
        ids, text_mask = batch["input_ids"][:1], batch["attention_mask"][:1]
        m = cfg.objectives.masking
        gen = torch.Generator(device=images.device).manual_seed(step)
        # the masks' relevance as the step draws it; a run without a teacher (no objective reads
        # one) shows the student's
        teacher = module.teacher if module.teacher is not None else student
        fused_t = teacher.fuse(teacher.encode_image(images), teacher.encode_text(ids, text_mask), text_mask,
                               mode, return_text_to_image_attn=True)
        guided = text_guided_masking(fused_t.text_to_image_attn[:, 1:], m.image_mask_ratio,
                                     m.guided_randomness, generator=gen, num_frames=frames)
        rand = random_masking(1, student.num_patches, m.image_mask_ratio, images.device, generator=gen)
        fused = student.fuse(student.encode_image(images, guided.keep_ids), student.encode_text(ids, text_mask),
                             text_mask, mode)
        tube = guided.per_frame(frames)  # frame t is row t (frame-major)
        kept = fused.image_states[:, 1:].reshape(frames, guided.num_keep, -1)
        pred = student.decoder.pixels(student.decoder(kept, tube.ids_restore))[:1].float()  # frame 0
        if frames > 1:
            images = images[:, 0]

        mean = torch.tensor(cfg.data.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(cfg.data.std, device=images.device).view(1, 3, 1, 1)
        pixels = (images.float() * std + mean).clamp(0, 1)
        p, grid = student.patch_size, student.vision.grid_size
        target = patchify(pixels, p)  # (1, N, P)
        pred = prediction_to_pixels(pred, images, p, cfg.data.mean, cfg.data.std, cfg.objectives.mim_pixel.norm_pix)
        recon = torch.where(guided.mask.unsqueeze(-1), pred.clamp(0, 1), target)
        panels = [pixels, unpatchify(_masked_view(target, rand.mask), p, grid),
                  unpatchify(_masked_view(target, guided.mask), p, grid), unpatchify(recon, p, grid)]
        monitor.image(step, "images/original|random_mask|text_guided_mask|reconstruction",
                      torch.cat(panels, dim=3)[0])
    finally:
        student.train(was_training)
