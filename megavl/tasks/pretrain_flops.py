"""Analytic FLOPs of one pre-training step (the MFU numerator; the peak and MFU are engine/metrics.py's).

`step_flops` follows `PretrainModule.forward` pass by pass (tasks/pretrain.py): which passes run
for a mode and its active objectives, on how many tokens, and which of them get a backward. It counts
exactly the matrix products that `torch.utils.flop_counter.FlopCounterMode` counts (mm, addmm, bmm,
convolution, attention kernels); norms, softmax, GELU, gathers and losses are not FLOPs here.

Conventions (model FLOPs, as PaLM's MFU):
  * a GEMM (m x k) @ (k x n) costs 2*m*k*n;
  * attention costs 2*B*Lq*Lk*W for q k^T and again for probs v, over PADDED lengths (the kernels
    compute the padded positions too);
  * backward of a GEMM whose two operands both need a gradient (a Linear with a trainable weight and
    an input that carries a graph) is 2x forward; 1x when only one does (the patch-embedding conv:
    the images need no gradient; contrastive logits against a detached target); 0 under no_grad
    (the teacher) or when no loss is reachable from the output (autograd never runs that node);
  * recomputation is NOT counted: activation checkpointing and flash attention's backward (which
    recomputes q k^T; FlopCounterMode counts its sdpa backward as 2.5x forward) do more hardware
    FLOPs than this, so MFU stays comparable across those settings.

Clips of T frames: every vision pass is `vision_tower_flops` at T (divided attention), the fusion
sees 1 + T*N (or 1 + T*K) image tokens, the MAE decoder and the MIM heads run on B*T frame rows.

Legend: B batch, T frames, N patches per frame, K kept patches, M = N - K masked, L text length
(padded), Wv/Wt/W vision, text, fusion widths, Dd decoder width, E ITC embedding width, V vocabulary,
Kp prototypes.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from megavl.config import FusionConfig, ModelConfig, ObjectivesConfig
from megavl.objectives.masking import num_kept

# Constructor defaults of the modules (models/) that the config does not carry.
_IN_CHANS = 3                  # VisionTransformer(in_chans=3): RGB images
_DECODER_MLP_RATIO = 4.0       # MaskedImageDecoder builds Block(dec_width, heads, 4.0, ...)
_PROTOTYPE_BOTTLENECK = 256    # PrototypeHead(bottleneck=256), capped at the fusion width

FUSION_GRADS = ("none", "image", "text", "both")


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step: student forward + backward, teacher forward only.

    breakdown: pass name -> FLOPs of that pass (forward + its backward); sums to `total`.
    """

    forward: int
    backward: int
    breakdown: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.forward + self.backward


# ------------------------------------------------------------------------------------ building blocks
def _gemm(m: int, k: int, n: int) -> int:
    """(m x k) @ (k x n)."""
    return 2 * m * k * n


def _attention(batch: int, q_len: int, k_len: int, width: int) -> int:
    """q k^T and probs v over all heads: 2 * 2*B*Lq*Lk*W (heads split W, they do not change the count)."""
    return 2 * _gemm(batch * q_len, width, k_len)


def _vit_block(batch: int, tokens: int, width: int, hidden: int) -> int:
    """Pre-norm ViT block (models/vision.py Block): fused qkv, proj, attention, fc1, fc2."""
    t = batch * tokens
    return (_gemm(t, width, 3 * width) + _gemm(t, width, width) + _attention(batch, tokens, tokens, width)
            + _gemm(t, width, hidden) + _gemm(t, hidden, width))


