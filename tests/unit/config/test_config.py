"""Config loading: recipes load, overrides apply with the right types, bad input names its key."""
from pathlib import Path

import pytest
import yaml

from megavl.config import Config, ConfigError, load_config, split_overrides

RECIPES = Path(__file__).resolve().parents[3] / "configs"


@pytest.mark.parametrize("name", ["tiny", "pretrain_4m", "pretrain_14m", "pretrain_4m_albef", "pretrain_14m_vitl",
                                  "pretrain_14m_vitg"])
def test_recipes_load(name):
    cfg = load_config(RECIPES / f"{name}.yaml")
    assert isinstance(cfg, Config)
    assert cfg.objectives.enabled() == ["itc", "itm", "mlm", "mim_pixel", "mim_sem", "scl"]


def test_base_recipes_are_vit_b16_and_bert_base():
    for name in ["pretrain_4m", "pretrain_14m"]:
        cfg = load_config(RECIPES / f"{name}.yaml")
        assert (cfg.model.vision.patch_size, cfg.model.vision.width, cfg.model.vision.depth) == (16, 768, 12)
        assert (cfg.model.text.width, cfg.model.text.depth, cfg.model.text.intermediate) == (768, 12, 3072)
    assert len(load_config(RECIPES / "pretrain_14m.yaml").data.train_shards) == 5
    assert len(load_config(RECIPES / "pretrain_4m.yaml").data.train_shards) == 4


def test_large_and_albef_recipes_are_the_models_they_name():
    vitl, vitg = load_config(RECIPES / "pretrain_14m_vitl.yaml"), load_config(RECIPES / "pretrain_14m_vitg.yaml")
    v = vitl.model.vision
    assert (v.patch_size, v.width, v.depth, v.heads, vitl.model.text.width, vitl.model.text.depth) == (16, 1024, 24, 16,
                                                                                                      768, 12)
    v, t = vitg.model.vision, vitg.model.text
    assert (v.patch_size, v.width, v.depth, v.heads, int(v.width * v.mlp_ratio)) == (14, 1408, 40, 16, 6144)
    assert (t.width, t.depth, t.heads, t.intermediate) == (1024, 24, 16, 4096)  # BERT-large
    assert vitg.model.grad_checkpointing and vitg.run.precision == "bf16" and v.patch_dropout == 0.5
    albef = load_config(RECIPES / "pretrain_4m_albef.yaml").model
    assert (albef.layout, albef.text_tower_depth(), albef.fusion.depth) == ("albef", 6, 6)
    for name in ("pretrain_4m_albef", "pretrain_14m_vitl", "pretrain_14m_vitg"):  # local pretrained files
        raw = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())["model"]
        assert "init" in raw["vision"] and "hf_path" in raw["text"], name
    assert (vitl.model.vision.init_format, vitg.model.vision.init_format) == ("timm", "openclip")


def test_overrides_several_per_set_and_repeated():
    cfg = load_config(RECIPES / "tiny.yaml", ["model.fusion.depth=4 run.max_steps=10", "optim.lr=3e-4"])
    assert cfg.model.fusion.depth == 4
    assert cfg.run.max_steps == 10
    assert cfg.optim.lr == pytest.approx(3e-4)


def test_override_lists_and_brace_patterns():
    cfg = load_config(RECIPES / "tiny.yaml", [
        "data.train_shards=/d/a-{000000..000009}.tar",
        "data.val_shards=[/d/v-{0..1}.tar, /d/w.tar]",
        "data.train_crop_scale=[0.6, 1.0]",
        "curriculum.cycle=[[single, 2], [two, 3]]",
    ])
    assert cfg.data.train_shards == ["/d/a-{000000..000009}.tar"]
    assert cfg.data.val_shards == ["/d/v-{0..1}.tar", "/d/w.tar"]
    assert cfg.data.train_crop_scale == [0.6, 1.0]
    assert cfg.curriculum.cycle == [["single", 2], ["two", 3]]


def test_int_accepted_for_float_but_not_reverse():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match=r"model\.fusion\.depth: expected an integer"):
        load_config(None, ["model.fusion.depth=2.5"])


@pytest.mark.parametrize("override, pattern", [
    ("model.fusion.layerz=4", r"model\.fusion\.layerz: unknown key"),
    ("nope.x=1", r"nope\.x: unknown key"),
    ("run.max_steps=ten", r"run\.max_steps: expected an integer"),
    ("data.hflip=maybe", r"data\.hflip: expected true or false"),
    ("model.vision.heads=5", r"model\.vision\.heads: expected a positive divisor"),
    ("data.image_size=32", r"data\.image_size: expected equal to model\.vision\.img_size"),
    ("objectives.masking.text_mask_prob=1.5", r"objectives\.masking\.text_mask_prob"),
    ("curriculum.cycle=[[triple, 1]]", r"curriculum\.cycle\[0\]"),
    ("data.train_weights=[1, 2]", r"data\.train_weights: expected one weight per"),
    ("model.attention=fast", r"model\.attention"),
])
def test_bad_values_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(RECIPES / "tiny.yaml", [override])


def test_unknown_key_in_recipe_names_it(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  vision:\n    widht: 64\n")
    with pytest.raises(ConfigError, match=r"model\.vision\.widht: unknown key"):
        load_config(recipe)


def test_two_mode_needs_cross_attention():
    with pytest.raises(ConfigError, match=r"curriculum\.cycle\[1\]"):
        load_config(RECIPES / "tiny.yaml", ["model.fusion.cross_attention=false"])
    cfg = load_config(RECIPES / "tiny.yaml", ["model.fusion.cross_attention=false", "curriculum.cycle=[[single, 1]]"])
    assert cfg.curriculum.cycle == [["single", 1]]


def test_all_objectives_off_is_an_error():
    off = [f"objectives.{n}.weight=0" for n in ["itc", "itm", "mlm", "mim_pixel", "mim_sem", "scl"]]
    with pytest.raises(ConfigError, match="at least one objective"):
        load_config(RECIPES / "tiny.yaml", off)


def test_split_overrides_quoting():
    assert split_overrides(["a.b=1 c='x y'", "d=[1, 2]"]) == [("a.b", "1"), ("c", "x y"), ("d", "[1, 2]")]
    with pytest.raises(ConfigError):
        split_overrides(["justakey"])
