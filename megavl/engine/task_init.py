"""Initial weights of a fine-tuning run: `task.init_from` = a megavl-export directory
(model.safetensors + config.yaml) or a checkpoint directory (a tag dir, or a checkpoints dir with
`latest`, of a pre-training or fine-tuning run; ZeRO shards are merged). Returns the weights and
the architecture they were trained with; tasks/base.load_backbone checks and loads them. The source
run's own init files (model.vision.init, model.text.hf_path) are provenance: never read or required.

An export is read without unpickling, by every rank. A checkpoint directory holds DeepSpeed's
pickles: unless it is this run's own, it needs --trust-checkpoint (engine/trust.py), and rank 0
alone merges it and shares the result."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from megavl.config import Config, ConfigError, ModelConfig, config_from_saved

from .export import _resolve, consolidated_state_dict
from .trust import read_once


def read_init(path: str, trust: bool = False, own_checkpoints: Path | None = None,
              scratch: Path | None = None) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """(weights, their model config) from `task.init_from`; a collective when distributed (every
    rank calls it). trust: --trust-checkpoint; own_checkpoints: this run's checkpoints directory
    (trusted); scratch: where rank 0 leaves a checkpoint's merged weights for the other ranks."""
    key = f"task.init_from={path}"
    root = Path(path)
    if not root.is_dir():  # checked here, not at config load: saved configs keep the path after it moves
        raise ConfigError(f"{key}: not a directory (a megavl-export or checkpoint directory)")
    try:
        saved = saved_model_config(root)  # YAML: read before any weights
    except FileNotFoundError as err:
        raise ConfigError(f"{key}: {err}") from None
    if saved is None:
        raise ConfigError(f"{key}: no config.yaml with the weights' architecture")
    if (root / "model.safetensors").is_file():
        return load_file(str(root / "model.safetensors")), saved
    ckpt_dir, tag = _resolve(root)
    state = read_once("task.init_from=", ckpt_dir / tag, lambda: consolidated_state_dict(ckpt_dir, tag), trust,
                      own_checkpoints, scratch)
    return state, saved


def _saved_config_file(path: str | Path) -> Path | None:
    """The config.yaml saved with the weights in `path` (an export, a checkpoint tag dir or a
    checkpoints dir with `latest`); None where there is none."""
    root = Path(path)
    if (root / "model.safetensors").is_file():
        config = root / "config.yaml"
    else:
        ckpt_dir, tag = _resolve(root)
        config = ckpt_dir / tag / "config.yaml"
        if not config.is_file():
            config = ckpt_dir.parent / "config.yaml"
    return config if config.is_file() else None


def saved_model_config(path: str | Path) -> ModelConfig | None:
    """The model config that the weights in `path` were written with; None where no config.yaml
    was saved with them."""
    config = _saved_config_file(path)
    return config_from_saved(yaml.safe_load(config.read_text())).model if config is not None else None


def config_for_weights(cfg: Config, source: str | Path) -> Config:
    """The run's config when its weights come from `source` (the checkpoint it resumes, or
    task.init_from): its model is then built with models.pretrained.without_init_files, and its
    checkpoints save this config. Where the recipe and the source both take the text tower from
    model.text.hf_path, the tower's fields are the source's: once the directory is gone the recipe
    holds only what it wrote, not what config.json filled in (BERT's dropout, or the whole shape).
    A field the saved config lacks (written before the field existed) keeps the recipe's value,
    which load_config filled from config.json while the directory was there."""
    if not cfg.model.text.hf_path:
        return cfg
    config = _saved_config_file(source)
    if config is None:
        return cfg
    data = yaml.safe_load(config.read_text())
    saved = config_from_saved(data).model
    if not saved.text.hf_path:
        return cfg
    written = set(((data.get("model") or {}).get("text") or {}).keys())
    kept = {f.name: getattr(cfg.model.text, f.name) for f in dataclasses.fields(saved.text)
            if f.name not in written}
    text = dataclasses.replace(saved.text, **{**kept, "hf_path": cfg.model.text.hf_path})
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, text=text))
