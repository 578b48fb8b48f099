"""Layer-wise learning-rate decay (BEiT, EVA): lower layers of a pre-trained tower move less.

A tower of D layers numbers its parameters 0 (embeddings), i + 1 (layer i), D + 1 (its final norm);
the task says which (`TrainedParameters.layers`, from `VLPModel.lr_layers`). A parameter of layer id
l trains at its group's rate x decay^(D + 1 - l): the embeddings at decay^(D + 1), the top layer at
decay, the final norm and everything outside the towers (fusion, projections, heads) at 1. This is
BEiT's `LayerDecayValueAssigner` and EVA-CLIP's, applied per tower with the tower's own depth and
decay (EVA-CLIP's --visual-ld / --text-ld): `optim.layer_decay` for the vision tower, and for the text
tower too unless `optim.text_layer_decay` is set.

Example: ViT-B (12 blocks) at decay 0.65: block 11 at 0.65 x, block 0 at 0.65^12 = 0.0057 x, the patch
embedding at 0.0037 x the base rate.
"""
from __future__ import annotations

from megavl.config import OptimConfig
from megavl.tasks.task import TrainedParameters


def tower_decays(cfg: OptimConfig) -> dict[str, float]:
    """{tower: decay} from the config; text_layer_decay -1 means the vision tower's."""
    text = cfg.layer_decay if cfg.text_layer_decay == -1.0 else cfg.text_layer_decay
    return {"vision": cfg.layer_decay, "text": text}


def layer_scales(trained: TrainedParameters, cfg: OptimConfig) -> dict[str, float]:
    """{trained name: lr scale} for the parameters of a tower whose decay is below 1; a name not in
    the result trains at scale 1."""
    decays = tower_decays(cfg)
    return {name: decays[tower] ** (depth + 1 - layer)
            for name, (tower, layer, depth) in trained.layers.items() if decays[tower] < 1.0}


def regrouped_since(saved_schedule: dict, cfg: OptimConfig) -> bool:
    """Whether a checkpoint saved under `saved_schedule` (the trainer's schedule settings) had other
    layer decays: its optimizer groups are then laid out differently and must be paired by name."""
    saved = OptimConfig(layer_decay=saved_schedule.get("layer_decay", 1.0),
                        text_layer_decay=saved_schedule.get("text_layer_decay", -1.0))
    return tower_decays(saved) != tower_decays(cfg)
