"""One pre-training step: the shared forward passes and every enabled objective on top of them.

`PretrainModule` is what the engine wraps with DeepSpeed: the student, its EMA teachers (frozen,
updated on partitions by `teacher.ema_update_`, each built only when an enabled objective reads it)
and the objectives' own state (ITC temperature and queues, SemMIM centers). Its forward runs each
pass at most once per step:

    teacher pass      intact image + text        -> SemMIM targets, text-to-patch relevance
    momentum pass     intact image, intact text  -> ITC queue and distillation (ALBEF's momentum model)
    unimodal pass     intact image, intact text  -> ITC (with model.vision.patch_dropout > 0 and the
                      module training: a random subset of patches, FLIP; it also feeds the ITM pairs
                      and the masked-text pass)
    fused pass        [pos ; hard-neg pairs]     -> ITM (and SCL targets with `scl.targets: intact`)
    masked image      kept patches + text        -> MIM-pixel, MIM-semantic, SCL-vision query, SCL-text target
    masked text       intact image + MLM text    -> MLM, SCL-text query, SCL-vision target
    SCL's own masks   (when scl.image_mask_ratio / scl.text_mask_prob > 0) replace the shared masked
                      passes for SCL only: random masking at SCL's ratio, [MASK]-only text (scl_input_ids)

The teachers are always in eval mode (no dropout / drop-path), whatever mode the student is in.
Captions of the same image (equal `image_ids`) are positives in ITC (batch and queue) and SCL.

Clips: `images` (B, T, 3, S, S) run the same passes (an image is the T = 1 case, bit for bit). The
vision tower gives (B, 1 + T*K, Wv): the clip [CLS] (mean of the frame [CLS] tokens) and every
frame's kept patches, frame-major; everything global (ITC, ITM, SCL, SemMIM's agreement term) reads
the clip [CLS]. The image mask is a TUBE mask: one MaskSpec over the N positions of a frame (noise
drawn for the global batch, as for images), the same positions dropped in every frame; text-guided
masking ranks positions by the teacher's relevance summed over frames. The MAE decoder runs per
frame on (B*T) rows (`MaskSpec.per_frame`): each frame's M masked patches are predicted from that
frame's fused kept states, so MIM-pixel and SemMIM score B*T*M (frame, position) pairs.

Legend: B batch, T frames, N patches per frame, K kept, M masked, L text length, W fusion width,
E embedding, Kp prototypes, X = B*T frame rows.

Control flow depends only on config and curriculum mode, never on data, so every rank runs the same
modules in the same order (ZeRO-3 gathers parameters in that order; a mismatch hangs).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn

from megavl.config import Config, ModelConfig, ObjectivesConfig
from megavl.models.fusion import FusionOutput
from megavl.models.vlp import VLPModel
from megavl_kernels import gather_tokens, masked_patch_targets

from megavl.objectives.distributed import all_reduce_mean, gather_features, is_distributed, local_rows
from megavl.objectives.itc import (EMPTY_QUEUE_ID, clamp_temperature_, enqueue_momentum_features_,
                                   itc_distill_loss, itc_loss, register_itc_queue)
from megavl.objectives.itm import itm_loss, itm_pairs
from megavl.objectives.masking import MaskSpec, random_masking, text_guided_masking
from megavl.objectives.mim_pixel import mim_pixel_loss
from megavl.objectives.mim_semantic import semantic_mim_loss, update_center
from megavl.objectives.mlm import mlm_loss
from megavl.objectives.scl import scl_loss
from megavl.objectives.teacher import distill_alpha, ema_update_, make_teacher, teacher_momentum
from megavl.objectives.temperature import clamp_trained_temperature_
from megavl.tasks.task import StepPlan, Task, TaskEnv, TrainedParameters

__all__ = ["EMPTY_QUEUE_ID", "PretrainModule", "build"]  # EMPTY_QUEUE_ID lives in objectives.itc (shared with retrieval)


ITC_TEACHER_PARTS = ("vision", "text", "vision_proj", "text_proj")  # what ALBEF's ITC momentum features read
ITC_TEACHER_PREFIX = "itc_teacher."  # its parameters' names in a checkpoint, beside the teacher's


def teacher_readers(obj_cfg: ObjectivesConfig, objectives_by_mode: dict[str, list[str]]) -> dict[str, bool]:
    """Which EMA models some enabled objective reads, in any fusion mode: `teacher` (SemMIM's
    targets, the text-guided masks' relevance; `semantic`: with the prototype head) and `itc_teacher`
    (ITC's queue and distillation)."""
    semantic = guided = queue = False
    for active in objectives_by_mode.values():
        on = set(active)
        masked_image = bool(on & {"mim_pixel", "mim_sem"}) or ("scl" in on and obj_cfg.scl.image_mask_ratio == 0)
        semantic |= "mim_sem" in on
        guided |= masked_image and obj_cfg.masking.text_guided
        queue |= "itc" in on and obj_cfg.itc.queue_size > 0
    return {"teacher": semantic or guided, "semantic": semantic, "itc_teacher": queue}


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def clip_frames(images: torch.Tensor, num_frames_model: int) -> int:
    """T of a batch, checked before any pass or collective runs: (B, C, H, W) images are 1-frame
    clips, (B, T, C, H, W) clips need a vision tower built with a temporal embedding."""
    if images.ndim == 4:
        return 1
    if images.ndim != 5 or images.shape[1] < 1:
        raise ValueError(f"batch['images'] must be (B, 3, S, S) images or (B, T, 3, S, S) clips; "
                         f"got shape {tuple(images.shape)}")
    frames = images.shape[1]
    if frames > 1 and num_frames_model == 1:
        raise ValueError(f"the batch holds clips of {frames} frames but model.vision.num_frames=1 builds "
                         "no temporal embedding; set model.vision.num_frames (SCL: 8) to pre-train on video")
    return frames


def as_frame_rows(images: torch.Tensor) -> torch.Tensor:
    """(B, T, C, H, W) -> (B*T, C, H, W), frame-major per sample as the vision tower flattens them;
    (B, C, H, W) images are returned as they are (the same tensor)."""
    return images if images.ndim == 4 else images.flatten(0, 1)


def _first_rows(fused: FusionOutput, rows: int) -> FusionOutput:
    return FusionOutput(fused.image_states[:rows], fused.text_states[:rows], fused.image_global[:rows],
                        fused.text_global[:rows], None)


class PretrainModule(nn.Module):
    def __init__(self, model_cfg: ModelConfig, obj_cfg: ObjectivesConfig,
                 objectives_by_mode: dict[str, list[str]]) -> None:
        super().__init__()
        self.cfg = obj_cfg
        self.patch_dropout = model_cfg.vision.patch_dropout
        self.student = VLPModel(model_cfg)
        enabled = set(obj_cfg.enabled())
        self.objectives_by_mode = {mode: [n for n in names if n in enabled]
                                   for mode, names in objectives_by_mode.items()}
        readers = teacher_readers(obj_cfg, self.objectives_by_mode)
        # Two EMA models with two schedules, each built only when an enabled objective reads it
        # (docs/objectives.md "Teachers"): SemMIM's targets and the text-guided relevance come from
        # `teacher` (iBOT's cosine to objectives.teacher.momentum_end), ALBEF's queue and distillation
        # from `itc_teacher` (towers and projections, constant objectives.itc.momentum).
        self.teacher = self.itc_teacher = None
        if readers["teacher"]:
            parts = ("vision", "text", "fusion") + (("prototype_head",) if readers["semantic"] else ())
            self.teacher = make_teacher(self.student, parts).eval()
        if readers["itc_teacher"]:
            self.itc_teacher = make_teacher(self.student, ITC_TEACHER_PARTS).eval()
        self.teacher_master: dict[str, torch.Tensor] = {}  # fp32 EMA state of low-precision teacher shards
        self.distill_alpha = float(obj_cfg.itc.distill_alpha)  # this step's (ramped) weight: set_step
        # Shape (1,), not 0-dim: DeepSpeed broadcasts parameters as byte views, which 0-dim tensors refuse.
        self.temp = nn.Parameter(torch.full((1,), float(obj_cfg.itc.temp_init)))
        kp, e, q = model_cfg.num_prototypes, model_cfg.embed_dim, obj_cfg.itc.queue_size
        # SemMIM centres: identical on every rank and saved once by the training checkpoint, so kept
        # out of the state dict (each ZeRO-3 rank's model file), as the ITC queue is
        self.register_buffer("center_global", torch.zeros(kp), persistent=False)
        self.register_buffer("center_patch", torch.zeros(kp), persistent=False)
        register_itc_queue(self, q, e)
        self.temperature_used = self.temp.detach().float().clone()  # what the last ITC loss divided by

    def train(self, mode: bool = True) -> "PretrainModule":
        """The EMA teacher stays in eval mode: with dropout or drop-path its SemMIM targets, ITC momentum
        features and text-guided relevance would be random draws instead of the teacher's function."""
        super().train(mode)
        for teacher in self.ema_teachers().values():
            teacher.eval()
        return self

    @torch.no_grad()
    def clamp_temperature(self) -> None:
        """Clamp the ITC temperature's optimizer master and working copies to [temp_min, temp_max]; call
        on every rank right after each `engine.step()` (see objectives/temperature.py)."""
        clamp_trained_temperature_(self.temp, self.cfg.itc.temp_min, self.cfg.itc.temp_max)

    def active(self, mode: str) -> list[str]:
        return self.objectives_by_mode[mode]

    def student_parameters(self):
        """(name, parameter) pairs the optimizer trains: the student and the ITC temperature."""
        yield "temp", self.temp
        for name, p in self.student.named_parameters():
            yield f"student.{name}", p

    def ema_teachers(self) -> dict[str, nn.Module]:
        """{checkpoint name prefix: EMA model} of the teachers this run built (engine/checkpoint.py
        saves each under teacher/<prefix><name>, its fp32 master under master/<prefix><name>)."""
        out = {}
        if self.teacher is not None:
            out[""] = self.teacher
        if self.itc_teacher is not None:
            out[ITC_TEACHER_PREFIX] = self.itc_teacher
        return out

    def set_step(self, step: int, steps_per_epoch: int) -> dict[str, float]:
        """This step's distillation weight: ALBEF's ramp over the first epoch (objectives.itc.alpha_warmup)."""
        itc = self.cfg.itc
        self.distill_alpha = distill_alpha(itc.distill_alpha, step, steps_per_epoch, itc.alpha_warmup)
        return {"train/itc_distill_alpha": self.distill_alpha} if self.itc_teacher is not None else {}

    @torch.no_grad()
    def update_teachers(self, step: int, total_steps: int) -> dict[str, float]:
        """EMA of each built teacher after optimizer step `step` (0-based), on this rank's shards (with
        bf16 weights on fp32 master copies): SemMIM's teacher on the cosine schedule, ALBEF's momentum
        model at its constant momentum. Returns the momenta used, as scalars to log."""
        scalars = {}
        if self.teacher is not None:
            t = self.cfg.teacher
            momentum = teacher_momentum(step, total_steps, t.momentum, t.momentum_end)
            ema_update_(self.teacher, self.student, momentum, master=self.teacher_master)
            scalars["train/teacher_momentum"] = momentum
        if self.itc_teacher is not None:
            momentum = self.cfg.itc.momentum
            ema_update_(self.itc_teacher, self.student, momentum, master=self.teacher_master,
                        master_prefix=ITC_TEACHER_PREFIX)
            scalars["train/itc_momentum"] = momentum
        return scalars

    # ----------------------------------------------------------------------------------- step
    def forward(self, batch: dict, mode: str, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """batch: the data loader's dict; mode: "single" | "two". Returns (weighted total, raw losses)."""
        cfg, active = self.cfg, self.active(mode)
        images, ids, text_mask = batch["images"], batch["input_ids"], batch["attention_mask"]
        images_fp32 = batch.get("images_fp32", images)  # pixel targets from full-precision images (bf16)
        s = self.student
        frames = clip_frames(images, s.vision.num_frames)
        if images_fp32.shape != images.shape:
            raise ValueError(f"batch['images_fp32'] {tuple(images_fp32.shape)} must have the shape of "
                             f"batch['images'] {tuple(images.shape)}")
        scl = "scl" in active
        scl_own_image = scl and cfg.scl.image_mask_ratio > 0
        scl_own_text = scl and cfg.scl.text_mask_prob > 0
        mim = "mim_pixel" in active or "mim_sem" in active
        need_masked_image = mim or (scl and not scl_own_image)
        guided = need_masked_image and cfg.masking.text_guided
        distill = "itc" in active and cfg.itc.queue_size > 0
        losses: dict[str, torch.Tensor] = {}

        teacher_out: dict[str, torch.Tensor] = {}
        if "mim_sem" in active or guided:
            teacher_out = self._teacher_pass(images, ids, text_mask, mode, guided, "mim_sem" in active)
        if distill:
            teacher_out.update(self._momentum_features(images, ids, text_mask))

        spec = scl_spec = None
        if need_masked_image:
            spec = self._make_mask(images.shape[0], images.device, teacher_out, generator,
                                   cfg.masking.image_mask_ratio, cfg.masking.text_guided, frames)
        if scl_own_image:  # SCL masks at random, at its own ratio (0.8 in the paper)
            scl_spec = self._make_mask(images.shape[0], images.device, None, generator,
                                       cfg.scl.image_mask_ratio, False, frames)

        img = s.encode_image(images, self._patch_dropout_keep(images.shape[0], images.device, generator, frames))
        txt = s.encode_text(ids, text_mask)
        img_emb, txt_emb = s.image_embedding(img), s.text_embedding(txt)
        clamp_temperature_(self.temp, cfg.itc.temp_min, cfg.itc.temp_max)
        self.temperature_used = self.temp.detach().float().reshape(-1)[0].clone()
        if "itc" in active:
            losses["itc"] = self._itc(img_emb, txt_emb, teacher_out, batch["image_ids"])

        fused_pos = None
        if "itm" in active:
            fused_pos, losses_itm = self._fused_pass(img, txt, img_emb, txt_emb, batch, mode, generator,
                                                     with_itm=True)
            losses.update(losses_itm)
        elif scl and cfg.scl.targets == "intact":
            with torch.no_grad():  # SCL's targets are detached: this pass needs no graph
                fused_pos = s.fuse(img, txt, text_mask, mode)

        fused_mi = None
        if need_masked_image:
            fused_mi = s.fuse(s.encode_image(images, spec.keep_ids), txt, text_mask, mode)
        if mim:  # SCL alone needs only the fused global
            # Per-frame decoding: frame t of sample b is row b*T + t (frame-major, as per_frame).
            tube = spec.per_frame(frames)
            kept_XKW = fused_mi.image_states[:, 1:].reshape(images.shape[0] * frames, spec.num_keep, -1)
            decoded = s.decoder(kept_XKW, tube.ids_restore)  # (X, N, Dd)
            decoded_masked = gather_tokens(decoded, tube.ids_masked)  # (X, M, Dd)
            if "mim_pixel" in active:
                target = masked_patch_targets(as_frame_rows(images_fp32), tube.ids_masked, s.patch_size,
                                              norm_pix=cfg.mim_pixel.norm_pix)  # (X, M, P)
                losses["mim_pixel"] = mim_pixel_loss(s.decoder.pixels(decoded_masked), target)  # fp32 inside
            if "mim_sem" in active:
                losses["mim_sem"] = self._semantic_mim(fused_mi.image_global, decoded_masked, tube, teacher_out)
        scl_mi = fused_mi
        if scl_own_image:
            scl_mi = s.fuse(s.encode_image(images, scl_spec.keep_ids), txt, text_mask, mode)

        fused_mt = None
        if "mlm" in active or (scl and not scl_own_text):
            masked_txt = s.encode_text(batch["mlm_input_ids"], text_mask)
            fused_mt = s.fuse(img, masked_txt, text_mask, mode)
            if "mlm" in active:
                losses["mlm"] = self._mlm(fused_mt.text_states, batch["mlm_labels"], batch.get("mlm_count"))
        scl_mt = fused_mt
        if scl_own_text:  # [MASK]-only text at SCL's own ratio, built by the collate
            scl_mt = s.fuse(img, s.encode_text(batch["scl_input_ids"], text_mask), text_mask, mode)

        if scl:
            losses["scl"] = self._scl(scl_mi, scl_mt, fused_pos, batch["image_ids"])

        total = sum(getattr(cfg, name).weight * loss for name, loss in losses.items())
        return total, losses

    # -------------------------------------------------------------------------------- pieces
    @torch.no_grad()
    def _teacher_pass(self, images, ids, text_mask, mode, guided, semantic) -> dict:
        t = self.teacher
        img, txt = t.encode_image(images), t.encode_text(ids, text_mask)
        out: dict[str, torch.Tensor] = {}
        # Text injected into the targets: the teacher fuses the intact image WITH the text.
        fused = t.fuse(img, txt, text_mask, mode, return_text_to_image_attn=guided)
        if guided:
            out["relevance"] = fused.text_to_image_attn[:, 1:]  # drop [CLS]: (B, T*N)
        if semantic:
            out["logits"] = t.prototype_head(fused.image_states)  # (B, 1 + T*N, Kp)
        return out

    @torch.no_grad()
    def _momentum_features(self, images, ids, text_mask) -> dict:
        """ALBEF's momentum features (B, E) of the intact image and text: queue and soft targets."""
        t = self.itc_teacher
        return {"img_emb": t.image_embedding(t.encode_image(images)),
                "txt_emb": t.text_embedding(t.encode_text(ids, text_mask))}

    def _make_mask(self, batch_size: int, device, teacher_out, generator, ratio: float,
                   text_guided: bool, num_frames: int = 1) -> MaskSpec:
        """(B, N) MaskSpec over one frame's N positions; on clips the tube mask of all T frames.

        Noise is drawn for the GLOBAL batch from a generator seeded alike on every rank, and each
        rank takes its rows: a sample's mask does not depend on how the batch is split over ranks.
        The noise is (B, N) whatever T (one draw per position, shared by the frames), so the draws
        and the masks do not depend on T either."""
        m, n = self.cfg.masking, self.student.num_patches
        rank, world = _rank_world()
        gen_device = generator.device if generator is not None else device
        noise = torch.rand((batch_size * world, n), generator=generator, device=gen_device)
        noise = noise[rank * batch_size:(rank + 1) * batch_size].to(device)
        if text_guided:
            return text_guided_masking(teacher_out["relevance"], ratio, m.guided_randomness, noise=noise,
                                       num_frames=num_frames)
        return random_masking(batch_size, n, ratio, device, noise=noise)

    def _patch_dropout_keep(self, batch_size: int, device, generator, num_frames: int) -> torch.Tensor | None:
        """keep_ids (B, K) of the unimodal pass under FLIP patch dropout (K = N(1 - patch_dropout),
        random per sample, the same in every frame), or None: every patch, as in evaluation
        (module.eval()) and fine-tuning. Drawn after the masked-image passes' masks, so those
        stay the masks a run without patch dropout draws."""
        if not self.training or self.patch_dropout == 0.0:
            return None
        return self._make_mask(batch_size, device, None, generator, self.patch_dropout, False, num_frames).keep_ids

    def _itc(self, img_emb, txt_emb, teacher_out, image_ids) -> torch.Tensor:
        """This rank's rows of ITC against the gathered columns (+ the queue): B x (W*B + Q) logits
        per rank, the gradients of the global loss once DeepSpeed averages them (objectives/itc.py)."""
        cfg = self.cfg.itc
        ids_all = gather_features(image_ids, with_grad=False)
        positives = ids_all if cfg.same_image_positives else None
        rows = local_rows(img_emb.shape[0])
        if cfg.queue_size == 0:
            return itc_loss(gather_features(img_emb), gather_features(txt_emb), self.temp, image_ids=positives,
                            rows=rows)
        img_m = gather_features(teacher_out["img_emb"], with_grad=False)
        txt_m = gather_features(teacher_out["txt_emb"], with_grad=False)
        loss = itc_distill_loss(img_emb, txt_emb, img_m, txt_m,
                                self.image_queue, self.text_queue, self.temp, self.distill_alpha, image_ids=positives,
                                queue_ids=self.queue_image_ids if positives is not None else None, rows=rows)
        self._enqueue(img_m, txt_m, ids_all)
        return loss

    @torch.no_grad()
    def _enqueue(self, img_m: torch.Tensor, txt_m: torch.Tensor, image_ids: torch.Tensor) -> None:
        """Ring buffer of gathered momentum features and their image ids (identical on every rank)."""
        enqueue_momentum_features_(self, img_m, txt_m, image_ids)

    def _scl(self, masked_image: FusionOutput, masked_text: FusionOutput, intact: FusionOutput | None,
             image_ids: torch.Tensor) -> torch.Tensor:
        """SCL of this rank's rows against the gathered batch; targets per `scl.targets` (see
        objectives/scl.py), detached."""
        cfg = self.cfg.scl
        if cfg.targets == "cross":  # IIGROUP/SCL: each modality's target from the pass where it is intact
            v_target, t_target = masked_text.image_global, masked_image.text_global
        else:
            v_target, t_target = intact.image_global, intact.text_global
        ids = gather_features(image_ids, with_grad=False) if cfg.same_image_positives else None
        return scl_loss(gather_features(masked_image.image_global),
                        gather_features(v_target.detach(), with_grad=False),
                        gather_features(masked_text.text_global),
                        gather_features(t_target.detach(), with_grad=False),
                        temperature=cfg.temperature, image_ids=ids, rows=local_rows(image_ids.shape[0]))

    def _fused_pass(self, img, txt, img_emb, txt_emb, batch, mode, generator, with_itm: bool):
        """One fusion call over [positives ; (neg image, text) ; (image, neg text)] (ALBEF's ITM batch).

        Negatives come from the GLOBAL batch (as BLIP), drawn alike on every rank; only the picked rows'
        tokens cross ranks (`itm_pairs`, shared with retrieval fine-tuning: a RowPlan all_to_all, not an
        all-gather of every rank's token tensors). So the ITM loss does not depend on the world size, a
        negative can be any sample of the step, and the bytes per rank do not grow with the world size.
        Returns the positives' FusionOutput and the loss.
        """
        s, B, text_mask = self.student, img.shape[0], batch["attention_mask"]
        if not with_itm:
            return s.fuse(img, txt, text_mask, mode), {}
        images, texts, masks, labels = itm_pairs(img, txt, text_mask, batch["image_ids"], img_emb, txt_emb,
                                                 self.temp, hard=self.cfg.itm.hard_negatives, generator=generator)
        fused = s.fuse(images, texts, masks, mode)
        logits = s.itm_head(fused.image_global, fused.text_global)
        return _first_rows(fused, B), {"itm": itm_loss(logits, labels)}

    def _mlm(self, text_states, labels, count: int | None = None) -> torch.Tensor:
        """Mean over the masked tokens of the GLOBAL batch: this rank's sum over the global count, times
        the world size (gradients are averaged over ranks). The vocabulary head runs on masked tokens only.

        count: this rank's number of masked tokens, counted on the host from the CPU batch (the
        engine's `to_device` adds it as batch["mlm_count"]). With it the masked tokens are taken by a
        fixed-size stable sort (row-major order, as boolean indexing) and the step does not wait on the
        device; without it, boolean indexing (one host sync to size the result)."""
        picked = labels != -100
        if count is None:
            states, targets = text_states[picked], labels[picked]
        else:
            order = torch.argsort((~picked).flatten().to(torch.uint8), stable=True)[:count]
            states, targets = text_states.flatten(0, 1)[order], labels.flatten()[order]
        logits = self.student.mlm_head(states)
        local_sum = mlm_loss(logits.unsqueeze(0), targets.unsqueeze(0)) * picked.sum()
        _, world = _rank_world()
        count_all = picked.sum().float()
        if world > 1:
            count_all = all_reduce_mean(count_all) * world
        return local_sum * world / count_all.clamp_min(1.0)

    def _semantic_mim(self, global_BW, decoded_masked_XMD, tube: MaskSpec, teacher_out) -> torch.Tensor:
        """SemMIM on the masked (frame, position) pairs and the clip global; see mim_semantic.py.

        global_BW: the fused clip [CLS] of the masked pass; decoded_masked_XMD (B*T, M, Dd): decoder
        states at every frame's masked positions; tube: the mask as B*T rows (`MaskSpec.per_frame`).
        Teacher targets: its prototype logits on the INTACT clip fused with the text, (B, 1 + T*N, Kp),
        read at the same (frame, position) pairs and at the clip [CLS]."""
        cfg, s = self.cfg.mim_sem, self.student
        t_logits = teacher_out["logits"]
        rows, n = tube.ids_masked.shape[0], self.student.num_patches
        t_patch_XNK = t_logits[:, 1:].reshape(rows, n, t_logits.shape[-1])  # frame-major, as the tokens
        t_global, t_patch = t_logits[:, 0], gather_tokens(t_patch_XNK, tube.ids_masked)
        s_global = s.prototype_head(global_BW)
        s_patch = s.prototype_head(s.decoder.semantic(decoded_masked_XMD))
        patch = semantic_mim_loss(s_patch, t_patch, self.center_patch, cfg.student_temp, cfg.teacher_temp)
        agree = semantic_mim_loss(s_global, t_global, self.center_global, cfg.student_temp, cfg.teacher_temp)
        self.center_patch.copy_(update_center(self.center_patch, t_patch, cfg.center_momentum))
        self.center_global.copy_(update_center(self.center_global, t_global, cfg.center_momentum))
        return patch + cfg.global_weight * agree


# ---------------------------------------------------------------------------------- the task
def first_epoch_steps(loader, global_batch: int) -> int:
    """Optimizer steps of the first epoch, over which ALBEF ramps the distillation weight (its
    len(data_loader)); image+video: the streams' epochs together."""
    from megavl.data.mixed import MixedTrainLoader

    streams = loader.streams.values() if isinstance(loader, MixedTrainLoader) else [loader]
    return max(1, sum(stream.plan.epoch_length for stream in streams) // global_batch)


def pretrain_params(module: PretrainModule) -> TrainedParameters:
    """The student and the ITC temperature (the teacher is not trained); the fusion stack and the
    heads (and the temperature) at optim.fusion_lr_mult."""
    student = module.student
    return TrainedParameters(
        named=[(n, p) for n, p in module.student_parameters() if p.requires_grad],
        no_decay={f"student.{n}" for n in student.no_weight_decay()} | {"temp"},
        fast=tuple(f"student.{p}" for p in student.fusion_and_head_prefixes()) + ("temp",),
        layers={f"student.{n}": where for n, where in student.lr_layers().items()})


def load_weights(module: PretrainModule, state: dict, source_cfg: ModelConfig, source_name: str) -> None:
    """Continued pre-training (e.g. image-text weights -> video-text): student and teacher start
    from the same weights (tasks/base.load_backbone: resolution and frames may differ)."""
    from megavl.tasks.base import load_backbone

    load_backbone(module.student, state, source_cfg, source_name)
    for teacher in module.ema_teachers().values():
        teacher.load_state_dict(module.student.state_dict(), strict=False)  # its parts only


def build(cfg: Config, env: TaskEnv) -> Task:
    """Pre-training as a Task: the curriculum's mode and the data's modality per step, the EMA
    teacher after each step, retrieval on data.val_shards as its evaluation (no best/)."""
    from megavl.data import build_train_loader
    from megavl.data.modality import MODALITIES, MODALITY_IDS, check_clip_model
    from megavl.tasks.curriculum import MODE_IDS, mode_at, objectives_by_mode
    from megavl.tasks.pretrain_eval import pretrain_evaluation
    from megavl.tasks.pretrain_flops import step_flops
    from megavl.tasks.pretrain_visuals import log_mask_images

    run, data = cfg.run, cfg.data
    module = PretrainModule(cfg.model, cfg.objectives, objectives_by_mode(cfg.curriculum))
    loader = build_train_loader(data, rank=env.rank, world_size=env.world_size,
                                mlm_prob=cfg.objectives.masking.text_mask_prob,
                                scl_mask_prob=cfg.objectives.scl.text_mask_prob,
                                global_batch_size=run.global_batch_size
                                or data.batch_size * run.grad_accum * env.world_size)
    check_clip_model(loader.modalities, data.num_frames, cfg.model.vision.num_frames)

    global_batch = run.global_batch_size or data.batch_size * run.grad_accum * env.world_size
    steps_per_epoch = first_epoch_steps(loader, global_batch)

    def before_step(step: int) -> StepPlan:
        mode = mode_at(step, loader.epoch, cfg.curriculum)
        modality = loader.modality_at(step)  # every rank alike (data/modality.py)
        alpha = module.set_step(step, steps_per_epoch)
        # every step: the curriculum alternates, the modality follows its schedule
        return StepPlan(forward_args={"mode": mode}, progress={"mode": MODE_IDS[mode]}, log_scalars=alpha,
                        every_step_scalars={"curriculum/mode": MODE_IDS[mode],
                                            "data/modality": MODALITY_IDS[modality]},
                        info={"mode": mode, "modality": modality}, trace_kind=f"{mode}/{modality}")

    def after_step(step: int) -> dict:
        return module.update_teachers(step, run.max_steps)

    def log_scalars(plan: StepPlan, batch: dict) -> dict:
        consumed = loader.samples_consumed()  # global counts, the same on every rank
        # the temperature the last forward's ITC loss used (the clamped working copy)
        return {"train/itc_temperature": float(module.temperature_used),
                **{f"data/samples/{kind}": consumed.get(kind, 0) for kind in MODALITIES}}

    def flops(plan: StepPlan, batch: dict, global_batch: int) -> float:
        mode = plan.info["mode"]
        num_mlm = int((batch["mlm_labels"] != -100).sum()) * env.world_size
        return step_flops(cfg.model, cfg.objectives, module.active(mode), mode, global_batch,
                          batch["input_ids"].shape[1], num_mlm * run.grad_accum,
                          num_frames=batch["images"].shape[1] if batch["images"].ndim == 5 else 1).total

    def visualize(step: int, plan: StepPlan, batch: dict, monitor) -> None:
        if plan.info["modality"] == "image":  # a clip has no single picture; every rank agrees
            log_mask_images(module, batch, plan.info["mode"], monitor, step, cfg)

    evaluate, report = pretrain_evaluation(cfg, module, env)
    return Task(name="pretrain", module=module, params=pretrain_params(module), train_loader=loader,
                load_weights=partial(load_weights, module), evaluate=evaluate,
                has_val=bool(data.val_shards) or bool(run.eval_zeroshot_images),
                report=report, before_step=before_step, after_optimizer_step=module.clamp_temperature,
                after_step=after_step, log_scalars=log_scalars, step_flops=flops, visualize=visualize,
                evaluate_first=True)
