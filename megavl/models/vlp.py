"""The assembled vision-language model: towers, SemVLP fusion and the heads every objective uses.

Plain PyTorch: no losses, no DeepSpeed. Objectives call its small methods, so one forward pass
(e.g. the masked-image pass) can serve several losses.

Legend: B batch, N patches, K kept patches, L text length, W fusion width, E embedding width.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from megavl.config import ConfigError, ModelConfig

from .fusion import FusionOutput, FusionStack, SemVLPFusion
from .fusion_bert import BertFusion
from .heads import ITMHead, MaskedImageDecoder, MLMHead, PrototypeHead
from .text import TextEncoder, convert_hf_state_dict, read_hf_masked_lm, split_layers
from .vision import VisionTransformer
from .vision_init import load_vision_init

log = logging.getLogger(__name__)


def _check_text_matches(text: TextEncoder, cfg: ModelConfig) -> None:
    """The loaded BERT has the shape and dropout model.text describes (the FLOP count and a rebuild
    for a checkpoint's or an export's weights read model.text). load_config fills these fields from the checkpoint's config.json; a
    ModelConfig built by hand may still disagree."""
    t = cfg.text
    layer = text.layers[0] if len(text.layers) else None
    depth = len(text.layers) + (cfg.text.depth - cfg.text_tower_depth())  # albef: the fusion holds the rest
    actual = {"vocab_size": text.word_embeddings.num_embeddings, "width": text.width, "depth": depth,
              "heads": layer.attn.heads if layer is not None else t.heads,
              "intermediate": layer.mlp.fc1.out_features if layer is not None else t.intermediate,
              "max_position": text.max_position, "type_vocab_size": text.type_vocab_size,
              "pad_token_id": text.word_embeddings.padding_idx, "dropout": text.embed_drop.p,
              "attn_dropout": layer.attn.attn_dropout if layer is not None else t.attn_dropout}
    for key, value in actual.items():
        if getattr(t, key) != value:
            raise ConfigError(f"model.text.{key}: the config says {getattr(t, key)!r} but the checkpoint in "
                              f"model.text.hf_path={t.hf_path!r} has {value!r}")


class VLPModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        v, t, f, d = cfg.vision, cfg.text, cfg.fusion, cfg.decoder
        self.cfg = cfg
        self.vision = VisionTransformer(img_size=v.img_size, patch_size=v.patch_size, width=v.width,
                                        depth=v.depth, heads=v.heads, mlp_ratio=v.mlp_ratio,
                                        num_frames=v.num_frames, drop_path=v.drop_path,
                                        attn_backend=cfg.attention, pre_norm=v.pre_norm, act=v.act,
                                        patch_bias=v.patch_bias, layer_norm_eps=v.layer_norm_eps)
        if v.init:
            load_vision_init(self.vision, v)
        else:
            log.info("model.vision.init is empty: the vision tower starts from random weights")
        bert_upper, mlm_state = [], None
        if t.hf_path:
            # checked here, where it is read: a model built for a checkpoint's weights never reads it
            if not (Path(t.hf_path) / "config.json").is_file():
                raise ConfigError(f"model.text.hf_path: expected a local Hugging Face model directory with a "
                                  f"config.json, got {t.hf_path!r}")
            if cfg.layout == "albef":
                self.text, bert_upper, mlm_state = _split_hf_bert(t.hf_path, cfg)
            else:
                self.text = TextEncoder.from_hf(t.hf_path, attn_backend=cfg.attention)
            _check_text_matches(self.text, cfg)
        else:
            log.info("model.text.hf_path is empty: the text tower starts from random weights")
            self.text = TextEncoder(vocab_size=t.vocab_size, width=t.width, depth=cfg.text_tower_depth(),
                                    heads=t.heads, intermediate=t.intermediate, max_position=t.max_position,
                                    type_vocab_size=t.type_vocab_size, layer_norm_eps=t.layer_norm_eps,
                                    pad_token_id=t.pad_token_id, hidden_act=t.hidden_act,
                                    attn_backend=cfg.attention, dropout=t.dropout, attn_dropout=t.attn_dropout)
        self.fusion: FusionStack
        if cfg.layout == "albef":
            self.fusion = BertFusion(depth=f.depth, width=t.width, heads=t.heads, intermediate=t.intermediate,
                                     vision_width=v.width, cross_attention=f.cross_attention,
                                     layer_norm_eps=t.layer_norm_eps, hidden_act=t.hidden_act, dropout=t.dropout,
                                     attn_dropout=t.attn_dropout, attn_backend=cfg.attention)
        else:
            self.fusion = SemVLPFusion(width=f.width, depth=f.depth, heads=f.heads, mlp_ratio=f.mlp_ratio,
                                       vision_width=v.width, text_width=self.text.width,
                                       cross_attention=f.cross_attention, attn_backend=cfg.attention)
        self.vision_proj = nn.Linear(v.width, cfg.embed_dim)
        self.text_proj = nn.Linear(self.text.width, cfg.embed_dim)
        self.itm_head = ITMHead(f.width)
        self.mlm_head = MLMHead(f.width, self.text.word_embeddings, eps=t.layer_norm_eps)
        if mlm_state is not None:  # the ALBEF layout: BERT's upper layers and its own MLM head
            self.fusion.load_bert_layers(bert_upper)
            missing, unexpected = self.mlm_head.load_state_dict(mlm_state, strict=False)
            if missing != ["decoder.weight"] or unexpected:  # the decoder weight is the word embeddings
                raise ValueError(f"MLM head weights do not fit: missing {missing}, unexpected {unexpected}")
        self.prototype_head = PrototypeHead(f.width, cfg.num_prototypes)
        self.decoder = MaskedImageDecoder(f.width, self.vision.num_patches, v.patch_size ** 2 * 3,
                                          d.width, d.depth, d.heads, attn_backend=cfg.attention)
        if cfg.grad_checkpointing:
            self.set_grad_checkpointing(True)

    # ------------------------------------------------------------------------------- passes
    def encode_image(self, images: torch.Tensor, keep_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) [+ keep_ids (B, K)] -> (B, 1 + K, Wv) unimodal tokens, [CLS] first; clips
        (B, T, 3, H, W) -> (B, 1 + T*K, Wv): the clip [CLS], then each frame's kept patches."""
        return self.vision(images, keep_ids)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, L, Wt) unimodal tokens, [CLS] first."""
        return self.text(input_ids, attention_mask)

    def fuse(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
             mode: str, return_text_to_image_attn: bool = False) -> FusionOutput:
        return self.fusion(image_tokens, text_tokens, text_mask.bool(), mode,
                           return_text_to_image_attn=return_text_to_image_attn)

    def image_embedding(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised ITC embedding of the image [CLS]: (B, 1 + K, Wv) -> (B, E)."""
        return F.normalize(self.vision_proj(image_tokens[:, 0]), dim=-1)

    def text_embedding(self, text_tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised ITC embedding of the text [CLS]: (B, L, Wt) -> (B, E)."""
        return F.normalize(self.text_proj(text_tokens[:, 0]), dim=-1)

    # ---------------------------------------------------------------------------- surface
    @property
    def num_patches(self) -> int:
        return self.vision.num_patches

    @property
    def patch_size(self) -> int:
        return self.vision.patch_size

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this module) exempt from weight decay: biases, norms, embeddings."""
        names = {f"vision.{n}" for n in self.vision.no_weight_decay()}
        names |= {f"text.{n}" for n in self.text.no_weight_decay()}
        names |= {"text.word_embeddings.weight", "text.position_embeddings.weight",
                  "text.token_type_embeddings.weight", "decoder.mask_token", "decoder.pos_embed"}
        names |= {n for n, p in self.named_parameters() if p.ndim <= 1}
        return names

    def fusion_and_head_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes that get the fusion/heads lr multiplier (SCL: x5)."""
        return ("fusion.", "vision_proj.", "text_proj.", "itm_head.", "mlm_head.", "prototype_head.", "decoder.")

    def lr_layers(self) -> dict[str, tuple[str, int, int]]:
        """Parameter name -> (tower, layer id, layers in the tower), for layer-wise lr decay (BEiT/EVA):
        id 0 = the tower's embeddings, i + 1 = its block i, depth + 1 = its final norm; tower
        "vision" or "text". Parameters not listed (the stacked fusion stack, projections, heads)
        sit above every layer. In the ALBEF layout the fusion stack's layers continue the text
        tower's numbering (they are the same BERT's upper layers), cross-attention included."""
        out: dict[str, tuple[str, int, int]] = {}
        depth_v = len(self.vision.blocks)
        for name, _ in self.vision.named_parameters():
            if name.startswith("blocks."):
                layer = int(name.split(".")[1]) + 1
            else:
                layer = depth_v + 1 if name.startswith("norm.") else 0
            out[f"vision.{name}"] = ("vision", layer, depth_v)
        depth_t = len(self.text.layers)
        bert_fusion = isinstance(self.fusion, BertFusion)
        total_t = depth_t + (len(self.fusion.layers) if bert_fusion else 0)
        for name, _ in self.text.named_parameters():
            layer = int(name.split(".")[1]) + 1 if name.startswith("layers.") else 0
            out[f"text.{name}"] = ("text", layer, total_t)
        if bert_fusion:
            for name, _ in self.fusion.layers.named_parameters():
                out[f"fusion.layers.{name}"] = ("text", depth_t + int(name.split(".")[0]) + 1, total_t)
        return out

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vision.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)
        self.fusion.set_grad_checkpointing(enable)


def _split_hf_bert(path: str, cfg: ModelConfig) -> tuple[TextEncoder, list[dict], dict]:
    """The ALBEF layout from one local BERT with its masked-LM head: (text tower with the lower
    text_tower_depth layers loaded, the upper layers' states for the fusion stack, the MLM head state)."""
    try:
        hf_config, bert_state, mlm_state = read_hf_masked_lm(path)
    except ValueError as err:
        raise ConfigError(f"model.text.hf_path (model.layout=albef): {err}") from None
    lower_config = copy.deepcopy(hf_config)
    lower_config.num_hidden_layers = cfg.text_tower_depth()
    text = TextEncoder.from_hf_config(lower_config, attn_backend=cfg.attention)
    lower, upper = split_layers(convert_hf_state_dict(bert_state), cfg.text_tower_depth())
    if len(upper) != cfg.fusion.depth:
        raise ConfigError(f"model.fusion.depth={cfg.fusion.depth}: {path} has {hf_config.num_hidden_layers} "
                          f"layers, {len(upper)} above the text tower's {cfg.text_tower_depth()}")
    text.load_state_dict(lower, strict=True)
    return text, upper, mlm_state
