"""What every fine-tuning task shares: initial weights from a pre-trained model, the fused [CLS]
of an image-text pair, the gathering of per-rank evaluation outputs, the loaders and the trained
parameters of a Task (tasks/task.py).

Initial weights: `load_backbone(model, state, source_cfg)` copies a pre-trained VLPModel state
(an export's model.safetensors, or a checkpoint's "student."/"model." weights, read by the engine)
into the task's VLPModel. The architecture must agree field by field (a clear error names every
field that differs); only the image resolution and the number of frames may change. Position
embeddings are then resampled to the fine-tuning grid (bicubic, as timm/ALBEF's
interpolate_pos_embed). The temporal table follows model.vision.num_frames (fit_temporal_table):
an image-only model's weights start a video model with the table at zero (each frame then encodes
as the image did), a table of other length is resampled, and a video model's table folds into the
position embedding of an image-only target (its images encode exactly as before).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch
import torch.distributed as dist

from megavl.config import ModelConfig
from megavl.data.build import build_task_collators, build_task_loader
from megavl.data.task_data import TaskLoader, TaskTrainStream
from megavl.models.vision import resample_pos_embed, resample_temporal_embed
from megavl.models.vlp import VLPModel
from megavl.tasks.task import TrainedParameters

log = logging.getLogger(__name__)

# Fields allowed to differ between the pre-trained and the fine-tuning model: the input size
# (position and temporal tables are resampled), regularisation and how the same weights compute.
_FREE_FIELDS = {"vision.img_size", "vision.num_frames", "vision.drop_path", "vision.patch_dropout",
                "text.dropout", "text.attn_dropout", "attention", "grad_checkpointing"}
# Where a tower's first weights came from: provenance, not architecture. The architecture read
# from those files is in the other fields; the files may have moved or never be read again.
_PROVENANCE_FIELDS = {"vision.init", "vision.init_format", "text.hf_path"}
_PREFIXES = ("student.", "model.")


def _flat(obj, prefix: str = "") -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_flat(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def architecture_mismatch(source: ModelConfig, target: ModelConfig) -> list[str]:
    """'field: source -> target' for every architecture field that differs (the free and provenance
    fields above excepted)."""
    a, b = _flat(source), _flat(target)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in _FREE_FIELDS | _PROVENANCE_FIELDS and a.get(k) != b.get(k)]


def backbone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A VLPModel state from an export (bare names) or a module checkpoint (student./model.)."""
    for prefix in _PREFIXES:
        picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if picked:
            return picked
    return dict(state)


