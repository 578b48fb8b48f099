"""Vision tower: a timm-compatible ViT that can encode only the kept patches (MAE) and several frames.

Legend: B batch, T frames, C channels, H/W image height/width, N patches per frame, K kept patches
per frame, S = 1 + K tokens of one frame, E width, L sequence length, Hd heads, D head dim.

SCL's flexible encoder (IIGROUP/SCL `clip_model_video.py`): every frame gets its own [CLS] token;
inside the blocks a frame's [CLS] attends to the tokens of ALL frames while its patch tokens attend
only within their own frame (divided attention: the [CLS] tokens carry the temporal exchange, so
the cost grows like T*S^2 + T^2*S, not (T*S)^2). One image is a 1-frame clip through the same
weights, where this is exactly timm's ViT. Position embeddings: the spatial table tiled over the
frames plus a learned temporal embedding (zero at init, `num_frames` entries, linearly resampled
when a clip has another T). A 1-frame clip (an image) reads no temporal entry: there is no frame
order to tell, and image steps of a mixed run then neither train the table nor depend on it.

Token layout of the output (B, 1 + T*K, E): the clip [CLS] = the mean of the T frame [CLS] tokens,
then frame 0's kept patches, frame 1's, ... (frame-major), all after the final LayerNorm, as timm's
`forward_features` for T = 1. Parameter names mirror timm's `VisionTransformer` so `from_timm` is a
straight state-dict copy.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megavl_kernels import gather_tokens
from megavl.models.attention import BACKENDS, attention
from megavl.models.layers import DropPath, Mlp, merge_heads, no_decay_names

# timm parameters that belong to the classifier head, which forward_features never uses.
_TIMM_HEAD_PREFIXES = ("head.", "fc_norm.", "attn_pool.")


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resample_pos_embed(pos_embed_1LE: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int],
                       num_prefix_tokens: int = 1) -> torch.Tensor:
    """Bicubic resampling of the patch part of an absolute position embedding (timm semantics).

    pos_embed_1LE: (1, num_prefix_tokens + old_h*old_w, E) -> (1, num_prefix_tokens + new_h*new_w, E).
    Prefix ([CLS]) entries are kept as they are; the interpolation runs in fp32 with antialiasing,
    as timm's `resample_abs_pos_embed`.
    """
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed_1LE
    prefix_1PE, grid_1NE = pos_embed_1LE[:, :num_prefix_tokens], pos_embed_1LE[:, num_prefix_tokens:]
    E = pos_embed_1LE.shape[-1]
    if grid_1NE.shape[1] != old_grid[0] * old_grid[1]:
        raise ValueError(f"position embedding has {grid_1NE.shape[1]} patch entries, "
                         f"not {old_grid[0]}x{old_grid[1]}")
    grid_1EHW = grid_1NE.float().reshape(1, old_grid[0], old_grid[1], E).permute(0, 3, 1, 2)
    grid_1EHW = F.interpolate(grid_1EHW, size=tuple(new_grid), mode="bicubic", antialias=True,
                              align_corners=False)
    grid_1NE = grid_1EHW.permute(0, 2, 3, 1).reshape(1, -1, E).to(pos_embed_1LE.dtype)
    return torch.cat([prefix_1PE, grid_1NE], dim=1)


def resample_temporal_embed(table_TE: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(T, E) -> (num_frames, E), linear between the segment centres (align_corners=False)."""
    table_1ET = table_TE.t()[None]
    return F.interpolate(table_1ET, size=num_frames, mode="linear", align_corners=False)[0].t()


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided conv: (B, C, H, W) -> (B, N, E), row-major patch order."""

    def __init__(self, patch_size: int, in_chans: int, width: int, bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.proj(images_BCHW).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv Linear (timm layout): (B, L, E) -> (B, L, E)."""

    def __init__(self, width: int, heads: int, qkv_bias: bool, backend: str) -> None:
        super().__init__()
        self.heads = heads
        self.backend = backend
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)

    def forward(self, x_BLE: torch.Tensor, num_frames: int = 1) -> torch.Tensor:
        """x (B, T*S, E), frame-major with each frame's [CLS] first; T = num_frames.

        T = 1: plain self-attention. T > 1: patch tokens attend within their frame, [CLS] tokens
        over every token of the clip (SCL's `attention_frames_g`).
        """
        B, L, E = x_BLE.shape
        Hd, D = self.heads, E // self.heads
        if num_frames == 1:
            qkv_3BHLD = self.qkv(x_BLE).view(B, L, 3, Hd, D).permute(2, 0, 3, 1, 4)
            q_BHLD, k_BHLD, v_BHLD = qkv_3BHLD.unbind(0)
            return self.proj(merge_heads(attention(q_BHLD, k_BHLD, v_BHLD, backend=self.backend)))
        T, S = num_frames, L // num_frames
        qkv_3BTSHD = self.qkv(x_BLE).view(B, T, S, 3, Hd, D).permute(3, 0, 1, 2, 4, 5)
        q_BTSHD, k_BTSHD, v_BTSHD = qkv_3BTSHD.unbind(0)

        def per_frame(t_BTSHD: torch.Tensor) -> torch.Tensor:  # -> (B*T, Hd, S or K, D)
            return t_BTSHD.reshape(B * T, -1, Hd, D).transpose(1, 2)

        def whole_clip(t_BTSHD: torch.Tensor) -> torch.Tensor:  # -> (B, Hd, T*S, D)
            return t_BTSHD.reshape(B, T * S, Hd, D).transpose(1, 2)

        patches_XHKD = attention(per_frame(q_BTSHD[:, :, 1:]), per_frame(k_BTSHD), per_frame(v_BTSHD),
                                 backend=self.backend)
        cls_BHTD = attention(q_BTSHD[:, :, 0].transpose(1, 2), whole_clip(k_BTSHD), whole_clip(v_BTSHD),
                             backend=self.backend)
        cls_BT1E = cls_BHTD.transpose(1, 2).reshape(B, T, 1, E)
        patches_BTKE = patches_XHKD.transpose(1, 2).reshape(B, T, S - 1, E)
        return self.proj(torch.cat([cls_BT1E, patches_BTKE], dim=2).view(B, L, E))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)); (B, L, E) -> (B, L, E)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, qkv_bias: bool, eps: float,
                 drop_path: float, backend: str, act: str = "gelu") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads, qkv_bias, backend)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, int(width * mlp_ratio), act=act)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x_BLE: torch.Tensor, num_frames: int = 1) -> torch.Tensor:
        x_BLE = x_BLE + self.drop_path1(self.attn(self.norm1(x_BLE), num_frames))
        return x_BLE + self.drop_path2(self.mlp(self.norm2(x_BLE)))


