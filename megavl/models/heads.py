"""Task heads on top of the towers and the fusion stack.

Legend: B batch, N patches, K kept patches, L text length, W fusion width, E embedding width,
V vocabulary, P pixels per patch (patch * patch * 3), Kp prototypes.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from megavl_kernels import scatter_tokens

from .vision import Block


class ITMHead(nn.Module):
    """Match / no-match logits from the fused global features of both modalities: (B, W) x 2 -> (B, 2)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(2 * width, width), nn.GELU(), nn.Linear(width, 2))

    def forward(self, image_global_BW: torch.Tensor, text_global_BW: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat([image_global_BW, text_global_BW], dim=-1))


class MLMHead(nn.Module):
    """BERT's prediction head: dense + GELU + LayerNorm, then a decoder tied to the word embeddings.

    The transform maps the fusion width to the text width so that tying works for any fusion width.
    (B, L, W) -> (B, L, V).
    """

    def __init__(self, width: int, word_embeddings: nn.Embedding, eps: float = 1e-12) -> None:
        super().__init__()
        text_width = word_embeddings.embedding_dim
        self.dense = nn.Linear(width, text_width)
        self.norm = nn.LayerNorm(text_width, eps=eps)
        self.decoder = nn.Linear(text_width, word_embeddings.num_embeddings)
        self.decoder.weight = word_embeddings.weight  # tied: one parameter, two uses

    def forward(self, states_BLW: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(states_BLW))))


class PrototypeHead(nn.Module):
    """SemMIM's shared encoding space: ONE head maps the global token and every patch token into
    the same Kp prototype logits (DINO/iBOT head: MLP -> L2-normalised bottleneck -> weight-normalised
    prototypes). (..., W) -> (..., Kp).
    """

    def __init__(self, width: int, num_prototypes: int, hidden: int | None = None, bottleneck: int = 256) -> None:
        super().__init__()
        hidden = hidden or width
        bottleneck = min(bottleneck, width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.empty(num_prototypes, bottleneck))
        nn.init.normal_(self.prototypes, std=1.0 / math.sqrt(bottleneck))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (..., W) -> cosine logits (..., Kp) in at least float32, whatever the weights' dtype
        or autocast: bf16 resolves cosines near 1 to 2^-8, about 0.1 after a 0.04 teacher temperature,
        which is the scale of the centring and sharpening SemMIM's targets rely on."""
        hidden = self.mlp(tokens)
        acc = torch.promote_types(hidden.dtype, torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            z = F.normalize(hidden.to(acc), dim=-1)
            # Weight normalisation with the gain fixed at 1 (DINO's norm_last_layer): logits are cosines.
            return z @ F.normalize(self.prototypes.to(acc), dim=-1).t()


class MaskedImageDecoder(nn.Module):
    """The light MAE-style decoder shared by MIM-pixel and MIM-semantic.

    It re-inserts a mask token at every dropped patch (`scatter_tokens`, one fused pass), adds
    decoder position embeddings, runs a few blocks, and returns per-position states; `pixels`
    reads normalised pixels of a patch from them, `semantic` maps them back to the fusion width so
    that the shared PrototypeHead scores them (SemMIM's student at masked positions; the
    decoder-based read-out is our choice because patches are dropped, not replaced: UNVERIFIED).
    Clips run it per frame: B*T rows, each one frame's kept states with the tube mask's ids_restore
    (`MaskSpec.per_frame`); its position table is spatial only, the frames already exchanged
    information in the encoder and the fusion.
    """

    def __init__(self, width: int, num_patches: int, patch_pixels: int, dec_width: int, depth: int,
                 heads: int, attn_backend: str = "auto") -> None:
        super().__init__()
        self.embed = nn.Linear(width, dec_width)
        self.mask_token = nn.Parameter(torch.zeros(dec_width))
        self.pos_embed = nn.Parameter(torch.zeros(num_patches, dec_width))
        self.blocks = nn.ModuleList(
            Block(dec_width, heads, 4.0, qkv_bias=True, eps=1e-6, drop_path=0.0, backend=attn_backend)
            for _ in range(depth))
        self.norm = nn.LayerNorm(dec_width, eps=1e-6)
        self.pixels = nn.Linear(dec_width, patch_pixels)
        self.semantic = nn.Linear(dec_width, width)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, kept_BKW: torch.Tensor, ids_restore_BN: torch.Tensor) -> torch.Tensor:
        """kept_BKW: fused states of the kept patches in keep order (no [CLS]) -> (B, N, dec_width)."""
        x = scatter_tokens(self.embed(kept_BKW), ids_restore_BN, self.mask_token) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
