"""The peer exports, loaded by the real timm / transformers / open_clip, compute megavl's forward.

Parity: features (timm forward_features, BertModel last_hidden_state) equal megavl's encode_image /
encode_text, and OpenCLIP's normalised embeddings equal megavl's ITC embeddings, to 1e-5 in fp32, for
the tiny recipe and for the 4M recipe's towers (ViT-B/16 at 256 px, BERT-base: real widths, heads,
patch size, vocabulary and positions) with the depth cut to 2 so the suite stays fast.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from megavl.config import ConfigError, load_config
from megavl.engine.export_peers import write_peers
from megavl.models.vlp import VLPModel

ROOT = Path(__file__).resolve().parents[3]
TOL = 1e-5


def _randomised(cfg) -> VLPModel:
    """A model whose every bias and LayerNorm is random too, so a dropped or misplaced one shows."""
    torch.manual_seed(0)
    model = VLPModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _cfg(recipe: str, overrides: list[str]):
    return load_config(ROOT / "configs" / recipe, overrides)


def _inputs(model: VLPModel, cfg, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    size = cfg.model.vision.img_size
    images = torch.randn(batch, 3, size, size, generator=g)
    ids = torch.randint(1000, min(cfg.model.text.vocab_size, 5000), (batch, 12), generator=g)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    ids[1, 8:], mask[1, 8:] = 0, 0  # a padded row: OpenCLIP derives its mask from the pad id
    return images, ids, mask


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= TOL * max(1.0, b.abs().max().item()), err


CASES = {
    "tiny": ("tiny.yaml", []),
    "4m_depth2": ("pretrain_4m.yaml", ["model.vision.depth=2", "model.text.depth=2", "model.fusion.depth=1",
                                        "model.decoder.depth=1", "model.num_prototypes=16"]),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
    recipe, overrides = CASES[request.param]
    cfg = _cfg(recipe, overrides)
    model = _randomised(cfg.model)
    out = tmp_path_factory.mktemp(request.param)
    dirs = write_peers(model.state_dict(), cfg, out, temperature=0.05)
    return cfg, model, dirs


def test_timm_loads_the_vision_tower_exactly(exported):
    import timm
    from safetensors.torch import load_file

    cfg, model, dirs = exported
    config = json.loads((dirs["vision"] / "config.json").read_text())
    file = str(dirs["vision"] / "model.safetensors")
    peer = timm.create_model(config["architecture"], pretrained=True, pretrained_cfg_overlay=dict(file=file),
                             **config["model_args"]).eval()
    missing, unexpected = peer.load_state_dict(load_file(file), strict=False)
    assert (missing, unexpected) == ([], [])
    by_dir = timm.create_model(f"local-dir:{dirs['vision']}", pretrained=True).eval()  # config.json alone
    images, _, _ = _inputs(model, cfg)
    with torch.no_grad():
        ours = model.encode_image(images)
        _close(peer.forward_features(images), ours)
        _close(by_dir.forward_features(images), ours)
        _close(by_dir(images), ours[:, 0])  # the token pool = the ITC [CLS]


def test_transformers_loads_the_text_tower_and_mlm_head(exported):
    from transformers import BertForMaskedLM, BertModel

    cfg, model, dirs = exported
    bert, info = BertModel.from_pretrained(dirs["text"], add_pooling_layer=False, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    mlm, info = BertForMaskedLM.from_pretrained(dirs["text"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _, ids, mask = _inputs(model, cfg)
    with torch.no_grad():
        ours = model.encode_text(ids, mask)
        _close(bert.eval()(input_ids=ids, attention_mask=mask).last_hidden_state, ours)
        _close(mlm.eval()(input_ids=ids, attention_mask=mask).logits, model.mlm_head(ours))


def test_open_clip_builds_the_dual_encoder_from_local_files(exported):
    open_clip = pytest.importorskip("open_clip", reason="the dev extra installs open_clip_torch")

    cfg, model, dirs = exported
    peer, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{dirs['open_clip']}")
    peer.eval()
    images, ids, mask = _inputs(model, cfg)
    with torch.no_grad():
        _close(peer.encode_image(images, normalize=True), model.image_embedding(model.encode_image(images)))
        _close(peer.encode_text(ids, normalize=True), model.text_embedding(model.encode_text(ids, mask)))
        _close(peer.logit_scale.exp(), torch.tensor(1 / 0.05))
    tokenizer = open_clip.get_tokenizer(f"local-dir:{dirs['open_clip']}")
    assert tokenizer(["a red circle"]).shape == (1, cfg.data.max_text_len)


@pytest.mark.parametrize("override, key", [
    ("model.vision.num_frames=4", "model.vision.num_frames"),
    ("model.vision.layer_norm_eps=1e-4", "model.vision.layer_norm_eps"),
])
def test_an_option_a_peer_cannot_express_is_refused_by_name(tmp_path, override, key):
    cfg = _cfg("tiny.yaml", [override])
    model = VLPModel(cfg.model)
    with pytest.raises(ConfigError, match=key):
        write_peers(model.state_dict(), cfg, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_pre_norm_clip_tower_with_patch_bias_and_quick_gelu_stays_exact(tmp_path):
    """The CLIP switches: pre-norm (timm's pre-norm ViT has no patch bias: it moves into pos_embed),
    eps 1e-5 (timm's CLIP architecture) and QuickGELU."""
    import timm

    cfg = _cfg("tiny.yaml", ["model.vision.pre_norm=true", "model.vision.layer_norm_eps=1e-5",
                             "model.vision.act=quick_gelu"])
    model = _randomised(cfg.model)
    dirs = write_peers(model.state_dict(), cfg, tmp_path, peers=("vision",))
    peer = timm.create_model(f"local-dir:{dirs['vision']}", pretrained=True).eval()
    images, _, _ = _inputs(model, cfg)
    with torch.no_grad():
        _close(peer.forward_features(images), model.encode_image(images))


def test_an_unknown_model_option_is_refused_not_dropped(tmp_path, monkeypatch):
    """A tower option added to the config later is not silently exported as the plain tower."""
    from megavl.config_parts import TextConfig

    cfg = _cfg("tiny.yaml", [])
    Extended = dataclasses.make_dataclass("TextConfig", [("layout", str, "bert")], bases=(TextConfig,))
    text = Extended(**{**dataclasses.asdict(cfg.model.text), "layout": "albef"})
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, text=text))
    model = VLPModel(_cfg("tiny.yaml", []).model)
    with pytest.raises(ConfigError, match="model.text.layout='albef'"):
        write_peers(model.state_dict(), cfg, tmp_path)


def test_a_video_model_still_exports_its_text_tower(tmp_path):
    """The refusal is per peer: the temporal table stops the timm export, not the BERT one."""
    cfg = _cfg("tiny.yaml", ["model.vision.num_frames=4"])
    dirs = write_peers(VLPModel(cfg.model).state_dict(), cfg, tmp_path, peers=("text",))
    assert (dirs["text"] / "config.json").is_file() and not (tmp_path / "vision").exists()


def test_albef_layout_refuses_the_text_peers_and_patch_dropout_exports(tmp_path):
    """The ALBEF layout's text tower is BERT's lower layers only: BertModel cannot hold it (refused by
    model.layout); patch dropout only says which patches training encodes, so the tower exports."""
    cfg = _cfg("tiny.yaml", ["model.layout=albef", "model.vision.patch_dropout=0.5"])
    model = VLPModel(cfg.model)
    with pytest.raises(ConfigError, match="model.layout='albef'"):
        write_peers(model.state_dict(), cfg, tmp_path / "all")
    dirs = write_peers(model.state_dict(), cfg, tmp_path / "vision", peers=("vision",))
    assert (dirs["vision"] / "config.json").is_file()