class VisionTransformer(nn.Module):
    """ViT encoder over one image or T frames, optionally on a subset of patches (keep_ids).

    A 1-frame model has exactly timm's parameters. With num_frames > 1 a learned temporal
    embedding (num_frames, E), zero-initialised, is added to every token of frame t (its [CLS]
    included); clips of another length T > 1 use it linearly resampled to T entries, and a 1-frame
    clip uses none (an image encodes the same with any table). A model freshly
    loaded from timm therefore starts with no notion of frame order (SCL's flexible encoder).
    CLIP towers differ in three switches: pre_norm (a LayerNorm before the blocks, CLIP's ln_pre),
    act="quick_gelu" (OpenAI's weights) and patch_bias=False.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 width: int = 768, depth: int = 12, heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, num_frames: int = 1, layer_norm_eps: float = 1e-6,
                 drop_path: float = 0.0, attn_backend: str = "auto", pre_norm: bool = False,
                 act: str = "gelu", patch_bias: bool = True) -> None:
        super().__init__()
        img_hw = _pair(img_size)
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        if img_hw[0] % patch_size or img_hw[1] % patch_size:
            raise ValueError(f"img_size {img_hw} is not a multiple of patch_size {patch_size}")
        if attn_backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {attn_backend!r}; choose one of {BACKENDS}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.img_size = img_hw
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid_size = (img_hw[0] // patch_size, img_hw[1] // patch_size)
        self.num_frames = num_frames
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(patch_size, in_chans, width, bias=patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, width))
        if num_frames > 1:
            self.temporal_embed = nn.Parameter(torch.zeros(num_frames, width))
        else:
            self.register_parameter("temporal_embed", None)
        # Stochastic depth grows linearly with depth, as in DeiT/timm.
        rates = torch.linspace(0.0, drop_path, depth).tolist()
        self.norm_pre = nn.LayerNorm(width, eps=layer_norm_eps) if pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio, qkv_bias, layer_norm_eps, rate, attn_backend, act) for rate in rates)
        self.norm = nn.LayerNorm(width, eps=layer_norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        """timm's default ViT init; temporal_embed stays zero so extra frames start as plain ViT."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def num_patches(self) -> int:
        """Patches per frame, N."""
        return self.grid_size[0] * self.grid_size[1]

    @property
    def width(self) -> int:
        return self.cls_token.shape[-1]

    def no_weight_decay(self) -> set[str]:
        """cls/pos/temporal embeddings plus every 1-D parameter (biases, LayerNorm scales)."""
        return no_decay_names(self, {"cls_token", "pos_embed", "temporal_embed"})

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of storing its activations."""
        self.grad_checkpointing = enable

    def resize_pos_embed(self, new_img_size: int | tuple[int, int]) -> None:
        """Resample the patch position embeddings (bicubic) to a new input resolution, in place.

        Replaces the pos_embed Parameter: build optimizers after calling this.
        """
        new_hw = _pair(new_img_size)
        if new_hw[0] % self.patch_size or new_hw[1] % self.patch_size:
            raise ValueError(f"img_size {new_hw} is not a multiple of patch_size {self.patch_size}")
        new_grid = (new_hw[0] // self.patch_size, new_hw[1] // self.patch_size)
        resampled = resample_pos_embed(self.pos_embed.detach(), new_grid, self.grid_size)
        self.pos_embed = nn.Parameter(resampled.clone(), requires_grad=self.pos_embed.requires_grad)
        self.img_size, self.grid_size = new_hw, new_grid

    def _as_frames(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) or (B, T, C, H, W) -> (B, T, C, H, W), checking every size."""
        if images.ndim == 4:
            images = images.unsqueeze(1)
        if images.ndim != 5:
            raise ValueError(f"images must be (B, C, H, W) or (B, T, C, H, W), got shape {tuple(images.shape)}")
        _, T, C, H, W = images.shape
        if C != self.in_chans:
            raise ValueError(f"expected {self.in_chans} channels, got {C} (shape {tuple(images.shape)})")
        if (H, W) != self.img_size:
            raise ValueError(f"expected {self.img_size[0]}x{self.img_size[1]} images, got {H}x{W}; "
                             "call resize_pos_embed() to change the resolution")
        if T < 1 or (T > 1 and self.temporal_embed is None):
            raise ValueError(f"got {T} frames; this model has no temporal embedding "
                             "(build it with num_frames > 1 to encode clips)")
        return images

    def _check_keep_ids(self, keep_ids: torch.Tensor, batch: int) -> None:
        if keep_ids.ndim != 2 or keep_ids.shape[0] != batch:
            raise ValueError(f"keep_ids must be (B={batch}, K), got shape {tuple(keep_ids.shape)}")
        if keep_ids.dtype.is_floating_point or keep_ids.dtype == torch.bool:
            raise ValueError(f"keep_ids must be an integer tensor, got {keep_ids.dtype}")
        if keep_ids.shape[1] > self.num_patches:
            raise ValueError(f"keep_ids keeps {keep_ids.shape[1]} patches of only {self.num_patches}")
        # Asynchronous on CUDA (no host sync); raises at once on CPU.
        in_range = ((keep_ids >= 0) & (keep_ids < self.num_patches)).all()
        torch._assert_async(in_range, f"keep_ids out of range [0, {self.num_patches})")

    def temporal_embedding(self, num_frames: int) -> torch.Tensor | None:
        """(T, E): the learned table, linearly resampled (segment centres) when T != num_frames;
        None for one frame. An image reading the table's middle would make the table a bias on every
        image token, trained by image steps at the table's own (higher) rate and moved by video
        steps under the images' feet."""
        if self.temporal_embed is None or num_frames == 1:
            return None
        if num_frames == self.num_frames:
            return self.temporal_embed
        return resample_temporal_embed(self.temporal_embed, num_frames)

    def embed(self, images: torch.Tensor, keep_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings before the blocks: (B, T*S, E), per frame t
        [cls + pos_cls + temporal_t, (patch + pos + temporal_t)[keep]] (tube masking: the same
        `keep_ids` in every frame)."""
        frames_BTCHW = self._as_frames(images)
        B, T = frames_BTCHW.shape[:2]
        patches_XNE = self.patch_embed(frames_BTCHW.flatten(0, 1))  # X = B*T, frame-major per sample
        pos_NE = self.pos_embed[0, 1:]
        if keep_ids is None:
            tokens_XKE = patches_XNE + pos_NE
        else:
            self._check_keep_ids(keep_ids, B)
            tokens_XKE = gather_tokens(patches_XNE, keep_ids.repeat_interleave(T, dim=0), pos_NE)
        tokens_BTKE = tokens_XKE.view(B, T, tokens_XKE.shape[1], -1)
        cls_BT1E = (self.cls_token + self.pos_embed[:, :1]).expand(B, T, 1, -1)
        tokens_BTSE = torch.cat([cls_BT1E, tokens_BTKE], dim=2)
        temporal_TE = self.temporal_embedding(T)
        if temporal_TE is not None:
            tokens_BTSE = tokens_BTSE + temporal_TE[:, None, :]
        return tokens_BTSE.flatten(1, 2)

    def forward(self, images: torch.Tensor, keep_ids: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, C, H, W) or (B, T, C, H, W); keep_ids (B, K) int patch indices in [0, N) or None.

        Returns (B, 1 + T*K, E) tokens after the final norm: the clip [CLS] (mean of the frame
        [CLS] tokens) first, then the patches frame-major (K = N without keep_ids). Masked patches
        are dropped, not replaced (MAE), at the same positions in every frame.
        """
        return self.clip_tokens(self.forward_frames(images, keep_ids))

    def forward_frames(self, images: torch.Tensor, keep_ids: torch.Tensor | None = None) -> torch.Tensor:
        """As forward, but (B, T, S, E): every frame's own [CLS] and kept patches."""
        T = 1 if images.ndim == 4 else images.shape[1]
        x_BLE = self.norm_pre(self.embed(images, keep_ids))
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x_BLE = checkpoint(block, x_BLE, T, use_reentrant=False)
            else:
                x_BLE = block(x_BLE, T)
        x_BLE = self.norm(x_BLE)
        return x_BLE.view(x_BLE.shape[0], T, x_BLE.shape[1] // T, -1)

    @staticmethod
    def clip_tokens(frames_BTSE: torch.Tensor) -> torch.Tensor:
        """(B, T, S, E) -> (B, 1 + T*(S-1), E): mean of the frame [CLS] tokens, then the patches."""
        cls_B1E = frames_BTSE[:, :, 0].mean(dim=1, keepdim=True)
        return torch.cat([cls_B1E, frames_BTSE[:, :, 1:].flatten(1, 2)], dim=1)

    @classmethod
    def from_timm(cls, timm_model: nn.Module, img_size: int | tuple[int, int] | None = None,
                  num_frames: int = 1, drop_path: float = 0.0, attn_backend: str = "auto") -> "VisionTransformer":
        """A megavl ViT with the weights of a timm `VisionTransformer` (classifier head dropped).

        img_size other than the timm model's resamples the position embeddings (bicubic).
        Architectures beyond plain ViT (register tokens, layer scale, qk-norm, ...) are refused.
        """
        model = cls(**_config_from_timm(timm_model), num_frames=num_frames, drop_path=drop_path,
                    attn_backend=attn_backend)
        ours = model.state_dict()
        theirs = {k: v for k, v in timm_model.state_dict().items() if not k.startswith(_TIMM_HEAD_PREFIXES)}
        missing = sorted(set(ours) - set(theirs) - {"temporal_embed"})
        unexpected = sorted(set(theirs) - set(ours))
        if missing or unexpected:
            raise ValueError(f"timm model is not a plain ViT: missing {missing}, unsupported {unexpected}")
        for name, tensor in theirs.items():
            if tensor.shape != ours[name].shape:
                raise ValueError(f"{name}: timm shape {tuple(tensor.shape)} != ours {tuple(ours[name].shape)}")
        model.load_state_dict(theirs, strict=False)
        if img_size is not None:
            model.resize_pos_embed(img_size)
        return model


def _config_from_timm(timm_model: nn.Module) -> dict:
    """Constructor arguments matching a timm VisionTransformer; raises on features we do not model."""
    from timm.layers import PatchEmbed as TimmPatchEmbed
    from timm.models.vision_transformer import Block as TimmBlock
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    if not isinstance(timm_model, TimmViT):
        raise TypeError(f"expected a timm VisionTransformer, got {type(timm_model).__name__}")
    unsupported = {
        "no class token": timm_model.cls_token is None,
        "register tokens": timm_model.reg_token is not None,
        "pos embed without class entry (no_embed_class)": timm_model.no_embed_class,
        "no position embedding": timm_model.pos_embed is None,
        "pre-norm (norm_pre) not LayerNorm": not isinstance(timm_model.norm_pre, (nn.Identity, nn.LayerNorm)),
        "final norm not LayerNorm": not isinstance(timm_model.norm, nn.LayerNorm),
        "patch embed type or norm": not isinstance(timm_model.patch_embed, TimmPatchEmbed)
        or not isinstance(timm_model.patch_embed.norm, nn.Identity),
        "non-square patches": timm_model.patch_embed.patch_size[0] != timm_model.patch_embed.patch_size[1],
    }
    blocks = list(timm_model.blocks)
    unsupported["block type"] = any(type(block) is not TimmBlock for block in blocks)
    unsupported["layer scale / qk-norm / extra norms"] = any(
        not isinstance(m, nn.Identity) for block in blocks
        for m in (block.ls1, block.ls2, block.attn.q_norm, block.attn.k_norm, block.attn.norm, block.mlp.norm))
    acts = {_timm_act_name(block.mlp.act) for block in blocks}
    unsupported["MLP activation other than exact GELU or QuickGELU"] = None in acts or len(acts) != 1
    problems = [name for name, bad in unsupported.items() if bad]
    if problems:
        raise ValueError(f"timm model uses features megavl's ViT does not have: {problems}")
    first = timm_model.blocks[0]
    width = timm_model.embed_dim
    mlp_ratio = first.mlp.fc1.out_features / width
    if int(width * mlp_ratio) != first.mlp.fc1.out_features:
        raise ValueError(f"MLP width {first.mlp.fc1.out_features} is not int(width * ratio) for any ratio")
    return dict(
        img_size=tuple(timm_model.patch_embed.img_size),
        patch_size=timm_model.patch_embed.patch_size[0],
        in_chans=timm_model.patch_embed.proj.in_channels,
        width=width,
        depth=len(timm_model.blocks),
        heads=first.attn.num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=first.attn.qkv.bias is not None,
        layer_norm_eps=timm_model.norm.eps,
        pre_norm=isinstance(timm_model.norm_pre, nn.LayerNorm),
        act=acts.pop(),
        patch_bias=timm_model.patch_embed.proj.bias is not None,
    )


def _timm_act_name(act: nn.Module) -> str | None:
    """Our name for a timm MLP activation, None for one we do not have."""
    from timm.layers import QuickGELU as TimmQuickGELU

    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    if isinstance(act, TimmQuickGELU):
        return "quick_gelu"
    return None