def load_backbone(model: VLPModel, state: dict[str, torch.Tensor], source_cfg: ModelConfig,
                  source_name: str = "the initial weights") -> None:
    """Copy pre-trained weights into `model` (see the module docstring). Raises ValueError on any
    architecture difference, missing or unexpected weight."""
    problems = architecture_mismatch(source_cfg, model.cfg)
    if problems:
        raise ValueError(f"{source_name} and the recipe's model disagree: " + "; ".join(problems))
    state = backbone_state(state)
    old_grid = tuple(s // source_cfg.vision.patch_size for s in _pair(source_cfg.vision.img_size))
    new_grid = model.vision.grid_size
    if old_grid != new_grid:
        # the ViT's table has a [CLS] row; the MAE decoder's (N, D) table has none
        for key, prefix in (("vision.pos_embed", 1), ("decoder.pos_embed", 0)):
            if key in state:
                table = state[key].float()
                table = table if table.dim() == 3 else table[None]
                resampled = resample_pos_embed(table, new_grid, old_grid, prefix)
                state[key] = resampled if state[key].dim() == 3 else resampled[0]
        log.info("resampled the position embeddings from grid %s to %s", old_grid, new_grid)
    fit_temporal_table(state, source_cfg.vision.num_frames, model.vision.num_frames)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{source_name}: weights do not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def fit_temporal_table(state: dict[str, torch.Tensor], source_frames: int, target_frames: int) -> None:
    """Make state's "vision.temporal_embed" fit a ViT built with `target_frames` (in place).

    1 -> T: a zero table (SCL's image-to-video start: T copies of the image encoder, mixed only by
    the [CLS] attention). T -> T': resampled as VisionTransformer.temporal_embedding does. T -> 1:
    the table is dropped; the source encoded images (1-frame clips) without it too."""
    key = "vision.temporal_embed"
    table_TE = state.pop(key, None)
    if target_frames > 1:
        width = state["vision.cls_token"].shape[-1]
        if table_TE is None:
            state[key] = torch.zeros(target_frames, width, dtype=state["vision.cls_token"].dtype)
        elif source_frames == target_frames:
            state[key] = table_TE
        else:
            state[key] = resample_temporal_embed(table_TE.float(), target_frames).to(table_TE.dtype)
        if table_TE is None or source_frames != target_frames:
            log.info("temporal embedding: %s -> %d frames", "none in the source" if table_TE is None
                     else f"{source_frames} frames, resampled", target_frames)
    elif table_TE is not None:
        log.info("temporal embedding of %d frames dropped (an image-only target)", source_frames)


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def pooled_pair(model: VLPModel, images: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """METER/SCL's pooled feature of each (image, text) pair: the fused image and text [CLS]
    concatenated, (B, 2W)."""
    img = model.encode_image(images)
    txt = model.encode_text(input_ids, attention_mask)
    fused = model.fuse(img, txt, attention_mask, mode)
    return torch.cat([fused.image_global, fused.text_global], dim=-1)


def mlp_head(in_width: int, hidden: int, out: int) -> torch.nn.Sequential:
    """METER's classifier: Linear -> LayerNorm -> GELU -> Linear."""
    nn = torch.nn
    return nn.Sequential(nn.Linear(in_width, hidden), nn.LayerNorm(hidden), nn.GELU(),
                         nn.Linear(hidden, out))


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_objects(local: list) -> list:
    """Concatenation of every rank's list, on every rank (rank order)."""
    _, world = rank_world()
    if world == 1:
        return list(local)
    parts: list = [None] * world
    dist.all_gather_object(parts, local)
    return [x for part in parts for x in part]


# ------------------------------------------------------------------- shared pieces of a task
# the fusion/head lr multiplier (SCL: x5) of the fine-tuning modules
FINETUNE_FAST = ("head.", "temp", "student.fusion.", "student.itm_head.", "student.vision_proj.",
                 "student.text_proj.")


def finetune_params(module: torch.nn.Module) -> TrainedParameters:
    """A fine-tuning module's trained parameters (everything but a frozen teacher): no decay for
    the student's biases/norms/embeddings and the temperature; fusion and heads at fusion_lr_mult;
    the towers' layers for optim.layer_decay."""
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    no_decay = {f"student.{n}" for n in module.student.no_weight_decay()} | {"temp"}
    layers = {f"student.{n}": where for n, where in module.student.lr_layers().items()}
    return TrainedParameters(named, no_decay, FINETUNE_FAST, layers)


def student_loader(module: torch.nn.Module) -> Callable[[dict, ModelConfig, str], None]:
    """Task.load_weights of a task whose pre-trained weights go to `module.student` alone."""
    def load(state: dict, source_cfg: ModelConfig, source_name: str) -> None:
        load_backbone(module.student, state, source_cfg, source_name)
    return load


def collators(cfg, tokenizer, video: bool = False, keep_batch_size: bool = False):
    """(train, eval) TaskCollators from the data config: ALBEF train augmentation and eval resize
    (video: on clips of data.num_frames frames; keep_batch_size: see TaskCollator)."""
    return build_task_collators(cfg.data, tokenizer, video=video, keep_batch_size=keep_batch_size)


def loader(items, to_fields, collator, cfg, *, train: bool, video: bool = False) -> "TaskLoader":
    """A TaskLoader over items whose paths are images, or videos (decoded as data.num_frames frames)."""
    rank, world = rank_world()
    return build_task_loader(items, to_fields, collator, cfg.data, rank=rank, world=world,
                             seed=cfg.run.seed, train=train, video=video,
                             global_batch_size=cfg.run.global_batch_size
                             or cfg.data.batch_size * cfg.run.grad_accum * world)


def train_stream(items, to_fields, collator, cfg, *, video: bool = False) -> TaskTrainStream:
    """The endless, resumable training stream of a task (data/task_data.py:TaskTrainStream)."""
    return TaskTrainStream(loader(items, to_fields, collator, cfg, train=True, video=video))


def split_file(cfg, split: str) -> str:
    path = {"val": cfg.task.val, "test": cfg.task.test}[split]
    if not path:
        raise ValueError(f"task.{split} is not set: no {split} split to evaluate")
    return path


@torch.no_grad()
def eval_logits(module: torch.nn.Module, loader, device, dtype):
    """Yield (batch, fp32 CPU class logits) over a classification task's eval loader, the module in
    eval mode (its previous mode restored afterwards) and autocast to the compute dtype."""
    was_training = module.training
    module.eval()
    try:
        for batch in loader:
            with torch.autocast(device_type=torch.device(device).type, dtype=dtype,
                                enabled=dtype != torch.float32):
                logits = module.logits({k: v.to(device) if torch.is_tensor(v) else v
                                        for k, v in batch.items()})
            yield batch, logits.float().cpu()
    finally:
        module.train(was_training)
