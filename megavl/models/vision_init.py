"""Vision-tower weights from a local checkpoint file: timm / DeiT ViTs and OpenCLIP / OpenAI CLIP towers.

The recipe keys `model.vision.init` (the file) and `model.vision.init_format` (timm | openclip) lead
here from `VLPModel`. Both formats are renamed to timm's ViT names (which ours mirror), checked
against the recipe's architecture (a mismatch is a ConfigError naming the key), and the position
embeddings are resampled to the recipe's image size.

    timm     timm's own names: plain ViTs, DeiT (a distilled DeiT's dist token and its position entry
             are dropped), and timm's CLIP ports (vit_base_patch16_clip_224: norm_pre, no patch bias).
             A DeiT release .pth ({"model": state}) is unwrapped.
    openclip OpenCLIP / OpenAI CLIP names (visual.conv1, visual.ln_pre, visual.transformer.resblocks.i
             .attn.in_proj_weight, ...), renamed as timm's `_convert_openai_clip` does; the text tower
             and `visual.proj` (CLIP's 512-d joint space) are dropped: ITC learns its own projection.
             OpenAI's CLIP uses QuickGELU (set model.vision.act: quick_gelu); LAION's OpenCLIP
             ViT-B/16 uses GELU. The activation is not visible in a state dict, nor is the number of
             heads: those two come from the recipe as written.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from megavl.config import VISION_INIT_SUFFIXES, ConfigError, VisionConfig

from .vision import VisionTransformer, resample_pos_embed

log = logging.getLogger(__name__)

# Checkpoint wrappers: DeiT releases {"model": state}; training checkpoints {"state_dict": state}.
_WRAPPER_KEYS = ("model", "state_dict", "module")
# timm entries forward_features never reads: classifier heads and the ViT "representation" (pre-logits) layer.
_TIMM_DROPPED_PREFIXES = ("head.", "head_dist.", "pre_logits.")
# OpenCLIP visual names -> timm names, inside transformer.resblocks.{i}. / blocks.{i}.
_CLIP_BLOCK_NAMES = {
    "ln_1": "norm1",
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj": "attn.proj",
    "ln_2": "norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_CLIP_TOP_NAMES = {"conv1": "patch_embed.proj", "ln_pre": "norm_pre", "ln_post": "norm"}
_CLIP_DROPPED = ("proj",)
_CLIP_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_CLIP_BLOCK_FLAT = re.compile(r"^transformer\.resblocks\.(\d+)\.(attn\.in_proj_(?:weight|bias))$")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or torch-pickled (.pth/.pt/.bin) file, unwrapped from {"model": ...}."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # TorchScript archives and arbitrary pickles land here
            raise ValueError(f"{path}: cannot read a state dict ({type(err).__name__}: {err}); OpenAI's CLIP .pt "
                             "files are TorchScript: save torch.jit.load(path).state_dict() first") from None
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: expected a mapping of parameter names to tensors")
    if state and all(k.startswith("module.") for k in state):  # saved from a DataParallel/DDP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def timm_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm ViT state dict without its heads; a distilled DeiT loses its dist token and pos entry."""
    out = {k: v for k, v in state.items() if not k.startswith(_TIMM_DROPPED_PREFIXES)}
    if "dist_token" in out:
        out.pop("dist_token")
        pos = out["pos_embed"]  # (1, 2 + N, E): [cls, dist, patches...]
        out["pos_embed"] = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
    return out


