"""`megavl-export --peers`: the towers in the formats of timm, Hugging Face transformers and OpenCLIP.

    OUT/vision/     timm ViT: model.safetensors + config.json (architecture, model_args, pretrained_cfg)
    OUT/text/       Hugging Face BERT: config.json, model.safetensors (BertForMaskedLM names), tokenizer
    OUT/open_clip/  open_clip_config.json + open_clip_model.safetensors + tokenizer: the ITC dual encoder

megavl's ViT has timm's names and a 1-frame forward that is timm's `forward_features`
(models/vision.py), and its BERT is Hugging Face's under the name table of models/text.py: the
exports invert those tables, they add no mapping of their own. What a peer cannot compute exactly is
refused with a ConfigError naming the key (a video tower's temporal table, a LayerNorm epsilon
timm's ViT cannot take from a config file, an option this module does not know), so an export is
either exact or absent. Two rewrites keep outputs equal where the peer's layout lacks a bias:
  * a patch-embedding bias beside a pre-norm (timm's pre-norm ViT has no patch bias) moves into the
    patch position embeddings: conv(x) + b + pos = conv_nobias(x) + (pos + b);
  * OpenCLIP's HF text projection has no bias: the bias b of megavl's text_proj moves into the last
    LayerNorm's shift of the OpenCLIP copy of BERT, beta + W^+ b, so that W(h + W^+ b) = Wh + b for
    W of full row rank (embed_dim <= text width). That copy's token states then differ from
    OUT/text's by W^+ b; its [CLS] embedding is megavl's.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from megavl.config import Config, ConfigError, ModelConfig
from megavl.models.text import _HF_EMBED_NAMES, _HF_LAYER_NAMES

PEERS = ("vision", "text", "open_clip")

# Fields a peer expresses (in the mapping below) or that change nothing at inference (dropout, the
# files the weights once came from). Any other field with a non-default value is refused: a new
# model option is not exported until its mapping is written here.
_VISION_EXPRESSED = {"img_size", "patch_size", "width", "depth", "heads", "mlp_ratio", "num_frames", "pre_norm",
                     "act", "patch_bias", "layer_norm_eps", "drop_path", "init", "init_format",
                     "patch_dropout"}  # patch_dropout: which patches training encodes, not the weights' function
_TEXT_EXPRESSED = {"vocab_size", "width", "depth", "heads", "intermediate", "max_position", "type_vocab_size",
                   "hidden_act", "layer_norm_eps", "dropout", "attn_dropout", "pad_token_id", "hf_path"}
# timm ViT architectures whose own norm_layer has megavl's epsilon; every other size is a kwarg.
_TIMM_ARCH_BY_EPS = {1e-6: "vit_base_patch16_224", 1e-5: "vit_base_patch16_clip_224"}
# The OpenCLIP text projection's bias fold must reproduce text_proj to this (relative) error.
_FOLD_TOLERANCE = 1e-5


def _refuse_unknown(section: object, expressed: set[str], prefix: str, peer: str) -> None:
    default = type(section)()
    for f in dataclasses.fields(section):
        if f.name not in expressed and getattr(section, f.name) != getattr(default, f.name):
            raise ConfigError(f"{prefix}.{f.name}={getattr(section, f.name)!r}: {peer} has no equivalent the "
                              f"export knows of; export without --peers")


def _tower(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------------ timm
def timm_vision(model: ModelConfig, mean: list[float], std: list[float],
                state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json dict, weights in timm names) of the vision tower; `state` has VLPModel names."""
    v = model.vision
    _refuse_unknown(v, _VISION_EXPRESSED, "model.vision", "timm")
    if v.num_frames > 1:
        raise ConfigError(f"model.vision.num_frames={v.num_frames}: timm's ViT has no temporal embedding table; "
                          "export an image model (num_frames 1)")
    arch = _TIMM_ARCH_BY_EPS.get(v.layer_norm_eps)
    if arch is None:
        raise ConfigError(f"model.vision.layer_norm_eps={v.layer_norm_eps}: timm's ViT configs give LayerNorm "
                          f"eps {sorted(_TIMM_ARCH_BY_EPS)} only")
    weights = dict(_tower(state, "vision."))
    weights.pop("temporal_embed", None)
    has_bias = "patch_embed.proj.bias" in weights
    if v.pre_norm and has_bias:  # timm's pre-norm ViT has no patch bias: it joins the position table
        bias = weights.pop("patch_embed.proj.bias")
        pos = weights["pos_embed"].clone()
        pos[:, 1:] += bias
        weights["pos_embed"] = pos
    elif not v.pre_norm and not has_bias:  # timm's plain ViT always has one: a zero bias is exact
        weights["patch_embed.proj.bias"] = torch.zeros(v.width)
    args = {"img_size": v.img_size, "patch_size": v.patch_size, "embed_dim": v.width, "depth": v.depth,
            "num_heads": v.heads, "mlp_ratio": v.mlp_ratio, "qkv_bias": True, "pre_norm": v.pre_norm,
            "num_classes": 0, "global_pool": "token"}
    if v.act != "gelu":
        args["act_layer"] = v.act  # quick_gelu: timm's name too
    config = {"architecture": arch, "num_classes": 0, "num_features": v.width, "global_pool": "token",
              "model_args": args,
              "pretrained_cfg": {"input_size": [3, v.img_size, v.img_size], "fixed_input_size": True,
                                 "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "squash",
                                 "mean": list(mean), "std": list(std), "num_classes": 0,
                                 "first_conv": "patch_embed.proj", "classifier": "head",
                                 "license": "", "tag": "megavl"}}
    return config, {k: t.contiguous() for k, t in weights.items()}


