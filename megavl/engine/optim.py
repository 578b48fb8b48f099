"""AdamW parameter groups and the warmup + cosine/linear learning-rate schedule.

Groups: {decay, no decay} x {towers, fusion and heads} x {the rest, the temporal embedding}. No
decay on biases, norms and embeddings; the fusion stack and heads train at `fusion_lr_mult` x the
base rate (SCL: x5), the vision tower's temporal embedding at `temporal_lr_mult` x.

Why the temporal embedding gets its own rate: it starts at zero (an image checkpoint knows no frame
order), and at the tower's rate it stays small next to the patch tokens: on clips whose reversed twins
are in the data (bench_video_retrieval's), a supervised tiny ViT then learns the axis of a motion but
not its direction (val 51% of 6-way, reversed clips scored the same). At x10 the same run reaches 89%,
and reversing the clips drops it to 6% (experiments/probe_video_motion.py supervised, 1,500 steps).
"""
from __future__ import annotations

import math

import torch

from megavl.config import OptimConfig
from megavl.tasks.task import TrainedParameters

from .layer_decay import layer_scales


TEMPORAL_EMBED = "vision.temporal_embed"  # its name under the VLP model


def group_lr(cfg: OptimConfig, fast: bool, temporal: bool) -> float:
    """The base rate of a group: lr x fusion_lr_mult for fusion and heads, x temporal_lr_mult for the
    temporal embedding."""
    return cfg.lr * (cfg.fusion_lr_mult if fast else 1.0) * (cfg.temporal_lr_mult if temporal else 1.0)


def predates_temporal_group(saved_schedule: dict, model: torch.nn.Module) -> bool:
    """A clip model's checkpoint saved before the temporal embedding had a group of its own (its
    schedule settings have no temporal_lr_mult): its optimizer groups are laid out differently."""
    return "temporal_lr_mult" not in saved_schedule and getattr(model.vision, "temporal_embed", None) is not None


def param_groups(trained: TrainedParameters, cfg: OptimConfig) -> list[dict]:
    """AdamW groups over a task's trained parameters (see the module docstring); each group keeps its
    parameters' names (checkpoints and resharding pair them by name). With optim.layer_decay < 1 each
    tower layer's parameters form groups of their own, at the layer's scale (engine/layer_decay.py)."""
    scales = layer_scales(trained, cfg)
    groups: dict[tuple[bool, bool, bool, float], dict] = {}
    for name, p in trained.named:
        if not p.requires_grad:
            continue
        key = (name in trained.no_decay or p.ndim <= 1, name.startswith(trained.fast),
               name == f"student.{TEMPORAL_EMBED}", scales.get(name, 1.0))
        group = groups.setdefault(key, {
            "params": [], "names": [],
            "weight_decay": 0.0 if key[0] else cfg.weight_decay,
            "lr": group_lr(cfg, key[1], key[2]) * key[3],
        })
        group["params"].append(p)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Linear warmup from 0 to 1 over warmup_steps, then cosine or linear decay to min_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


class AdamW(torch.optim.AdamW):
    """torch's AdamW; with a `skip_plan` (engine/unused.py, optim.skip_unused) each step leaves the
    segments of parameters the step did not use as they were and recounts the bias correction of
    parameters that sat out earlier steps. DeepSpeed calls this step on its flat fp32 partitions."""

    skip_plan = None

    def step(self, closure=None):
        plan = self.skip_plan
        if plan is None:
            return super().step(closure)
        saved = [(group, p, plan.save(p, self.state[p])) for group in self.param_groups for p in group["params"]]
        loss = super().step(closure)
        for group, p, kept in saved:
            if kept:
                plan.restore(p, self.state[p], group, kept)
        return loss


def build_optimizer(groups: list[dict], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    # "names" is ours: torch's optimizer keeps extra group keys and they survive in state_dict.
    fused = device.type == "cuda"
    return AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.warmup_steps, total_steps, cfg.schedule, cfg.min_lr_ratio))
