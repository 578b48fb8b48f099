"""optim.layer_decay / text_layer_decay on the AdamW parameter groups (engine/optim.py + layer_decay.py).

Reference: BEiT/EVA-CLIP's assigner written out here: a tower of D layers, layer id l (0 = embeddings,
i + 1 = layer i, D + 1 = final norm) trains at lr x decay^(D + 1 - l); the rest at lr (x fusion_lr_mult).
"""
from __future__ import annotations

import pytest
import torch

from megavl.config import ConfigError, load_config
from megavl.engine.layer_decay import regrouped_since
from megavl.engine.optim import param_groups
from megavl.models.vlp import VLPModel
from megavl.tasks.base import finetune_params
from megavl.tasks.pretrain import PretrainModule, pretrain_params

LR, FAST = 1e-3, 5.0


def lr_by_name(groups: list[dict]) -> dict[str, float]:
    return {name: g["lr"] for g in groups for name in g["names"]}


def expected_scale(name: str, vision_depth: int, text_depth: int, dv: float, dt: float) -> float:
    """The assigner from its formula, on the parameter names of VLPModel (stacked layout)."""
    if name.startswith("student.vision."):
        rest, decay, depth = name[len("student.vision."):], dv, vision_depth
        layer = (int(rest.split(".")[1]) + 1 if rest.startswith("blocks.")
                 else depth + 1 if rest.startswith("norm.") else 0)
    elif name.startswith("student.text."):
        rest, decay, depth = name[len("student.text."):], dt, text_depth
        layer = int(rest.split(".")[1]) + 1 if rest.startswith("layers.") else 0
    else:
        return 1.0
    return decay ** (depth + 1 - layer)


@pytest.mark.parametrize("decays", [(0.5, -1.0), (0.8, 0.6)])
def test_pretrain_groups_follow_the_per_tower_formula(decays):
    dv, dt = decays
    cfg = load_config("configs/tiny.yaml", [f"optim.lr={LR} optim.fusion_lr_mult={FAST}",
                                            f"optim.layer_decay={dv} optim.text_layer_decay={dt}",
                                            "model.vision.depth=3"])
    dt = dv if dt == -1.0 else dt
    module = PretrainModule(cfg.model, cfg.objectives, {"single": ["itc"], "two": ["itc"]})
    trained = pretrain_params(module)
    lrs = lr_by_name(param_groups(trained, cfg.optim))
    assert set(lrs) == {n for n, p in trained.named}
    for name, lr in lrs.items():
        fast = FAST if name.startswith(trained.fast) else 1.0
        want = LR * fast * expected_scale(name, 3, 2, dv, dt)
        assert lr == pytest.approx(want, rel=1e-12), name
    # spot checks: embeddings lowest, the top block one factor, the final norm and heads untouched
    assert lrs["student.vision.patch_embed.proj.weight"] == pytest.approx(LR * dv ** 4)
    assert lrs["student.vision.blocks.2.mlp.fc1.weight"] == pytest.approx(LR * dv)
    assert lrs["student.vision.norm.weight"] == pytest.approx(LR)
    assert lrs["student.text.word_embeddings.weight"] == pytest.approx(LR * dt ** 3)
    assert lrs["student.fusion.layers.0.mlp.fc1.weight"] == pytest.approx(LR * FAST)


def test_no_decay_keeps_the_groups_as_they_were():
    cfg = load_config("configs/tiny.yaml")
    module = PretrainModule(cfg.model, cfg.objectives, {"single": ["itc"], "two": ["itc"]})
    groups = param_groups(pretrain_params(module), cfg.optim)
    assert len(groups) == 4 and {g["lr"] for g in groups} == {cfg.optim.lr * cfg.optim.fusion_lr_mult, cfg.optim.lr}


def test_finetune_params_carry_the_layers_and_decay_applies():
    cfg = load_config("configs/tiny.yaml", [f"optim.lr={LR} optim.layer_decay=0.5"])

    class Finetune(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student, self.head = VLPModel(cfg.model), torch.nn.Linear(4, 2)

    lrs = lr_by_name(param_groups(finetune_params(Finetune()), cfg.optim))
    assert lrs["student.vision.blocks.0.attn.qkv.weight"] == pytest.approx(LR * 0.5 ** 2)
    assert lrs["student.text.layers.1.attn.q.weight"] == pytest.approx(LR * 0.5)
    assert lrs["head.weight"] == pytest.approx(LR * cfg.optim.fusion_lr_mult)


def test_bad_decays_name_the_key_and_a_changed_decay_regroups():
    for key, value in (("optim.layer_decay", 0.0), ("optim.layer_decay", 1.5), ("optim.text_layer_decay", 0.0)):
        with pytest.raises(ConfigError, match=key):
            load_config("configs/tiny.yaml", [f"{key}={value}"])
    optim = load_config("configs/tiny.yaml", ["optim.layer_decay=0.75"]).optim
    assert regrouped_since({"lr": 1e-4}, optim)  # saved before/without decay
    assert not regrouped_since({"layer_decay": 0.75, "text_layer_decay": -1.0}, optim)
    assert not regrouped_since({"layer_decay": 0.75, "text_layer_decay": 0.75}, optim)  # the same decays
    assert not regrouped_since({}, load_config("configs/tiny.yaml").optim)
