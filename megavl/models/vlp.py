"""The assembled vision-language model: towers, SemVLP fusion and the heads every objective uses.

Plain PyTorch: no losses, no DeepSpeed. Objectives call its small methods, so one forward pass
(e.g. the masked-image pass) can serve several losses.

Legend: B batch, N patches, K kept patches, L text length, W fusion width, E embedding width.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from megavl.config import ConfigError, ModelConfig

from .fusion import FusionOutput, SemVLPFusion
from .heads import ITMHead, MaskedImageDecoder, MLMHead, PrototypeHead
from .text import TextEncoder
from .vision import VisionTransformer
from .vision_init import load_vision_init

log = logging.getLogger(__name__)


def _check_text_matches(text: TextEncoder, cfg: ModelConfig) -> None:
    """The loaded BERT has the shape and dropout model.text describes (the FLOP count and a rebuild
    for a checkpoint's or an export's weights read model.text). load_config fills these fields from the checkpoint's config.json; a
    ModelConfig built by hand may still disagree."""
    t = cfg.text
    layer = text.layers[0] if len(text.layers) else None
    actual = {"vocab_size": text.word_embeddings.num_embeddings, "width": text.width, "depth": len(text.layers),
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
        if t.hf_path:
            # checked here, where it is read: a model built for a checkpoint's weights never reads it
            if not (Path(t.hf_path) / "config.json").is_file():
                raise ConfigError(f"model.text.hf_path: expected a local Hugging Face model directory with a "
                                  f"config.json, got {t.hf_path!r}")
            self.text = TextEncoder.from_hf(t.hf_path, attn_backend=cfg.attention)
            _check_text_matches(self.text, cfg)
        else:
            log.info("model.text.hf_path is empty: the text tower starts from random weights")
            self.text = TextEncoder(vocab_size=t.vocab_size, width=t.width, depth=t.depth, heads=t.heads,
                                    intermediate=t.intermediate, max_position=t.max_position,
                                    type_vocab_size=t.type_vocab_size, layer_norm_eps=t.layer_norm_eps,
                                    pad_token_id=t.pad_token_id, hidden_act=t.hidden_act,
                                    attn_backend=cfg.attention, dropout=t.dropout, attn_dropout=t.attn_dropout)
        self.fusion = SemVLPFusion(width=f.width, depth=f.depth, heads=f.heads, mlp_ratio=f.mlp_ratio,
                                   vision_width=v.width, text_width=self.text.width,
                                   cross_attention=f.cross_attention, attn_backend=cfg.attention)
        self.vision_proj = nn.Linear(v.width, cfg.embed_dim)
        self.text_proj = nn.Linear(self.text.width, cfg.embed_dim)
        self.itm_head = ITMHead(f.width)
        self.mlm_head = MLMHead(f.width, self.text.word_embeddings)
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

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vision.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)
        self.fusion.set_grad_checkpointing(enable)
