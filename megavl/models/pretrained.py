"""Load a model exported by `megavl-export` for fine-tuning: `megavl.load_pretrained(OUT)`."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml
from safetensors.torch import load_file

from megavl.config import ModelConfig, config_from_saved

from .vlp import VLPModel


def load_pretrained(path: str | Path, strict: bool = True) -> VLPModel:
    """A VLPModel with the exported weights, built from the exported config (no hub access)."""
    path = Path(path)
    cfg = config_from_saved(yaml.safe_load((path / "config.yaml").read_text()))
    model = VLPModel(without_init_files(cfg.model))
    missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    if strict and (missing or unexpected):
        raise ValueError(f"{path}: weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def without_init_files(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with no initial-weight files (model.vision.init, model.text.hf_path): the architecture
    they were read from (and BERT's dropout and padding row) stays in the other fields. A model whose weights come from a checkpoint or
    an export is built this way, so those files are never read again and may have moved."""
    vision = dataclasses.replace(cfg.vision, init="")
    text = dataclasses.replace(cfg.text, hf_path="")
    return dataclasses.replace(cfg, vision=vision, text=text)
