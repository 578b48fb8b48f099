"""Initial weights of a fine-tuning run: `task.init_from` = a megavl-export directory
(model.safetensors + config.yaml) or a checkpoint directory (a tag dir, or a checkpoints dir with
`latest`, of a pre-training or fine-tuning run; ZeRO shards are merged). Returns the weights and
the architecture they were trained with; tasks/base.load_backbone checks and loads them. The source
run's own init files (model.vision.init, model.text.hf_path) are provenance: never read or required."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from megavl.config import ModelConfig, config_from_saved

from .export import _resolve, consolidated_state_dict


def read_init(path: str) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    root = Path(path)
    if not root.is_dir():  # checked here, not at config load: saved configs keep the path after it moves
        raise FileNotFoundError(f"task.init_from={path}: not a directory (a megavl-export or checkpoint directory)")
    if (root / "model.safetensors").is_file():
        config = root / "config.yaml"
        state = load_file(str(root / "model.safetensors"))
    else:
        ckpt_dir, tag = _resolve(root)
        state = consolidated_state_dict(ckpt_dir, tag)
        config = ckpt_dir / tag / "config.yaml"
        if not config.is_file():
            config = ckpt_dir.parent / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"task.init_from={path}: no config.yaml with the weights' architecture")
    return state, config_from_saved(yaml.safe_load(config.read_text())).model