# ------------------------------------------------------------------------------- Hugging Face BERT
def hf_bert_config(model: ModelConfig, with_head: bool) -> dict:
    t = model.text
    _refuse_unknown(t, _TEXT_EXPRESSED, "model.text", "transformers' BertModel")
    if model.layout != "stacked":  # the text tower holds BERT's lower layers only; the upper ones fuse
        raise ConfigError(f"model.layout={model.layout!r}: the text tower is BERT's first "
                          f"{model.text_tower_depth()} layers and the rest run inside the fusion stack with "
                          "cross-attention; transformers' BertModel cannot express it: export the vision tower "
                          "alone (--peers vision)")
    return {"model_type": "bert", "architectures": ["BertForMaskedLM" if with_head else "BertModel"],
            "vocab_size": t.vocab_size, "hidden_size": t.width, "num_hidden_layers": t.depth,
            "num_attention_heads": t.heads, "intermediate_size": t.intermediate,
            "max_position_embeddings": t.max_position, "type_vocab_size": t.type_vocab_size,
            "hidden_act": t.hidden_act, "layer_norm_eps": t.layer_norm_eps,
            "hidden_dropout_prob": t.dropout, "attention_probs_dropout_prob": t.attn_dropout,
            "pad_token_id": t.pad_token_id, "position_embedding_type": "absolute", "tie_word_embeddings": True}


def mlm_head_refusal(model: ModelConfig) -> str:
    """Why BertForMaskedLM's head cannot hold megavl's MLM head ("" = it can): Hugging Face's head maps
    hidden_size -> hidden_size with the tower's activation and epsilon; megavl's maps the fusion width
    with GELU and eps 1e-12."""
    t = model.text
    if model.fusion.width != t.width:
        return f"model.fusion.width={model.fusion.width} differs from model.text.width={t.width}"
    if t.hidden_act != "gelu":
        return f"model.text.hidden_act={t.hidden_act!r} (megavl's MLM head uses gelu)"
    if t.layer_norm_eps != 1e-12:
        return f"model.text.layer_norm_eps={t.layer_norm_eps} (megavl's MLM head uses 1e-12)"
    return ""


