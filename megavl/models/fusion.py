"""SemVLP fusion: one shared Transformer stack with a pluggable cross-attention sublayer.

Legend: B batch, I image tokens, T text tokens, N = I + T joint tokens, W fusion width,
H heads, Vw vision width, Tw text width.

SemVLP (Li et al., arXiv 2103.07829) pre-trains ONE Transformer in two modes:
  "single"  cross-attention unplugged: image and text tokens concatenated, one joint self-attention
            (text padding masked, image tokens always valid) -> low-level alignment;
  "two"     cross-attention plugged: each modality through the SAME self-attention weights on its own,
            then each attends to the other (image -> text under the text padding mask, text -> image),
            then the SAME feed-forward -> high-level alignment.
The cross-attention sublayers are the only weights that are not shared between the modes; in single
mode they are skipped and get no gradient. One cross-attention module per layer serves both
directions, as in LXMERT's shared cross-attention (UNVERIFIED that SemVLP does the same: no public
code); a learned modality-type embedding added at the input lets the shared weights tell image tokens
from text tokens in every sublayer.

`FusionStack` holds the two modes for any stack of such layers: `SemVLPFusion` (fresh pre-norm
layers, this file) and `BertFusion` (a BERT's own upper layers, the ALBEF layout: fusion_bert.py).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megavl.models.attention import MultiHeadAttention

MODES = ("single", "two")
IMAGE, TEXT = 0, 1  # rows of the modality-type embedding


class FusionOutput(NamedTuple):
    """What the fusion stack returns. Padded text positions of text_states carry no meaning.

    A NamedTuple, not a dataclass: ZeRO-3 attaches its backward hooks to tensors inside tuples,
    lists and dicts that a module returns; tensors inside a dataclass would get none, and the
    module's own parameters (modality_embed) would be released before their gradients arrive.
    """

    image_states: torch.Tensor             # (B, I, W) after the final LayerNorm
    text_states: torch.Tensor              # (B, T, W)
    image_global: torch.Tensor             # (B, W) image position 0 ([CLS])
    text_global: torch.Tensor              # (B, W) text position 0 ([CLS])
    text_to_image_attn: torch.Tensor | None  # (B, I) float32, sums to 1 over I; see SemVLPFusion.forward


class FeedForward(nn.Module):
    """fc1 -> GELU -> fc2; (B, L, W) -> (B, L, W). Attribute names follow timm's Mlp."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x_BLW: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x_BLW)))


class CrossAttention(nn.Module):
    """The pluggable sublayer: pre-normed queries attend to a pre-normed other modality."""

    def __init__(self, width: int, heads: int, backend: str, eps: float) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(width, eps=eps)
        self.norm_kv = nn.LayerNorm(width, eps=eps)
        self.attn = MultiHeadAttention(width, heads, backend=backend)

    def forward(self, x_BLW: torch.Tensor, context_BSW: torch.Tensor, key_mask_BS: torch.Tensor | None = None,
                query_mask_BL: torch.Tensor | None = None, return_attn: bool = False):
        """-> residual branch (B, L, W), or (branch, probs (B, H, L, S)) when return_attn."""
        return self.attn(self.norm_q(x_BLW), self.norm_kv(context_BSW), key_mask_BS, return_attn,
                         query_mask_BL=query_mask_BL)