def openclip_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The visual tower of an OpenCLIP / OpenAI CLIP state dict, in timm names."""
    if any(k.startswith("visual.") for k in state):
        visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    else:
        visual = dict(state)  # a bare visual tower (model.visual.state_dict())
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, tensor in visual.items():
        if name in _CLIP_DROPPED:
            continue
        if name == "class_embedding":
            out["cls_token"] = tensor.reshape(1, 1, -1)
            continue
        if name == "positional_embedding":
            out["pos_embed"] = tensor.unsqueeze(0)
            continue
        flat = _CLIP_BLOCK_FLAT.match(name)
        block = _CLIP_BLOCK.match(name)
        if flat:
            out[f"blocks.{flat[1]}.{_CLIP_BLOCK_NAMES[flat[2]]}"] = tensor
        elif block and block[2] in _CLIP_BLOCK_NAMES:
            out[f"blocks.{block[1]}.{_CLIP_BLOCK_NAMES[block[2]]}.{block[3]}"] = tensor
        elif name.rpartition(".")[0] in _CLIP_TOP_NAMES:
            module, _, leaf = name.rpartition(".")
            out[f"{_CLIP_TOP_NAMES[module]}.{leaf}"] = tensor
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"CLIP visual weights megavl's ViT has no place for (layer scale, attention "
                         f"pooling, ...?): {unknown[:8]}")
    return out


CONVERTERS = {"timm": timm_state, "openclip": openclip_state}


def _check_architecture(state: dict[str, torch.Tensor], cfg: VisionConfig, source: str) -> None:
    """The recipe's model.vision fields against what the weights show; ConfigError names the key."""
    def expect(ok: bool, key: str, recipe, weights) -> None:
        if not ok:
            raise ConfigError(f"model.vision.{key}: the recipe says {recipe!r} but {source} has {weights!r}")

    if "patch_embed.proj.weight" not in state or "pos_embed" not in state or "cls_token" not in state:
        raise ValueError(f"{source}: no patch embedding / position embedding / class token: not a ViT "
                         f"(is model.vision.init_format={cfg.init_format!r} right?)")
    width, _, patch, _ = state["patch_embed.proj.weight"].shape
    expect(width == cfg.width, "width", cfg.width, width)
    expect(patch == cfg.patch_size, "patch_size", cfg.patch_size, patch)
    depth = len({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    expect(depth == cfg.depth, "depth", cfg.depth, depth)
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0] if depth else None
    expect(hidden == int(cfg.width * cfg.mlp_ratio), "mlp_ratio", cfg.mlp_ratio, f"MLP width {hidden}")
    expect(("norm_pre.weight" in state) == cfg.pre_norm, "pre_norm", cfg.pre_norm,
           "a pre-norm (ln_pre / norm_pre)" if "norm_pre.weight" in state else "no pre-norm")
    expect(("patch_embed.proj.bias" in state) == cfg.patch_bias, "patch_bias", cfg.patch_bias,
           "a patch-embedding bias" if "patch_embed.proj.bias" in state else "no patch-embedding bias")


def check_init_file(path: str) -> None:
    """ConfigError naming model.vision.init unless `path` is a weights file this module reads.

    Checked here, when the file is read, not at config load: a resumed run or one started from
    task.init_from builds its model without it (models/pretrained.without_init_files)."""
    if not Path(path).is_file():
        raise ConfigError(f"model.vision.init: expected an existing local checkpoint file, got {path!r}")
    if Path(path).suffix not in VISION_INIT_SUFFIXES:
        raise ConfigError(f"model.vision.init: expected a file ending in one of {VISION_INIT_SUFFIXES}, "
                          f"got {path!r}")


def load_vision_init(vision: VisionTransformer, cfg: VisionConfig) -> None:
    """Copy the weights of `cfg.init` (format `cfg.init_format`) into `vision`, in place.

    Position embeddings are resampled (bicubic) from the checkpoint's square grid to vision.grid_size;
    the temporal embedding of a multi-frame model stays zero. Every other parameter must be there.
    """
    source = cfg.init
    check_init_file(source)
    state = CONVERTERS[cfg.init_format](read_state_dict(source))
    _check_architecture(state, cfg, source)
    pos = state["pos_embed"]
    n_old = pos.shape[1] - 1
    side = int(round(n_old ** 0.5))
    if side * side != n_old:
        raise ValueError(f"{source}: {n_old} patch position entries are not a square grid")
    state["pos_embed"] = resample_pos_embed(pos, vision.grid_size, (side, side))
    ours = vision.state_dict()
    missing = sorted(set(ours) - set(state) - {"temporal_embed"})
    unexpected = sorted(set(state) - set(ours))
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not fit megavl's ViT: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    for name, tensor in state.items():
        if tensor.shape != ours[name].shape:
            raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)}, the model {tuple(ours[name].shape)} "
                             f"(model.vision.heads/width?)")
    vision.load_state_dict(state, strict=False)  # copies, casting to the model's dtype
    log.info("vision tower initialised from %s (%s format, position grid %dx%d -> %dx%d)", source,
             cfg.init_format, side, side, *vision.grid_size)
