"""Fill a DeepSpeed JSON config from the recipe, or check it against the recipe.

Batch sizes, precision and clipping live in the recipe; the JSON files in ds_configs/ say "auto"
for them. A number in the JSON must agree with the recipe: micro x accumulation x world must equal
the global batch, checked before any compute.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from megavl.config import Config, ConfigError

AUTO = "auto"


def _fill(ds: dict, key: str, value, source: str) -> None:
    current = ds.get(key, AUTO)
    if current == AUTO:
        ds[key] = value
    elif current != value:
        raise ConfigError(f"ds_config {key}={current} disagrees with the recipe ({source} gives {value}); "
                          f"set it to \"auto\" or make them equal")


def resolve_precision(cfg: Config, device: torch.device) -> str:
    if cfg.run.precision != "auto":
        if cfg.run.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("run.precision: bf16 was requested but this GPU does not support it")
        return cfg.run.precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def build_ds_config(path: str | Path, cfg: Config, world_size: int, device: torch.device) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--ds_config: file not found: {path}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"--ds_config {path}: not valid JSON: {err}") from None
    micro, accum = cfg.data.batch_size, cfg.run.grad_accum
    global_batch = cfg.run.global_batch_size or micro * accum * world_size
    if micro * accum * world_size != global_batch:
        raise ConfigError(
            f"run.global_batch_size={global_batch} != data.batch_size ({micro}) x run.grad_accum ({accum}) "
            f"x world size ({world_size}) = {micro * accum * world_size}")
    _fill(ds, "train_micro_batch_size_per_gpu", micro, "data.batch_size")
    _fill(ds, "gradient_accumulation_steps", accum, "run.grad_accum")
    _fill(ds, "train_batch_size", global_batch, "data.batch_size x run.grad_accum x world")
    _fill(ds, "gradient_clipping", cfg.optim.grad_clip, "optim.grad_clip")
    precision = resolve_precision(cfg, device)
    bf16 = ds.setdefault("bf16", {})
    if bf16.get("enabled", AUTO) == AUTO:
        bf16["enabled"] = precision == "bf16"
    elif bool(bf16["enabled"]) != (precision == "bf16"):
        raise ConfigError(f"ds_config bf16.enabled={bf16['enabled']} disagrees with run.precision={precision}")
    if ds.get("fp16", {}).get("enabled") is True:
        raise ConfigError("ds_config fp16 is not supported: use bf16 (no loss scaling needed)")
    # megavl logs itself; DeepSpeed's own monitors would write a second, differently named set.
    for monitor in ("tensorboard", "wandb", "csv_monitor", "comet"):
        ds.setdefault(monitor, {})["enabled"] = False
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