class SemVLPLayer(nn.Module):
    """Shared self-attention + shared FFN, with an optional cross-attention sublayer between them.

    Pre-norm (x + f(LN(x))), unlike the post-norm BERT towers: this stack is trained from scratch on
    top of two pre-trained towers, and pre-norm keeps gradients well scaled through the residual path
    without a careful warmup; the stack ends with one final LayerNorm (SemVLPFusion.norm).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, cross_attention: bool,
                 backend: str, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = MultiHeadAttention(width, heads, backend=backend)
        self.cross = CrossAttention(width, heads, backend, eps) if cross_attention else None
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = FeedForward(width, int(width * mlp_ratio))

    def _self_attend(self, x_BLW: torch.Tensor, mask_BL: torch.Tensor | None, return_attn: bool):
        out = self.self_attn(self.norm1(x_BLW), None, mask_BL, return_attn, query_mask_BL=mask_BL)
        return out if return_attn else (out, None)

    def forward_single(self, x_BNW: torch.Tensor, mask_BN: torch.Tensor, return_attn: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Joint tokens (B, N, W), joint validity mask (B, N) -> (B, N, W), joint probs (B, H, N, N) | None."""
        attn_BNW, probs_BHNN = self._self_attend(x_BNW, mask_BN, return_attn)
        x_BNW = x_BNW + attn_BNW
        return x_BNW + self.mlp(self.norm2(x_BNW)), probs_BHNN

    def forward_two(self, image_BIW: torch.Tensor, text_BTW: torch.Tensor, text_mask_BT: torch.Tensor,
                    return_attn: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """-> image (B, I, W), text (B, T, W), text->image cross-attention probs (B, H, T, I) | None."""
        if self.cross is None:
            raise RuntimeError("two-stream mode needs the cross-attention sublayer (cross_attention=True)")
        image_BIW = image_BIW + self._self_attend(image_BIW, None, False)[0]
        text_BTW = text_BTW + self._self_attend(text_BTW, text_mask_BT, False)[0]
        # Both directions read the other modality as it was after self-attention (symmetric update).
        image_cross_BIW = self.cross(image_BIW, text_BTW, key_mask_BS=text_mask_BT)
        text_cross = self.cross(text_BTW, image_BIW, query_mask_BL=text_mask_BT, return_attn=return_attn)
        text_cross_BTW, probs_BHTI = text_cross if return_attn else (text_cross, None)
        image_BIW = image_BIW + image_cross_BIW
        text_BTW = text_BTW + text_cross_BTW
        image_BIW = image_BIW + self.mlp(self.norm2(image_BIW))
        text_BTW = text_BTW + self.mlp(self.norm2(text_BTW))
        return image_BIW, text_BTW, probs_BHTI


def _mean_over_valid_text(probs_BTI: torch.Tensor, text_mask_BT: torch.Tensor) -> torch.Tensor:
    """Average (B, T, I) rows over valid text tokens -> (B, I); a sample with no valid text -> zeros."""
    weights_BT = text_mask_BT.float()
    total_BI = (probs_BTI * weights_BT[:, :, None]).sum(dim=1)
    return total_BI / weights_BT.sum(dim=1, keepdim=True).clamp_min(1.0)


class FusionStack(nn.Module):
    """What every fusion stack shares: the modes, the input checks and checkpointing.

    A subclass sets `image_proj`, `text_proj` (vision/text width -> W), `modality_embed` (2, W),
    `layers` (each with `forward_single` and `forward_two` as SemVLPLayer's) and the final `norm`,
    plus the widths and `cross_attention` flag the checks read.
    """

    width: int
    vision_width: int
    text_width: int
    cross_attention: bool
    grad_checkpointing: bool

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer in backward (torch.utils.checkpoint) to save activation memory."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay: every 1-D one (biases, norms) and modality_embed."""
        return {name for name, p in self.named_parameters() if p.ndim <= 1} | {"modality_embed"}

    def _run(self, fn, *args):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _check_inputs(self, image_BIV: torch.Tensor, text_BTX: torch.Tensor, text_mask_BT: torch.Tensor,
                      mode: str) -> torch.Tensor:
        if mode not in MODES:
            raise ValueError(f"unknown fusion mode {mode!r}; choose one of {MODES}")
        if mode == "two" and not self.cross_attention:
            raise ValueError("mode 'two' needs the cross-attention sublayer; this fusion was built "
                             "with cross_attention=False (single-stream only)")
        if image_BIV.dim() != 3 or image_BIV.shape[-1] != self.vision_width or image_BIV.shape[1] < 1:
            raise ValueError(f"image must be (B, I>=1, {self.vision_width}), got {tuple(image_BIV.shape)}")
        if text_BTX.dim() != 3 or text_BTX.shape[-1] != self.text_width or text_BTX.shape[1] < 1:
            raise ValueError(f"text must be (B, T>=1, {self.text_width}), got {tuple(text_BTX.shape)}")
        if image_BIV.shape[0] != text_BTX.shape[0]:
            raise ValueError(f"batch mismatch: image {image_BIV.shape[0]} vs text {text_BTX.shape[0]}")
        if tuple(text_mask_BT.shape) != tuple(text_BTX.shape[:2]):
            raise ValueError(f"text_mask must be (B, T) = {tuple(text_BTX.shape[:2])}, "
                             f"got {tuple(text_mask_BT.shape)}")
        if text_mask_BT.dtype == torch.bool:
            return text_mask_BT
        if text_mask_BT.is_floating_point() or text_mask_BT.is_complex():
            raise ValueError(f"text_mask must be bool or 0/1 integers (1 = valid), got {text_mask_BT.dtype}")
        return text_mask_BT != 0  # Hugging Face style 0/1 attention_mask

    def forward(self, image_BIV: torch.Tensor, text_BTX: torch.Tensor, text_mask_BT: torch.Tensor,
                mode: str, return_text_to_image_attn: bool = False) -> FusionOutput:
        """Fuse image tokens (B, I, Vw) and text tokens (B, T, Tw) in mode "single" or "two".

        text_mask_BT: (B, T) bool or 0/1, True = real token. Image tokens are all valid.
        return_text_to_image_attn: also return the relevance of each image token to the text,
        (B, I), from the LAST layer (computed on the math path there): in two mode its text->image
        cross-attention probabilities; in single mode the joint attention rows of text queries
        restricted to image columns and renormalised over them. Averaged over heads, then over valid
        text tokens; sums to 1 over I (all zeros for a sample with no valid text). Not detached.
        """
        text_mask_BT = self._check_inputs(image_BIV, text_BTX, text_mask_BT, mode)
        image_BIW = self.image_proj(image_BIV) + self.modality_embed[IMAGE]
        text_BTW = self.text_proj(text_BTX) + self.modality_embed[TEXT]
        n_image, last = image_BIW.shape[1], len(self.layers) - 1
        relevance_BI = None
        if mode == "single":
            x_BNW = torch.cat([image_BIW, text_BTW], dim=1)
            image_valid_BI = text_mask_BT.new_ones(text_mask_BT.shape[0], n_image)
            mask_BN = torch.cat([image_valid_BI, text_mask_BT], dim=1)
            for i, layer in enumerate(self.layers):
                want_attn = return_text_to_image_attn and i == last
                x_BNW, probs_BHNN = self._run(layer.forward_single, x_BNW, mask_BN, want_attn)
            image_BIW, text_BTW = x_BNW[:, :n_image], x_BNW[:, n_image:]
            if return_text_to_image_attn:
                probs_BHTI = probs_BHNN[:, :, n_image:, :n_image]
                probs_BHTI = probs_BHTI / probs_BHTI.sum(dim=-1, keepdim=True).clamp_min(1e-12)
                relevance_BI = _mean_over_valid_text(probs_BHTI.mean(dim=1), text_mask_BT)
        else:
            for i, layer in enumerate(self.layers):
                want_attn = return_text_to_image_attn and i == last
                image_BIW, text_BTW, probs_BHTI = self._run(layer.forward_two, image_BIW, text_BTW,
                                                            text_mask_BT, want_attn)
            if return_text_to_image_attn:
                relevance_BI = _mean_over_valid_text(probs_BHTI.mean(dim=1), text_mask_BT)
        image_BIW, text_BTW = self.norm(image_BIW), self.norm(text_BTW)
        return FusionOutput(image_states=image_BIW, text_states=text_BTW, image_global=image_BIW[:, 0],
                            text_global=text_BTW[:, 0], text_to_image_attn=relevance_BI)


class SemVLPFusion(FusionStack):
    """The SemVLP fusion stack: input projections + modality embedding, shared pre-norm layers, final norm."""

    def __init__(self, width: int = 768, depth: int = 6, heads: int = 12, mlp_ratio: float = 4.0,
                 vision_width: int = 768, text_width: int = 768, cross_attention: bool = True,
                 attn_backend: str = "auto", layer_norm_eps: float = 1e-6) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.width, self.vision_width, self.text_width = width, vision_width, text_width
        self.cross_attention = cross_attention
        self.grad_checkpointing = False
        self.image_proj = nn.Linear(vision_width, width) if vision_width != width else nn.Identity()
        self.text_proj = nn.Linear(text_width, width) if text_width != width else nn.Identity()
        self.modality_embed = nn.Parameter(torch.zeros(2, width))  # rows IMAGE, TEXT
        self.layers = nn.ModuleList(
            SemVLPLayer(width, heads, mlp_ratio, cross_attention, attn_backend, layer_norm_eps)
            for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=layer_norm_eps)
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.modality_embed, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
