"""The ALBEF layout (model.layout: albef) against Hugging Face's own BERT, key by key.

A random-weight BertForMaskedLM (4 layers) is saved to tmp and loaded with fusion.depth 2: the text
tower must hold BERT's layers 0-1, the fusion stack its layers 2-3 (plus fresh cross-attention), the
MLM head `cls.predictions`; the text pass must be HF's hidden state after layer 2.
"""
from __future__ import annotations

import pytest
import torch
import transformers
import yaml

from megavl.config import ConfigError, config_from_dict
from megavl.models.pretrained import without_init_files
from megavl.models.text import _HF_LAYER_NAMES
from megavl.models.vlp import VLPModel

TINY = "configs/tiny.yaml"
DEPTH, FUSION = 4, 2
HF = dict(vocab_size=300, hidden_size=32, num_hidden_layers=DEPTH, num_attention_heads=4, intermediate_size=64,
          max_position_embeddings=64)


def albef_dict(hf_path: str, **fusion) -> dict:
    data = yaml.safe_load(open(TINY))
    data["model"]["text"] = {"hf_path": hf_path}
    data["model"]["layout"] = "albef"
    data["model"]["fusion"] = {"width": 32, "heads": 4, "depth": FUSION, "mlp_ratio": 2.0, **fusion}
    data["model"]["attention"] = "math"
    return data


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(transformers.BertConfig(**HF)).eval()
    with torch.no_grad():  # HF zero-initialises the head's bias: give it values a mix-up would show
        hf.cls.predictions.bias.normal_()
    path = tmp_path_factory.mktemp("bert_mlm")
    hf.save_pretrained(path)
    return str(path), hf


def test_albef_layout_maps_every_bert_weight(bert_dir):
    path, hf = bert_dir
    model = VLPModel(config_from_dict(albef_dict(path)).model).eval()
    ours, theirs = model.state_dict(), hf.state_dict()
    assert (len(model.text.layers), len(model.fusion.layers)) == (DEPTH - FUSION, FUSION)
    checked = 0
    for i in range(DEPTH):
        where = f"text.layers.{i}" if i < DEPTH - FUSION else f"fusion.layers.{i - (DEPTH - FUSION)}"
        for hf_name, our_name in _HF_LAYER_NAMES.items():
            for leaf in ("weight", "bias"):
                assert torch.equal(ours[f"{where}.{our_name}.{leaf}"],
                                   theirs[f"bert.encoder.layer.{i}.{hf_name}.{leaf}"]), (where, hf_name, leaf)
                checked += 1
    head = {"dense.weight": "transform.dense.weight", "dense.bias": "transform.dense.bias",
            "norm.weight": "transform.LayerNorm.weight", "norm.bias": "transform.LayerNorm.bias",
            "decoder.bias": "bias", "decoder.weight": "decoder.weight"}
    for our_name, hf_name in head.items():
        assert torch.equal(ours[f"mlm_head.{our_name}"], theirs[f"cls.predictions.{hf_name}"]), our_name
    assert model.mlm_head.decoder.weight is model.text.word_embeddings.weight  # still tied
    assert model.mlm_head.norm.eps == hf.config.layer_norm_eps
    assert checked == DEPTH * len(_HF_LAYER_NAMES) * 2
    # the fresh parts: cross-attention per fusion layer, a zero modality embedding
    assert model.fusion.layers[0].cross is not None and not model.fusion.modality_embed.any()


def test_albef_text_pass_is_bert_below_the_fusion_and_mlm_logits_are_hfs(bert_dir):
    path, hf = bert_dir
    model = VLPModel(config_from_dict(albef_dict(path)).model).eval()
    ids = torch.randint(5, HF["vocab_size"], (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        text = model.encode_text(ids, mask)
        # hidden_states[k] is BERT's output after k layers: the text tower ends below the fusion
        assert torch.allclose(text, out.hidden_states[DEPTH - FUSION], atol=1e-5)
        # the head on BERT's top states is HF's prediction head
        top = text
        for layer in model.fusion.layers:
            top = layer(top, mask.bool())
        assert torch.allclose(top, out.hidden_states[DEPTH], atol=1e-5)
        assert torch.allclose(model.mlm_head(top), out.logits, atol=1e-4)


def test_albef_fusion_runs_both_semvlp_modes(bert_dir):
    """Both modes give global features and text-to-image relevance; cross-attention trains only in two."""
    path, _ = bert_dir
    model = VLPModel(config_from_dict(albef_dict(path)).model)
    images, ids = torch.randn(2, 3, 64, 64), torch.randint(5, HF["vocab_size"], (2, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    for mode in ("single", "two"):
        model.zero_grad(set_to_none=True)
        fused = model.fuse(model.encode_image(images), model.encode_text(ids, mask), mask, mode,
                           return_text_to_image_attn=True)
        assert fused.image_states.shape == (2, 1 + model.num_patches, 32)
        assert fused.text_states.shape == (2, 7, 32)
        assert torch.allclose(fused.text_to_image_attn.sum(-1), torch.ones(2))
        model.itm_head(fused.image_global, fused.text_global).sum().backward()
        cross_grad = model.fusion.layers[0].cross.q.weight.grad
        assert (cross_grad is not None and cross_grad.abs().sum() > 0) == (mode == "two"), mode
        assert model.fusion.layers[0].attn.q.weight.grad.abs().sum() > 0


def test_albef_layout_rebuilds_from_its_config_and_numbers_lr_layers(bert_dir):
    """An export's rebuild (no init files) has the same tensors; the fusion layers continue the text
    tower's layer ids for optim.layer_decay."""
    path, _ = bert_dir
    cfg = config_from_dict(albef_dict(path)).model
    loaded, rebuilt = VLPModel(cfg).state_dict(), VLPModel(without_init_files(cfg)).state_dict()
    assert {k: v.shape for k, v in loaded.items()} == {k: v.shape for k, v in rebuilt.items()}
    layers = VLPModel(without_init_files(cfg)).lr_layers()
    assert layers["text.word_embeddings.weight"] == ("text", 0, DEPTH)
    assert layers["text.layers.1.attn.q.weight"] == ("text", 2, DEPTH)
    assert layers["fusion.layers.1.cross.q.weight"] == ("text", DEPTH, DEPTH)
    assert "fusion.image_proj.weight" not in layers and "mlm_head.dense.weight" not in layers


def test_albef_layout_bad_input_names_the_key(bert_dir, tmp_path):
    path, hf = bert_dir
    with pytest.raises(ConfigError, match="model.fusion.width"):
        config_from_dict(albef_dict(path, width=64))
    with pytest.raises(ConfigError, match="model.fusion.depth"):
        config_from_dict(albef_dict(path, depth=DEPTH))
    hf.bert.save_pretrained(tmp_path)  # a BertModel: no cls.predictions to load the MLM head from
    with pytest.raises(ConfigError, match="model.text.hf_path.*masked-LM head"):
        VLPModel(config_from_dict(albef_dict(str(tmp_path))).model)
