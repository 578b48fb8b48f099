"""The tiny fine-tuning recipes can start from the tiny pre-training export (same architecture), and
task.init_from really replaces every backbone tensor: without both, bench/bench_finetune.py's
"pre-trained vs random" comparison would measure nothing (or crash)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megavl.config import load_config
from megavl.models.vlp import VLPModel
from megavl.tasks.base import architecture_mismatch, load_backbone

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("task", ["vqa", "nlvr2", "retrieval"])
def test_tiny_finetune_recipe_has_the_tiny_pretraining_architecture(task):
    pretrain = load_config(REPO / "configs/tiny.yaml").model
    finetune = load_config(REPO / f"configs/finetune_{task}_tiny.yaml").model
    assert architecture_mismatch(pretrain, finetune) == []


@pytest.mark.parametrize("prefix", ["", "student."])  # an export's bare names, a checkpoint's module names
def test_init_from_replaces_every_backbone_tensor(prefix):
    cfg = load_config(REPO / "configs/tiny.yaml").model
    torch.manual_seed(0)
    source = VLPModel(cfg)
    torch.manual_seed(1)
    target = VLPModel(cfg)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    load_backbone(target, {prefix + k: v.clone() for k, v in source.state_dict().items()}, cfg)
    expected = source.state_dict()
    changed = 0
    for name, value in target.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
        changed += not torch.equal(value, before[name])
    # every randomly initialised tensor differs between the seeds; constants (LayerNorm 1/0, zero
    # biases, fixed buffers) may coincide
    random_init = sum(not torch.equal(expected[k], before[k]) for k in expected)
    assert changed == random_init > len(expected) // 3
