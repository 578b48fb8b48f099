"""The ALBEF layout: one BERT split in two, its upper layers serving as the fusion stack.

Legend: B batch, I image tokens, T text tokens, N = I + T, W width (= the BERT's), H heads.

ALBEF (salesforce/ALBEF `models/xbert.py`, `fusion_layer: 6` in configs/config_bert.json) runs
bert-base's layers 0-5 as the text encoder (mode='text') and layers 6-11 as the multimodal encoder
(mode='fusion'), each of those given a freshly initialised cross-attention between its
self-attention and its feed-forward; the MLM head is `BertForMaskedLM`'s `cls.predictions`.
Here the upper layers keep BERT's post-norm sublayers and names (`TextLayer`: attn, attn_norm, mlp,
mlp_norm), so BERT's weights copy by name; the cross-attention sublayer is post-norm as ALBEF's
(x = LN(x + cross(x, other))).

Both SemVLP modes run on these layers (`FusionStack.forward`):
  single  image and text tokens concatenated through BERT's self-attention and feed-forward;
  two     each modality through the same self-attention, then each attends to the other through the
          cross-attention, then the same feed-forward. ALBEF itself updates only the text stream
          (image tokens are keys and values); here the image stream is updated too, as SemVLP's.
The modality embedding starts at zero, so text entering the stack is exactly BERT's layer-
(text.depth - fusion.depth) input; there is no final norm (every post-norm layer ends with one).
"""
from __future__ import annotations

import torch
from torch import nn

from megavl.models.attention import MultiHeadAttention
from megavl.models.fusion import FusionStack
from megavl.models.text import TextLayer


class BertFusionLayer(TextLayer):
    """A post-norm BERT layer with a cross-attention sublayer between self-attention and feed-forward."""

    def __init__(self, width: int, heads: int, intermediate: int, eps: float, hidden_act: str,
                 dropout: float, attn_dropout: float, backend: str, cross_attention: bool) -> None:
        super().__init__(width, heads, intermediate, eps, hidden_act, dropout, attn_dropout, backend)
        self.cross = MultiHeadAttention(width, heads, backend=backend, attn_dropout=attn_dropout) \
            if cross_attention else None
        self.cross_drop = nn.Dropout(dropout)
        self.cross_norm = nn.LayerNorm(width, eps=eps) if cross_attention else None

    def _self_attend(self, x_BLW: torch.Tensor, mask_BL: torch.Tensor | None, return_attn: bool):
        out = self.attn(x_BLW, None, mask_BL, return_attn)
        attn_BLW, probs = out if return_attn else (out, None)
        return self.attn_norm(x_BLW + self.attn_drop(attn_BLW)), probs

    def _feed_forward(self, x_BLW: torch.Tensor) -> torch.Tensor:
        return self.mlp_norm(x_BLW + self.mlp(x_BLW))

    def forward_single(self, x_BNW: torch.Tensor, mask_BN: torch.Tensor, return_attn: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Joint tokens (B, N, W), validity (B, N) -> (B, N, W), joint probs (B, H, N, N) | None.

        Padded text positions still get outputs (they attend to the real tokens), as in BERT."""
        x_BNW, probs_BHNN = self._self_attend(x_BNW, mask_BN, return_attn)
        return self._feed_forward(x_BNW), probs_BHNN

    def forward_two(self, image_BIW: torch.Tensor, text_BTW: torch.Tensor, text_mask_BT: torch.Tensor,
                    return_attn: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """-> image (B, I, W), text (B, T, W), text->image cross-attention probs (B, H, T, I) | None."""
        if self.cross is None:
            raise RuntimeError("two-stream mode needs the cross-attention sublayer (cross_attention=True)")
        image_BIW = self._self_attend(image_BIW, None, False)[0]
        text_BTW = self._self_attend(text_BTW, text_mask_BT, False)[0]
        # Both directions read the other modality as it was after self-attention (symmetric update).
        image_cross_BIW = self.cross(image_BIW, text_BTW, key_mask_BS=text_mask_BT)
        text_cross = self.cross(text_BTW, image_BIW, return_attn=return_attn)
        text_cross_BTW, probs_BHTI = text_cross if return_attn else (text_cross, None)
        image_BIW = self.cross_norm(image_BIW + self.cross_drop(image_cross_BIW))
        text_BTW = self.cross_norm(text_BTW + self.cross_drop(text_cross_BTW))
        return self._feed_forward(image_BIW), self._feed_forward(text_BTW), probs_BHTI


class BertFusion(FusionStack):
    """BERT's upper `depth` layers as the fusion stack (the ALBEF layout); see the module docstring.

    Built with random BERT-style weights; `load_bert_layers` copies the BERT's own upper layers in.
    Image tokens are projected to the BERT's width when the vision tower is wider or narrower.
    """

    def __init__(self, depth: int, width: int, heads: int, intermediate: int, vision_width: int,
                 cross_attention: bool = True, layer_norm_eps: float = 1e-12, hidden_act: str = "gelu",
                 dropout: float = 0.0, attn_dropout: float = 0.0, attn_backend: str = "auto") -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.width, self.vision_width, self.text_width = width, vision_width, width
        self.cross_attention = cross_attention
        self.grad_checkpointing = False
        self.image_proj = nn.Linear(vision_width, width) if vision_width != width else nn.Identity()
        self.text_proj = nn.Identity()
        self.modality_embed = nn.Parameter(torch.zeros(2, width))  # rows IMAGE, TEXT; zero: see above
        self.layers = nn.ModuleList(
            BertFusionLayer(width, heads, intermediate, layer_norm_eps, hidden_act, dropout, attn_dropout,
                            attn_backend, cross_attention)
            for _ in range(depth))
        self.norm = nn.Identity()
        for module in self.modules():  # BERT's init: N(0, 0.02) weights, zero biases, unit norms
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def load_bert_layers(self, layer_states: list[dict[str, torch.Tensor]]) -> None:
        """Copy BERT layers (TextLayer names, one state per fusion layer, bottom first) into the
        stack; the cross-attention sublayers keep their fresh weights. Shapes must match."""
        if len(layer_states) != len(self.layers):
            raise ValueError(f"{len(layer_states)} BERT layers for a fusion stack of {len(self.layers)}")
        for layer, state in zip(self.layers, layer_states):
            missing, unexpected = layer.load_state_dict(state, strict=False)
            fresh = [k for k in missing if not k.startswith(("cross.", "cross_norm."))]
            if fresh or unexpected:
                raise ValueError(f"BERT layer weights do not fit a fusion layer: missing {fresh}, "
                                 f"unexpected {unexpected}")
