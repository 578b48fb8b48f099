"""Init files are provenance, not architecture. A model whose weights come from a checkpoint or an
export is built from its config fields alone (models.pretrained.without_init_files) and computes as
the one built from the files did, dropout included; a saved config reads without its init files;
the fine-tuning architecture check ignores where the first weights came from and still names a
real difference. Real timm and Hugging Face files (tests/init_files.py), tiny sizes."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from init_files import bert_dir, timm_vit_file
from megavl.config import ConfigError, load_config, to_dict
from megavl.engine.task_init import config_for_weights, read_init
from megavl.models.pretrained import load_pretrained, without_init_files
from megavl.models.vlp import VLPModel
from megavl.tasks.base import architecture_mismatch, load_backbone

TINY = Path(__file__).resolve().parents[3] / "configs" / "tiny.yaml"


@pytest.fixture
def init_cfg(tmp_path):
    """tiny.yaml starting from a timm ViT file and a BERT directory (dropout 0.1), and those paths."""
    base = load_config(TINY).model
    vit = timm_vit_file(tmp_path / "deit_tiny.pth", base.vision)
    bert = bert_dir(tmp_path / "bert", base.text, dropout=0.1)
    cfg = load_config(TINY, [f"model.vision.init={vit} model.text.hf_path={bert} model.attention=math"])
    return cfg, vit, bert


def test_a_model_rebuilt_without_its_init_files_trains_as_the_one_read_from_them(init_cfg):
    cfg, vit, bert = init_cfg
    assert (cfg.model.text.dropout, cfg.model.text.attn_dropout) == (0.1, 0.1)  # from config.json
    torch.manual_seed(0)
    loaded = VLPModel(cfg.model).train()
    Path(vit).unlink()
    shutil.rmtree(bert)
    rebuilt = VLPModel(without_init_files(cfg.model)).train()
    rebuilt.load_state_dict(loaded.state_dict())
    images = torch.randn(2, 3, 64, 64)
    ids = torch.randint(1000, 2000, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    outputs = []
    for model in (loaded, rebuilt):  # train mode: the same dropout masks only if the rates agree
        torch.manual_seed(1)
        outputs.append((model.encode_image(images), model.encode_text(ids, mask)))
    for ours, theirs in zip(*outputs):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_architecture_check_ignores_init_files_and_names_a_real_difference(init_cfg):
    cfg, _, _ = init_cfg
    plain = load_config(TINY, ["model.attention=math"]).model
    assert architecture_mismatch(cfg.model, plain) == []
    moved = load_config(TINY, ["model.vision.init=/elsewhere/deit.safetensors model.vision.init_format=openclip",
                               "model.text.hf_path=/elsewhere/bert"]).model
    assert architecture_mismatch(cfg.model, moved) == []
    deeper = load_config(TINY, ["model.vision.depth=3"]).model
    assert architecture_mismatch(cfg.model, deeper) == ["vision.depth: 2 -> 3"]
    source = VLPModel(cfg.model)
    with pytest.raises(ValueError, match="vision.depth: 2 -> 3"):
        load_backbone(VLPModel(deeper), source.state_dict(), cfg.model)


def test_an_export_whose_init_files_are_gone_reads_and_loads(init_cfg, tmp_path):
    cfg, vit, bert = init_cfg
    torch.manual_seed(0)
    model = VLPModel(cfg.model)
    export = tmp_path / "export"
    export.mkdir()
    save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, str(export / "model.safetensors"))
    (export / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    Path(vit).unlink()
    shutil.rmtree(bert)
    state, source_cfg = read_init(str(export))
    assert source_cfg.vision.init == vit and source_cfg.text.dropout == 0.1  # as saved, not re-read
    loaded = load_pretrained(export)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)
    assert loaded.text.embed_drop.p == 0.1
    # A recipe naming the gone directory holds only what it wrote (dropout 0 by default); a run
    # whose weights come from the export takes the tower the export recorded, keeping the path.
    recipe = load_config(TINY, [f"model.text.hf_path={bert}"])
    assert recipe.model.text.dropout == 0.0
    continued = config_for_weights(recipe, export)
    assert continued.model.text == dataclasses.replace(cfg.model.text, hf_path=bert)
    assert config_for_weights(load_config(TINY), export).model.text.dropout == 0.0  # no hf_path: the recipe's


def test_a_model_that_reads_a_missing_init_file_names_the_key(tmp_path):
    # the recipe loads (a resumed run needs no file); building the model from the files does not
    cfg = load_config(TINY, [f"model.vision.init={tmp_path / 'deit.pth'}"])
    with pytest.raises(ConfigError, match="model.vision.init: expected an existing local checkpoint file"):
        VLPModel(cfg.model)
    cfg = load_config(TINY, [f"model.text.hf_path={tmp_path / 'bert'}"])
    with pytest.raises(ConfigError, match="model.text.hf_path"):
        VLPModel(cfg.model)
