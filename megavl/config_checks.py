"""The config checks: `ConfigError` and `validate`, the cross-field consistency rules of a loaded
`Config`, each raising ConfigError naming the dotted key.
"""
from __future__ import annotations

import multiprocessing
from typing import Any

from megavl.config_parts import OBJECTIVE_NAMES, Config, ModelConfig


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the key."""


# ---------------------------------------------------------------------------------- validation
def _check(cond: bool, key: str, expected: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def validate(cfg: Config) -> Config:
    """Cross-field consistency; raises ConfigError naming the key."""
    m, d, o, r = cfg.model, cfg.data, cfg.objectives, cfg.run
    _validate_task(cfg)
    v = m.vision
    _check(v.img_size % v.patch_size == 0, "model.vision.img_size",
           f"a multiple of model.vision.patch_size={v.patch_size}", v.img_size)
    for key, width, heads in [("model.vision", v.width, v.heads), ("model.text", m.text.width, m.text.heads),
                              ("model.fusion", m.fusion.width, m.fusion.heads),
                              ("model.decoder", m.decoder.width, m.decoder.heads)]:
        _check(heads > 0 and width % heads == 0, f"{key}.heads", f"a positive divisor of {key}.width={width}", heads)
    _check(m.attention in ("auto", "flash", "sdpa", "math"), "model.attention", "auto|flash|sdpa|math", m.attention)
    _validate_tower_choices(m)
    _check(d.image_size == v.img_size, "data.image_size", f"equal to model.vision.img_size={v.img_size}",
           d.image_size)
    _check(d.max_text_len <= m.text.max_position, "data.max_text_len",
           f"<= model.text.max_position={m.text.max_position}", d.max_text_len)
    _check(d.batch_size > 0, "data.batch_size", "> 0", d.batch_size)
    methods = multiprocessing.get_all_start_methods()
    _check(d.worker_start_method in ("", *methods), "data.worker_start_method",
           f"'' (the platform's default) or one of {'|'.join(methods)}", d.worker_start_method)
    _check(d.shuffle_buffer >= -1, "data.shuffle_buffer",
           ">= 0 samples per shuffle window, or -1 (the whole epoch)", d.shuffle_buffer)
    _check(d.num_frames >= 1, "data.num_frames", ">= 1", d.num_frames)
    _check(d.max_video_frames >= d.num_frames, "data.max_video_frames", f">= data.num_frames={d.num_frames}",
           d.max_video_frames)
    _check(d.video_share == -1.0 or 0.0 <= d.video_share <= 1.0, "data.video_share",
           "-1 (auto: by mixture weight) or a fraction in [0, 1]", d.video_share)
    _check(d.modality_block >= 1, "data.modality_block", ">= 1 step", d.modality_block)
    _check(d.modality_order in ("shuffled", "contiguous"), "data.modality_order", "shuffled|contiguous",
           d.modality_order)
    _check(not d.train_weights or len(d.train_weights) == len(d.train_shards), "data.train_weights",
           f"one weight per data.train_shards entry ({len(d.train_shards)})", d.train_weights)
    _check(all(w >= 0 for w in d.train_weights), "data.train_weights", "non-negative weights", d.train_weights)
    _check(len(d.train_crop_scale) == 2 and 0 < d.train_crop_scale[0] <= d.train_crop_scale[1] <= 1,
           "data.train_crop_scale", "[lo, hi] with 0 < lo <= hi <= 1", d.train_crop_scale)
    _check(len(d.mean) == 3 and len(d.std) == 3 and all(s > 0 for s in d.std), "data.mean/std",
           "three values each, std > 0", (d.mean, d.std))
    for name in OBJECTIVE_NAMES:
        w = getattr(o, name).weight
        _check(w >= 0, f"objectives.{name}.weight", ">= 0 (0 disables)", w)
    _check(bool(o.enabled()), "objectives", "at least one objective with weight > 0", o.enabled())
    mk = o.masking
    _check(0.0 < mk.image_mask_ratio < 1.0, "objectives.masking.image_mask_ratio", "a value in (0, 1)",
           mk.image_mask_ratio)
    _check(0.0 < mk.text_mask_prob < 1.0, "objectives.masking.text_mask_prob", "a value in (0, 1)",
           mk.text_mask_prob)
    _check(0.0 <= mk.guided_randomness <= 1.0, "objectives.masking.guided_randomness", "a value in [0, 1]",
           mk.guided_randomness)
    _check(0 < o.teacher.momentum <= o.teacher.momentum_end <= 1, "objectives.teacher.momentum",
           "0 < momentum <= momentum_end <= 1", (o.teacher.momentum, o.teacher.momentum_end))
    _check(0 <= o.itc.momentum <= 1, "objectives.itc.momentum", "a value in [0, 1]", o.itc.momentum)
    _check(o.itc.temp_min <= o.itc.temp_init <= o.itc.temp_max, "objectives.itc.temp_init",
           f"within [temp_min={o.itc.temp_min}, temp_max={o.itc.temp_max}]", o.itc.temp_init)
    _check(o.scl.targets in ("cross", "intact"), "objectives.scl.targets", "cross|intact", o.scl.targets)
    _check(0.0 <= o.scl.image_mask_ratio < 1.0, "objectives.scl.image_mask_ratio",
           "0 (share the MIM mask) or a value in (0, 1)", o.scl.image_mask_ratio)
    _check(0.0 <= o.scl.text_mask_prob < 1.0, "objectives.scl.text_mask_prob",
           "0 (share the MLM text) or a value in (0, 1)", o.scl.text_mask_prob)
    _check(cfg.optim.schedule in ("cosine", "linear"), "optim.schedule", "cosine|linear", cfg.optim.schedule)
    _check(len(cfg.optim.betas) == 2, "optim.betas", "two values", cfg.optim.betas)
    _check(0.0 <= cfg.optim.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "a value in [0, 1]", cfg.optim.min_lr_ratio)
    _check(0.0 < cfg.optim.layer_decay <= 1.0, "optim.layer_decay", "a value in (0, 1] (1 = off)",
           cfg.optim.layer_decay)
    _check(cfg.optim.text_layer_decay == -1.0 or 0.0 < cfg.optim.text_layer_decay <= 1.0, "optim.text_layer_decay",
           "-1 (= optim.layer_decay) or a value in (0, 1]", cfg.optim.text_layer_decay)
    for mult in ("fusion_lr_mult", "temporal_lr_mult"):
        _check(getattr(cfg.optim, mult) > 0, f"optim.{mult}", "> 0", getattr(cfg.optim, mult))
    _check(r.precision in ("auto", "bf16", "fp32"), "run.precision", "auto|bf16|fp32", r.precision)
    _check(r.max_steps > 0, "run.max_steps", "> 0", r.max_steps)
    _check(r.grad_accum > 0, "run.grad_accum", "> 0", r.grad_accum)
    _check(r.checkpoint_every > 0, "run.checkpoint_every", "> 0", r.checkpoint_every)
    _check(r.stop_check_every > 0, "run.stop_check_every", "> 0", r.stop_check_every)
    _check(r.keep_checkpoints > 0, "run.keep_checkpoints", "> 0", r.keep_checkpoints)
    _check(r.eval_itm_rerank_k >= 0, "run.eval_itm_rerank_k", ">= 0", r.eval_itm_rerank_k)
    _check(r.eval_rerank in ("itm", "itm+itc"), "run.eval_rerank", "itm|itm+itc", r.eval_rerank)
    _check(r.eval_mode in ("auto", "single", "two"), "run.eval_mode", "auto|single|two", r.eval_mode)
    _check(r.eval_mode != "two" or m.fusion.cross_attention, "run.eval_mode",
           "single|auto without cross-attention (model.fusion.cross_attention=false)", r.eval_mode)
    _check(r.eval_pair_batch > 0, "run.eval_pair_batch", "> 0", r.eval_pair_batch)
    zeroshot = {"images": r.eval_zeroshot_images, "classnames": r.eval_zeroshot_classnames,
                "templates": r.eval_zeroshot_templates}
    for key, value in zeroshot.items():
        _check(bool(value) == bool(r.eval_zeroshot_images), f"run.eval_zeroshot_{key}",
               "set together with run.eval_zeroshot_images/classnames/templates", value)
    _validate_curriculum(cfg)
    return cfg


VISION_INIT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
VISION_INIT_FORMATS = ("timm", "openclip")
VISION_ACTS = ("gelu", "quick_gelu")
MODEL_LAYOUTS = ("stacked", "albef")


def _validate_tower_choices(m: ModelConfig) -> None:
    """The towers' enumerated options. The init files themselves (model.vision.init,
    model.text.hf_path) are checked where they are read (models/vision_init.py, models/vlp.py): a
    resumed run or one started from task.init_from never reads them, so they need not exist."""
    v, t = m.vision, m.text
    _check(v.act in VISION_ACTS, "model.vision.act", "|".join(VISION_ACTS), v.act)
    _check(v.init_format in VISION_INIT_FORMATS, "model.vision.init_format", "|".join(VISION_INIT_FORMATS),
           v.init_format)
    _check(0.0 <= t.dropout < 1.0, "model.text.dropout", "a probability in [0, 1)", t.dropout)
    _check(0.0 <= t.attn_dropout < 1.0, "model.text.attn_dropout", "a probability in [0, 1)", t.attn_dropout)
    _check(0 <= t.pad_token_id < t.vocab_size, "model.text.pad_token_id",
           f"a token id below model.text.vocab_size={t.vocab_size}", t.pad_token_id)
    _check(0.0 <= v.patch_dropout < 1.0, "model.vision.patch_dropout",
           "a fraction of patches in [0, 1) (0 = off)", v.patch_dropout)
    _check(m.layout in MODEL_LAYOUTS, "model.layout", "|".join(MODEL_LAYOUTS), m.layout)
    if m.layout == "albef":
        _validate_albef_layout(m)


def _validate_albef_layout(m: ModelConfig) -> None:
    """The fusion layers ARE the BERT's upper layers: same width, heads and feed-forward."""
    f, t = m.fusion, m.text
    _check(1 <= f.depth < t.depth, "model.fusion.depth",
           f"1 .. model.text.depth - 1 = {t.depth - 1} with model.layout=albef (the text tower keeps the "
           f"layers below the fusion)", f.depth)
    _check(f.width == t.width, "model.fusion.width", f"model.text.width={t.width} with model.layout=albef",
           f.width)
    _check(f.heads == t.heads, "model.fusion.heads", f"model.text.heads={t.heads} with model.layout=albef",
           f.heads)
    _check(int(f.width * f.mlp_ratio) == t.intermediate, "model.fusion.mlp_ratio",
           f"model.text.intermediate / width = {t.intermediate / t.width:g} with model.layout=albef", f.mlp_ratio)