def hf_bert_weights(state: dict[str, torch.Tensor], with_head: bool) -> dict[str, torch.Tensor]:
    """BertModel weights (no pooler) in BertForMaskedLM names (`bert.`), plus `cls.predictions.` if asked."""
    to_hf_embed = {ours: theirs for theirs, ours in _HF_EMBED_NAMES.items()}
    to_hf_layer = {ours: theirs for theirs, ours in _HF_LAYER_NAMES.items()}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in _tower(state, "text.").items():
        module, _, leaf = name.rpartition(".")
        if module in to_hf_embed:
            out[f"bert.{to_hf_embed[module]}.{leaf}"] = tensor
            continue
        _, index, rest = module.split(".", 2)  # layers, i, attn.q ...
        out[f"bert.encoder.layer.{index}.{to_hf_layer[rest]}.{leaf}"] = tensor
    if with_head:
        head = _tower(state, "mlm_head.")
        out["cls.predictions.transform.dense.weight"] = head["dense.weight"]
        out["cls.predictions.transform.dense.bias"] = head["dense.bias"]
        out["cls.predictions.transform.LayerNorm.weight"] = head["norm.weight"]
        out["cls.predictions.transform.LayerNorm.bias"] = head["norm.bias"]
        out["cls.predictions.bias"] = head["decoder.bias"]
        out["cls.predictions.decoder.bias"] = head["decoder.bias"]  # one tensor in transformers, two names
    return out