def vision_tower_flops(model: ModelConfig, batch: int, num_frames: int = 1, kept: int | None = None) -> int:
    """Forward FLOPs of the vision tower (models/vision.py) on B clips of T frames, K kept patches
    per frame (None: all N), S = 1 + K tokens per frame.

    Patch embedding over all B*T*N patches; per block the token-wise GEMMs on B*T*S tokens, and the
    divided attention: T = 1 full attention over S; T > 1 patch queries over their frame's S keys
    plus each frame's [CLS] query over the clip's T*S keys.
    """
    v = model.vision
    n = (v.img_size // v.patch_size) ** 2
    k = n if kept is None else kept
    s, t, hidden = 1 + k, num_frames, int(v.width * v.mlp_ratio)
    tokens = batch * t * s
    if t == 1:
        attn = _attention(batch, s, s, v.width)
    else:
        attn = _attention(batch * t, k, s, v.width) + _attention(batch, t, t * s, v.width)
    block = (_gemm(tokens, v.width, 3 * v.width) + _gemm(tokens, v.width, v.width) + attn
             + _gemm(tokens, v.width, hidden) + _gemm(tokens, hidden, v.width))
    conv = _gemm(batch * t * n, _IN_CHANS * v.patch_size ** 2, v.width)
    return conv + v.depth * block


def _vision_pass(model: ModelConfig, batch: int, num_frames: int, kept: int | None = None) -> tuple[int, int]:
    """(patch-embedding conv, blocks) forward FLOPs of one vision pass; split because the conv's
    backward is its weight gradient only (the images need none) while the blocks' is 2x."""
    v = model.vision
    conv = _gemm(batch * num_frames * (v.img_size // v.patch_size) ** 2, _IN_CHANS * v.patch_size ** 2, v.width)
    return conv, vision_tower_flops(model, batch, num_frames, kept) - conv


def _text_tower(model: ModelConfig, batch: int, text_len: int) -> int:
    """BERT layers (models/text.py): q, k, v, out, attention, intermediate, output; the ALBEF
    layout's text tower runs only the layers below the fusion."""
    t, w = batch * text_len, model.text.width
    layer = (4 * _gemm(t, w, w) + _attention(batch, text_len, text_len, w)
             + _gemm(t, w, model.text.intermediate) + _gemm(t, model.text.intermediate, w))
    return model.text_tower_depth() * layer


def _fusion(model: ModelConfig, batch: int, n_image: int, text_len: int, mode: str, grad: str
            ) -> tuple[int, int]:
    """(forward, backward) of one fusion call on (B, n_image) image and (B, L) text tokens. The ALBEF
    layout's stack (BERT's upper layers, models/fusion_bert.py) has the same GEMMs: its width, heads
    and feed-forward are the text tower's, which config_checks makes model.fusion's.

    grad: which outputs feed a loss: "none" | "image" | "text" | "both". In two mode the last layer's
    cross-attention and feed-forward of an unused modality are unreachable from the loss, so autograd
    skips them; in single mode every GEMM mixes both modalities and always runs backward.
    """
    if grad not in FUSION_GRADS:
        raise ValueError(f"grad must be one of {FUSION_GRADS}, got {grad!r}")
    f: FusionConfig = model.fusion
    w, hidden = f.width, int(f.width * f.mlp_ratio)
    proj = 0
    if model.vision.width != w:
        proj += _gemm(batch * n_image, model.vision.width, w)
    if model.text.width != w:
        proj += _gemm(batch * text_len, model.text.width, w)

    def self_attn(n: int) -> int:
        return 4 * _gemm(batch * n, w, w) + _attention(batch, n, n, w)

    def cross(n_q: int, n_kv: int) -> int:  # q, out on the queries; k, v on the context
        return 2 * _gemm(batch * n_q, w, w) + 2 * _gemm(batch * n_kv, w, w) + _attention(batch, n_q, n_kv, w)

    def mlp(n: int) -> int:
        return _gemm(batch * n, w, hidden) + _gemm(batch * n, hidden, w)

    if mode == "single":
        n = n_image + text_len
        layer, unreached = self_attn(n) + mlp(n), 0
    elif mode == "two":
        image_side, text_side = cross(n_image, text_len) + mlp(n_image), cross(text_len, n_image) + mlp(text_len)
        layer = self_attn(n_image) + self_attn(text_len) + image_side + text_side
        unreached = {"both": 0, "image": text_side, "text": image_side, "none": 0}[grad]
    else:
        raise ValueError(f"unknown fusion mode {mode!r}")
    forward = proj + f.depth * layer
    backward = 0 if grad == "none" else 2 * (forward - unreached)
    return forward, backward


def _decoder(model: ModelConfig, batch: int, n_kept: int, n_patches: int) -> int:
    """MaskedImageDecoder trunk: embed the K kept fused states, then blocks over all N positions."""
    d = model.decoder
    return (_gemm(batch * n_kept, model.fusion.width, d.width)
            + d.depth * _vit_block(batch, n_patches, d.width, int(d.width * _DECODER_MLP_RATIO)))


def _prototype_head(model: ModelConfig, tokens: int) -> int:
    """MLP (W -> W -> bottleneck), then cosine logits against Kp prototypes."""
    w = model.fusion.width
    bottleneck = min(_PROTOTYPE_BOTTLENECK, w)
    return _gemm(tokens, w, w) + _gemm(tokens, w, bottleneck) + _gemm(tokens, bottleneck, model.num_prototypes)


# --------------------------------------------------------------------------------------- the step
class _Tally:
    """Forward and backward FLOPs per pass name."""

    def __init__(self) -> None:
        self.forward: dict[str, int] = defaultdict(int)
        self.backward: dict[str, int] = defaultdict(int)

    def add(self, name: str, forward: int, backward: int) -> None:
        self.forward[name] += forward
        self.backward[name] += backward

    def train(self, name: str, forward: int, trains: bool = True) -> None:
        """A pass whose GEMMs all get grad input + grad weight when `trains`, else forward only."""
        self.add(name, forward, 2 * forward if trains else 0)

    def result(self) -> StepFlops:
        names = sorted(set(self.forward) | set(self.backward))
        breakdown = {n: self.forward[n] + self.backward[n] for n in names if self.forward[n] + self.backward[n]}
        return StepFlops(sum(self.forward.values()), sum(self.backward.values()), breakdown)


def step_flops(model_cfg: ModelConfig, obj_cfg: ObjectivesConfig, active: list[str], mode: str,
               batch_size: int, text_len: int, num_mlm_tokens: int, *, world_size: int = 1,
               num_frames: int = 1) -> StepFlops:
    """Analytic FLOPs of one `PretrainModule.forward(batch, mode)` + backward on one rank.

    active: `PretrainModule.active(mode)`; batch_size: B images or clips (and captions) of the step;
    num_frames: T, the frames per clip (1 for images: `batch["images"]` (B, 3, S, S));
    text_len: the padded L of input_ids; num_mlm_tokens: masked tokens in the whole batch
    (`(mlm_labels != -100).sum()`), the only rows the vocabulary head runs on.
    world_size: ranks the contrastive features are gathered over (each rank computes its B rows of
    the ITC, SCL and ITM-sampling similarities against the world*B gathered columns, one B x world*B
    product per direction; in one process a B x B product serves both). Every other term is linear
    in batch_size, so passing the global batch with world_size=1 gives the global step FLOPs up to
    those small similarity matrices.
    The model's shapes are read from model_cfg: load_config fills model.text from the config.json of a
    BERT loaded by text.hf_path, and VLPModel refuses a model.text that disagrees with the loaded tower.
    """
    if mode not in ("single", "two"):
        raise ValueError(f"unknown mode {mode!r}; choose single | two")
    if min(batch_size, text_len, world_size, num_frames) < 1 or num_mlm_tokens < 0:
        raise ValueError(f"need batch_size, text_len, world_size, num_frames >= 1 and num_mlm_tokens >= 0; "
                         f"got {batch_size}, {text_len}, {world_size}, {num_frames}, {num_mlm_tokens}")
    v, o, B, L, T = model_cfg.vision, obj_cfg, batch_size, text_len, num_frames
    e, w, wt = model_cfg.embed_dim, model_cfg.fusion.width, model_cfg.text.width
    n = (v.img_size // v.patch_size) ** 2
    k = num_kept(n, o.masking.image_mask_ratio)
    # the unimodal image pass under FLIP patch dropout (a training step): u patches per frame
    u = num_kept(n, v.patch_dropout) if v.patch_dropout > 0 else n
    gathered, frame_rows = world_size * B, B * T
    on = set(active)
    scl_own_image = "scl" in on and o.scl.image_mask_ratio > 0   # SCL's own masked passes
    scl_own_text = "scl" in on and o.scl.text_mask_prob > 0
    masked_image = bool(on & {"mim_pixel", "mim_sem"}) or ("scl" in on and not scl_own_image)
    guided = masked_image and o.masking.text_guided
    distill = "itc" in on and o.itc.queue_size > 0
    t = _Tally()

    # Teachers: no_grad, forward only. SemMIM's (and the text-guided masks') fuses image and text;
    # ALBEF's momentum model for ITC's queue and distillation runs its towers and projections.
    towers = vision_tower_flops(model_cfg, B, T) + _text_tower(model_cfg, B, L)
    if "mim_sem" in on or guided:
        t.add("teacher", towers + _fusion(model_cfg, B, 1 + T * n, L, mode, "none")[0], 0)
        if "mim_sem" in on:
            t.add("teacher", _prototype_head(model_cfg, B * (1 + T * n)), 0)
    if distill:
        t.add("itc_teacher", towers + _gemm(B, v.width, e) + _gemm(B, wt, e), 0)

    # Unimodal passes. The image (u of n patches) feeds ITC, the ITM pairs and the masked-text fusion;
    # the text feeds ITC, the ITM pairs and the masked-image fusion. The conv (over all n patches:
    # the gather follows it) has only its weight gradient in backward.
    image_trains = bool(on & {"itc", "itm", "mlm", "scl"})
    conv, blocks = _vision_pass(model_cfg, B, T, u)
    t.add("image", conv + blocks, (conv + 2 * blocks) * image_trains)
    t.train("text", _text_tower(model_cfg, B, L), trains=bool(on & {"itc", "itm"}) or masked_image or scl_own_image)
    # Embeddings are always computed (ITM's hard negatives read them too); they train only under ITC.
    t.train("itc", _gemm(B, v.width, e) + _gemm(B, wt, e), trains="itc" in on)
    directions = 1 if world_size == 1 else 2  # products of this rank's rows with the columns
    if "itc" in on and o.itc.queue_size == 0:
        t.train("itc", directions * _gemm(B, e, gathered))
    elif "itc" in on:
        columns = gathered + o.itc.queue_size
        t.add("itc", 2 * _gemm(B, e, columns), 0)               # momentum targets, no_grad
        t.add("itc", 2 * _gemm(B, e, columns), 2 * _gemm(B, columns, e))  # columns detached

    # Fused pairs: ITM fuses [positives ; neg images ; neg texts]; SCL alone fuses positives, detached.
    if "itm" in on:
        if o.itm.hard_negatives:
            t.add("itm", directions * _gemm(B, e, gathered), 0)            # detached ITC similarities
        t.add("itm", *_fusion(model_cfg, 3 * B, 1 + T * u, L, mode, "both"))
        t.train("itm", _gemm(3 * B, 2 * w, w) + _gemm(3 * B, w, 2))
    elif "scl" in on and o.scl.targets == "intact":  # "cross" takes its targets from the masked passes
        t.add("scl", _fusion(model_cfg, B, 1 + T * u, L, mode, "none")[0], 0)

    # Masked image: kept patches (the same K positions in every frame) + intact text; only its image
    # side feeds a loss. The decoder and the MIM heads run per frame, on B*T rows.
    if masked_image:
        _, masked_blocks = _vision_pass(model_cfg, B, T, k)
        t.add("masked_image", conv + masked_blocks, conv + 2 * masked_blocks)
        t.add("masked_image", *_fusion(model_cfg, B, 1 + T * k, L, mode, "image"))
        if on & {"mim_pixel", "mim_sem"}:
            t.train("decoder", _decoder(model_cfg, frame_rows, k, n))
        if "mim_pixel" in on:
            t.train("mim_pixel", _gemm(frame_rows * (n - k), model_cfg.decoder.width, 3 * v.patch_size ** 2))
        if "mim_sem" in on:
            t.train("mim_sem", _gemm(frame_rows * (n - k), model_cfg.decoder.width, w)
                    + _prototype_head(model_cfg, B) + _prototype_head(model_cfg, frame_rows * (n - k)))

    if scl_own_image:  # SCL's own random mask at its own ratio: one more masked-image pass
        ks = num_kept(n, o.scl.image_mask_ratio)
        _, scl_blocks = _vision_pass(model_cfg, B, T, ks)
        t.add("scl", conv + scl_blocks, conv + 2 * scl_blocks)
        t.add("scl", *_fusion(model_cfg, B, 1 + T * ks, L, mode, "image"))

    # Masked text: intact image + MLM text; only its text side feeds a loss.
    if "mlm" in on or ("scl" in on and not scl_own_text):
        t.train("masked_text", _text_tower(model_cfg, B, L))
        t.add("masked_text", *_fusion(model_cfg, B, 1 + T * u, L, mode, "text"))
        if "mlm" in on:
            t.train("mlm", _gemm(num_mlm_tokens, w, wt) + _gemm(num_mlm_tokens, wt, model_cfg.text.vocab_size))
    if scl_own_text:  # SCL's [MASK]-only text: one more text pass and text-side fusion
        t.train("scl", _text_tower(model_cfg, B, L))
        t.add("scl", *_fusion(model_cfg, B, 1 + T * u, L, mode, "text"))

    if "scl" in on:  # two InfoNCE terms against detached targets: grad w.r.t. the query side only
        t.add("scl", 2 * directions * _gemm(B, w, gathered), 2 * directions * _gemm(B, gathered, w))
    return t.result()