def _validate_task(cfg: Config) -> None:
    t = cfg.task
    from megavl.tasks import TASKS  # task names to module names: imports no task, nor torch

    _check(t.name in TASKS, "task.name", "|".join(TASKS), t.name)
    if t.name == "pretrain":
        return
    _check(bool(t.train), "task.train", "at least one annotation file", t.train)
    _check(t.retrieval_rerank in ("none", "itm", "itm+itc"), "task.retrieval_rerank", "none|itm|itm+itc",
           t.retrieval_rerank)
    _check(t.retrieval_k > 0, "task.retrieval_k", "> 0", t.retrieval_k)
    _check(t.min_answer_count >= 1, "task.min_answer_count", ">= 1", t.min_answer_count)
    _check(t.itc_queue_size >= 0, "task.itc_queue_size", ">= 0 (0 = no queue)", t.itc_queue_size)
    _check(0.0 <= t.itc_distill_alpha <= 1.0, "task.itc_distill_alpha", "a value in [0, 1]", t.itc_distill_alpha)
    _check(t.itc_distill_alpha == 0.0 or t.itc_queue_size > 0, "task.itc_distill_alpha",
           "0 without task.itc_queue_size (the queue's teacher gives the distillation targets)",
           t.itc_distill_alpha)
    _check(0.0 <= t.itc_momentum <= 1.0, "task.itc_momentum", "a value in [0, 1]", t.itc_momentum)
    _check(t.minival_images >= 0, "task.minival_images", ">= 0 (0 = no minival)", t.minival_images)
    _check(t.minival_images == 0 or not t.val, "task.minival_images",
           "0 when task.val is set (a minival file and a held-out minival exclude each other)", t.minival_images)
    _check(t.minival_images == 0 or t.name == "vqa", "task.minival_images", "0 unless task.name is vqa",
           t.minival_images)
    _check(t.itc_queue_size == 0 or t.name == "retrieval", "task.itc_queue_size",
           "0 unless task.name is retrieval", t.itc_queue_size)
    _check(t.fusion_mode in ("two", "single"), "task.fusion_mode", "two|single", t.fusion_mode)
    _check(t.fusion_mode == "single" or cfg.model.fusion.cross_attention, "task.fusion_mode",
           "single when model.fusion.cross_attention is false", t.fusion_mode)
    if t.video_root:
        _check(t.name == "retrieval", "task.video_root", "empty unless task.name is retrieval", t.video_root)
        _check(cfg.data.num_frames == 1 or cfg.model.vision.num_frames > 1, "data.num_frames",
               "1 when model.vision.num_frames is 1 (no temporal embedding to encode clips)",
               cfg.data.num_frames)


def _validate_curriculum(cfg: Config) -> None:
    c = cfg.curriculum
    modes = ("single", "two") if cfg.model.fusion.cross_attention else ("single",)
    _check(bool(c.cycle) or bool(c.epoch_modes), "curriculum.cycle", "a non-empty list of [mode, steps]", c.cycle)
    for i, phase in enumerate(c.cycle):
        ok = (isinstance(phase, list) and len(phase) == 2 and phase[0] in modes
              and isinstance(phase[1], int) and phase[1] > 0)
        _check(ok, f"curriculum.cycle[{i}]", f"[mode, steps] with mode in {modes} and steps > 0", phase)
    for i, mode in enumerate(c.epoch_modes):
        _check(mode in modes, f"curriculum.epoch_modes[{i}]", f"one of {modes}", mode)
    for key, names in [("curriculum.objectives_single", c.objectives_single),
                       ("curriculum.objectives_two", c.objectives_two)]:
        bad = [n for n in names if n not in OBJECTIVE_NAMES]
        _check(not bad, key, f"names from {OBJECTIVE_NAMES}", bad)

