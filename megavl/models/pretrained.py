"""Load a model exported by `megavl-export` for fine-tuning: `megavl.load_pretrained(OUT)`."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml
from safetensors.torch import load_file

from megavl.config import ModelConfig, config_from_dict

from .vlp import VLPModel


def load_pretrained(path: str | Path, strict: bool = True) -> VLPModel:
    """A VLPModel with the exported weights, built from the exported config (no hub access)."""
    path = Path(path)
    data = yaml.safe_load((path / "config.yaml").read_text())
    # The weights come from the export, not from the original init checkpoints (which need not exist
    # here); the exported config already holds the architecture read from them.
    data["model"]["text"]["hf_path"] = ""
    data["model"]["vision"]["init"] = ""
    cfg = config_from_dict(data)
    model = VLPModel(cfg.model)
    missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    if strict and (missing or unexpected):
        raise ValueError(f"{path}: weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def without_init_files(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with no initial-weight files (model.vision.init, model.text.hf_path): the architecture
    they were read from stays in the other fields. A model whose weights come from a checkpoint or
    an export is built this way, so those files are never read again and may have moved."""
    vision = dataclasses.replace(cfg.vision, init="")
    text = dataclasses.replace(cfg.text, hf_path="")
    return dataclasses.replace(cfg, vision=vision, text=text)