def _write_hf_text(model: ModelConfig, tokenizer_path: str, state: dict[str, torch.Tensor], out: Path) -> str:
    """Save OUT/text through transformers itself (its own file layout and tying); returns a note."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    from megavl.data.text import build_tokenizer

    refusal = mlm_head_refusal(model)
    config = BertConfig(**{k: v for k, v in hf_bert_config(model, not refusal).items() if k != "model_type"})
    weights = hf_bert_weights(state, not refusal)
    if refusal:
        bert = BertModel(config, add_pooling_layer=False)
        bert.load_state_dict({k[len("bert."):]: v for k, v in weights.items()}, strict=True)
    else:
        bert = BertForMaskedLM(config)
        missing, unexpected = bert.load_state_dict(weights, strict=False)
        missing = [k for k in missing if k != "cls.predictions.decoder.weight"]  # tied to the word embeddings
        if missing or unexpected:
            raise ValueError(f"BertForMaskedLM does not take the exported weights: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    bert.save_pretrained(str(out))
    build_tokenizer(tokenizer_path).save_pretrained(str(out))
    return f"no MLM head: {refusal}" if refusal else "with the MLM head (trained on fused states)"


# ------------------------------------------------------------------------------------- OpenCLIP
def fold_text_proj_bias(norm_bias: torch.Tensor, proj_weight: torch.Tensor,
                        proj_bias: torch.Tensor) -> torch.Tensor:
    """beta + W^+ b: the last LayerNorm shift that lets a bias-free projection W reproduce W h + b."""
    pinv = torch.linalg.pinv(proj_weight.double())
    folded = norm_bias.double() + pinv @ proj_bias.double()
    error = (proj_weight.double() @ (folded - norm_bias.double()) - proj_bias.double()).abs().max().item()
    scale = max(proj_bias.double().abs().max().item(), 1.0)
    if error > _FOLD_TOLERANCE * scale:
        raise ConfigError(f"model.embed_dim={proj_weight.shape[0]}: OpenCLIP's text projection has no bias and "
                          f"megavl's cannot be folded into the text tower (projection rank too low, error "
                          f"{error:.2e}); export without open_clip")
    return folded.float()


def open_clip_weights(model: ModelConfig, state: dict[str, torch.Tensor], vision: dict[str, torch.Tensor],
                      temperature: float) -> dict[str, torch.Tensor]:
    """CustomTextCLIP state: visual.trunk (timm) + visual.head.proj, text.transformer (BertModel) + text.proj."""
    out = {f"visual.trunk.{k}": v for k, v in vision.items()}
    out["visual.head.proj.weight"] = state["vision_proj.weight"]
    out["visual.head.proj.bias"] = state["vision_proj.bias"]
    text = {k[len("bert."):]: v for k, v in hf_bert_weights(state, with_head=False).items()}
    last = f"encoder.layer.{model.text.depth - 1}.output.LayerNorm.bias" if model.text.depth else "embeddings.LayerNorm.bias"
    text[last] = fold_text_proj_bias(text[last], state["text_proj.weight"], state["text_proj.bias"])
    out.update({f"text.transformer.{k}": v for k, v in text.items()})
    out["text.proj.weight"] = state["text_proj.weight"]
    out["logit_scale"] = torch.tensor(math.log(1.0 / temperature))
    return {k: v.contiguous() for k, v in out.items()}


def open_clip_config(cfg: Config, vision_dir: Path, text_dir: Path) -> dict:
    """open_clip_config.json: `create_model_and_transforms("local-dir:OUT/open_clip")` reads it. The
    towers are named by absolute path (timm's `local-dir:` and a transformers directory)."""
    m, d = cfg.model, cfg.data
    return {"model_cfg": {"embed_dim": m.embed_dim, "custom_text": True,
                          "vision_cfg": {"image_size": m.vision.img_size,
                                         "timm_model_name": f"local-dir:{vision_dir.resolve()}",
                                         "timm_model_pretrained": False, "timm_pool": "token",
                                         "timm_proj": "linear", "timm_proj_bias": True},
                          "text_cfg": {"hf_model_name": str(text_dir.resolve()),
                                       "hf_tokenizer_name": str(text_dir.resolve()),
                                       "hf_model_pretrained": False, "hf_proj_type": "linear",
                                       "hf_pooler_type": "cls_last_hidden_state_pooler",
                                       "context_length": d.max_text_len, "vocab_size": m.text.vocab_size}},
            "preprocess_cfg": {"size": m.vision.img_size, "mode": "RGB", "mean": list(d.mean), "std": list(d.std),
                               "interpolation": "bicubic", "resize_mode": "squash"}}


# -------------------------------------------------------------------------------------- writing
def write_peers(state: dict[str, torch.Tensor], cfg: Config, out: str | Path, peers: tuple[str, ...] = PEERS,
                temperature: float | None = None) -> dict[str, Path]:
    """Write the requested peer formats under `out` from a student state dict (VLPModel names).

    open_clip needs vision and text (it names their directories). Every check runs before a file is
    written. Returns {peer: directory}."""
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        raise ValueError(f"unknown peer formats {unknown}; choose from {PEERS}")
    if "open_clip" in peers:
        peers = tuple(p for p in PEERS if p in (*peers, "vision", "text"))
    out = Path(out)
    if "vision" in peers:
        vision_config, vision = timm_vision(cfg.model, cfg.data.mean, cfg.data.std, state)
    if "text" in peers:
        text_config = hf_bert_config(cfg.model, with_head=False)  # refuses unknown text options up front
    temperature = cfg.objectives.itc.temp_init if temperature is None else temperature
    clip = open_clip_weights(cfg.model, state, vision, temperature) if "open_clip" in peers else None
    dirs: dict[str, Path] = {}
    if "vision" in peers:
        dirs["vision"] = out / "vision"
        dirs["vision"].mkdir(parents=True, exist_ok=True)
        save_file(vision, str(dirs["vision"] / "model.safetensors"), metadata={"format": "pt"})
        (dirs["vision"] / "config.json").write_text(json.dumps(vision_config, indent=2))
    if "text" in peers:
        dirs["text"] = out / "text"
        dirs["text"].mkdir(parents=True, exist_ok=True)
        note = _write_hf_text(cfg.model, cfg.data.tokenizer, state, dirs["text"])
        (dirs["text"] / "megavl_export.txt").write_text(f"BERT {text_config['hidden_size']} wide, {note}\n")
    if clip is not None:
        dirs["open_clip"] = out / "open_clip"
        dirs["open_clip"].mkdir(parents=True, exist_ok=True)
        save_file(clip, str(dirs["open_clip"] / "open_clip_model.safetensors"), metadata={"format": "pt"})
        (dirs["open_clip"] / "open_clip_config.json").write_text(
            json.dumps(open_clip_config(cfg, dirs["vision"], dirs["text"]), indent=2))
        # open_clip.get_tokenizer("local-dir:...") reads the tokenizer from this directory itself
        from megavl.data.text import build_tokenizer

        build_tokenizer(cfg.data.tokenizer).save_pretrained(str(dirs["open_clip"]))
    return dirs
