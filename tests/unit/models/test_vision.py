"""VisionTransformer: equivalence with timm, kept-patch encoding, pos-embed resampling, frames, errors."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

from megavl.models.vision import VisionTransformer, resample_pos_embed, resample_temporal_embed

TOL = 1e-5  # fp32 CPU, max abs


def tiny_vit(**overrides) -> VisionTransformer:
    """A from-scratch ViT small enough for per-test construction."""
    kwargs = dict(img_size=32, patch_size=8, width=32, depth=2, heads=4)
    kwargs.update(overrides)
    return VisionTransformer(**kwargs)


def timm_tiny(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()


def reference_forward(model: VisionTransformer, frames_BTCHW: torch.Tensor, keep_ids: torch.Tensor) -> torch.Tensor:
    """Spelled out, frame by frame: per frame t [cls + pos_0 + temp_t] + (patch + pos + temp_t)[keep];
    each block's attention over the whole clip under an explicit mask (a frame's [CLS] row sees every
    token, a patch row only its own frame's tokens), softmax in float64; then norm; the clip [CLS] is
    the mean of the frame [CLS] tokens. temp_t = the temporal table resampled to T by hand (linear,
    segment centres); none for one frame."""
    B, T = frames_BTCHW.shape[:2]
    pos_cls, pos_patches = model.pos_embed[0, :1], model.pos_embed[0, 1:]
    table = model.temporal_embed
    temporal = []
    for t in range(T):
        if table is None or T == 1:
            temporal.append(0.0)
            continue
        x = min(max((t + 0.5) * table.shape[0] / T - 0.5, 0.0), table.shape[0] - 1)
        lo = int(x)
        hi = min(lo + 1, table.shape[0] - 1)
        temporal.append(table[lo] * (1 - (x - lo)) + table[hi] * (x - lo))
    rows = []
    for b in range(B):
        tokens = []
        for t in range(T):
            patches = model.patch_embed.proj(frames_BTCHW[b, t:t + 1]).flatten(2)[0].T  # (N, E)
            frame = torch.cat([model.cls_token[0] + pos_cls, (patches + pos_patches)[keep_ids[b]]])
            tokens.append(frame + temporal[t])
        rows.append(torch.cat(tokens))
    x = torch.stack(rows)
    S = x.shape[1] // T
    frame_of = torch.arange(T * S) // S
    is_cls = torch.arange(T * S) % S == 0
    allowed = is_cls[:, None] | (frame_of[:, None] == frame_of[None, :])  # (query, key)
    for block in model.blocks:
        h = block.norm1(x)
        Hd, E = block.attn.heads, x.shape[-1]
        q, k, v = block.attn.qkv(h).view(B, T * S, 3, Hd, E // Hd).permute(2, 0, 3, 1, 4).double()
        scores = (q @ k.transpose(-1, -2)) / (E // Hd) ** 0.5
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        attn = (probs @ v).float().transpose(1, 2).reshape(B, T * S, E)
        x = x + block.attn.proj(attn)
        x = x + block.mlp(block.norm2(x))
    x = model.norm(x).view(B, T, S, -1)
    return torch.cat([x[:, :, 0].mean(1, keepdim=True), x[:, :, 1:].flatten(1, 2)], dim=1)


@pytest.mark.parametrize("backend, timm_fused, depth", [
    ("auto", True, 12), ("auto", False, 2), ("math", True, 2), ("math", False, 2)])
def test_matches_timm_vit_tiny(backend, timm_fused, depth):
    timm_model = timm_tiny(depth=depth)
    for block in timm_model.blocks:
        block.attn.fused_attn = timm_fused  # timm's explicit softmax path is an independent reference
    model = VisionTransformer.from_timm(timm_model, attn_backend=backend).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours, theirs = model(images), timm_model.forward_features(images)
    assert (len(model.blocks), model.num_patches, model.width) == (depth, 196, 192)
    assert ours.shape == (2, 1 + 196, 192)
    assert (ours - theirs).abs().max().item() <= TOL


@pytest.mark.slow
def test_matches_timm_vit_base():
    torch.manual_seed(0)
    timm_model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    model = VisionTransformer.from_timm(timm_model).eval()
    assert (model.width, len(model.blocks), model.num_patches) == (768, 12, 196)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (model(images) - timm_model.forward_features(images)).abs().max().item() <= TOL


def test_matches_timm_rectangular_small():
    torch.manual_seed(0)
    timm_model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=(64, 96), depth=2).eval()
    model = VisionTransformer.from_timm(timm_model).eval()
    assert model.img_size == (64, 96) and model.num_patches == 4 * 6
    images = torch.randn(3, 3, 64, 96)
    with torch.no_grad():
        assert (model(images) - timm_model.forward_features(images)).abs().max().item() <= TOL


def test_keep_ids_equals_reference_gather():
    torch.manual_seed(0)
    model = tiny_vit().eval()
    images = torch.randn(3, 3, 32, 32)
    keep_ids = torch.stack([torch.randperm(model.num_patches)[:5] for _ in range(3)])
    with torch.no_grad():
        ours = model(images, keep_ids)
        expected = reference_forward(model, images[:, None], keep_ids)
    assert ours.shape == (3, 1 + 5, 32)
    assert (ours - expected).abs().max().item() <= TOL


def test_keep_all_in_order_equals_full_sequence():
    torch.manual_seed(0)
    model = tiny_vit().eval()
    images = torch.randn(2, 3, 32, 32)
    keep_all = torch.arange(model.num_patches).expand(2, -1)
    with torch.no_grad():
        assert (model(images, keep_all) - model(images)).abs().max().item() <= TOL


def test_keep_ids_accepts_int32():
    torch.manual_seed(0)
    model = tiny_vit().eval()
    images = torch.randn(2, 3, 32, 32)
    keep_ids = torch.tensor([[0, 3, 7], [15, 1, 2]])
    with torch.no_grad():
        assert torch.equal(model(images, keep_ids), model(images, keep_ids.int()))


@pytest.mark.parametrize("new_size", [160, 288, (160, 224)])
def test_resample_pos_embed_matches_timm(new_size):
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 14 * 14, 16)
    new_hw = (new_size, new_size) if isinstance(new_size, int) else new_size
    new_grid = (new_hw[0] // 16, new_hw[1] // 16)
    ours = resample_pos_embed(pos, new_grid, (14, 14))
    theirs = resample_abs_pos_embed(pos, new_size=list(new_grid), old_size=[14, 14], num_prefix_tokens=1)
    assert ours.shape == (1, 1 + new_grid[0] * new_grid[1], 16)
    assert (ours - theirs).abs().max().item() <= TOL
    assert torch.equal(ours[:, 0], pos[:, 0])  # [CLS] entry is never interpolated


def test_resize_pos_embed_same_resolution_is_identity():
    model = timm_tiny(depth=1)
    ours = VisionTransformer.from_timm(model)
    before = ours.pos_embed.detach().clone()
    ours.resize_pos_embed(224)
    assert torch.equal(ours.pos_embed, before)


@pytest.mark.parametrize("new_size", [160, 288])
def test_from_timm_other_resolution_matches_timm_dynamic(new_size):
    """timm with dynamic_img_size resamples on the fly with the same bicubic rule we apply once."""
    timm_model = timm_tiny(dynamic_img_size=True, depth=2)
    loaded = VisionTransformer.from_timm(timm_model, img_size=new_size).eval()
    resized = VisionTransformer.from_timm(timm_model).eval()
    resized.resize_pos_embed(new_size)
    images = torch.randn(2, 3, new_size, new_size)
    with torch.no_grad():
        theirs = timm_model.forward_features(images)
        for model in (loaded, resized):
            assert model.num_patches == (new_size // 16) ** 2
            assert (model(images) - theirs).abs().max().item() <= TOL
    with pytest.raises(ValueError, match="resize_pos_embed"):
        resized(torch.randn(1, 3, 224, 224))


def test_one_frame_video_equals_image_and_timm():
    """A 1-frame clip reads no temporal entry: a trained table leaves images as timm encodes them."""
    timm_model = timm_tiny(depth=2)
    model = VisionTransformer.from_timm(timm_model, num_frames=2).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        model.temporal_embed.normal_()
        as_image, as_video = model(images), model(images[:, None])
        assert torch.equal(as_image, as_video)
        assert (as_image - timm_model.forward_features(images)).abs().max().item() <= TOL


@pytest.mark.parametrize("frames", [1, 2, 3, 5])  # one, fewer than, as many as, more than the table's 3
def test_frames_match_the_masked_attention_reference_and_temporal_embedding_used(frames):
    torch.manual_seed(0)
    model = tiny_vit(num_frames=3).eval()
    with torch.no_grad():
        model.temporal_embed.normal_()
    video = torch.randn(2, frames, 3, 32, 32)
    keep_ids = torch.stack([torch.randperm(model.num_patches)[:6] for _ in range(2)])
    with torch.no_grad():
        ours = model(video, keep_ids)
        expected = reference_forward(model, video, keep_ids)
        assert ours.shape == (2, 1 + frames * 6, 32)
        assert (ours - expected).abs().max().item() <= TOL
        full = model(video)
        assert (full - reference_forward(model, video, torch.arange(16).expand(2, 16))).abs().max() <= TOL
        model.temporal_embed.zero_()
        moved = (model(video, keep_ids) - ours).abs().max().item()
        assert moved > 1e-3 if frames > 1 else moved == 0  # one frame reads no table


def test_patches_see_only_their_frame_and_cls_sees_all():
    """One block: frame 0's patch outputs ignore frame 1; frame 0's [CLS] does not."""
    torch.manual_seed(0)
    model = tiny_vit(num_frames=2, depth=1).eval()
    video = torch.randn(1, 2, 3, 32, 32)
    changed = video.clone()
    changed[:, 1] = torch.randn(3, 32, 32)
    with torch.no_grad():
        a, b = model.forward_frames(video), model.forward_frames(changed)
    assert torch.allclose(a[:, 0, 1:], b[:, 0, 1:], atol=1e-6)
    assert not torch.allclose(a[:, 0, 0], b[:, 0, 0], atol=1e-3)


def test_clip_embedding_is_mean_of_frame_cls_and_identical_frames_give_the_image():
    """With a zero temporal embedding a clip of T copies of an image encodes as that image (an
    image is a 1-frame clip through the same weights)."""
    torch.manual_seed(0)
    model = tiny_vit(num_frames=4).eval()
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        frames = model.forward_frames(image[:, None].expand(-1, 4, -1, -1, -1))
        assert (model(image[:, None].expand(-1, 4, -1, -1, -1))[:, 0] - frames[:, :, 0].mean(1)).abs().max() <= TOL
        single = model(image)
        assert (frames[:, :, 0] - single[:, None, 0]).abs().max() <= TOL
        assert (frames[:, 2, 1:] - single[:, 1:]).abs().max() <= TOL


def test_temporal_embedding_resampled_linearly():
    model = tiny_vit(num_frames=4)
    with torch.no_grad():
        model.temporal_embed.copy_(torch.arange(4.0)[:, None].expand(4, 32))
    assert torch.equal(model.temporal_embedding(4), model.temporal_embed)
    assert torch.allclose(model.temporal_embedding(2)[:, 0], torch.tensor([0.5, 2.5]))
    assert torch.allclose(resample_temporal_embed(model.temporal_embed, 1)[:, 0], torch.tensor([1.5]))
    assert model.temporal_embedding(1) is None  # one frame has no order to tell
    assert torch.allclose(model.temporal_embedding(8)[:, 0],
                          torch.tensor([0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0]))


def test_temporal_embedding_zero_init_and_absent_for_one_frame():
    assert tiny_vit().temporal_embed is None
    assert "temporal_embed" not in dict(tiny_vit().named_parameters())
    assert torch.equal(tiny_vit(num_frames=4).temporal_embed, torch.zeros(4, 32))


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = tiny_vit(num_frames=2, drop_path=0.1).train()
    video = torch.randn(2, 2, 3, 32, 32)
    keep_ids = torch.stack([torch.randperm(model.num_patches)[:4] for _ in range(2)])
    model(video, keep_ids).square().sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_grad_checkpointing_same_values_and_gradients():
    torch.manual_seed(0)
    model = tiny_vit().train()
    images = torch.randn(2, 3, 32, 32)
    model(images).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(images).sum().backward()
    for name, param in model.named_parameters():
        assert (param.grad - plain[name]).abs().max().item() <= TOL, name


def test_deterministic_under_seed():
    images = torch.randn(2, 3, 32, 32)
    outputs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = tiny_vit(drop_path=0.5).train()  # drop path draws from the same seeded stream
        outputs.append(model(images))
    assert torch.equal(outputs[0], outputs[1])


def test_drop_path_only_in_training():
    torch.manual_seed(0)
    model = tiny_vit(drop_path=0.9)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        eval_a, eval_b = model.eval()(images), model(images)
        train = model.train()(images)
    assert torch.equal(eval_a, eval_b)
    assert not torch.allclose(train, eval_a)


def test_no_weight_decay_names():
    names = tiny_vit(num_frames=2).no_weight_decay()
    assert {"cls_token", "pos_embed", "temporal_embed", "blocks.0.attn.qkv.bias", "norm.weight"} <= names
    assert "blocks.0.attn.qkv.weight" not in names and "patch_embed.proj.weight" not in names
    assert "temporal_embed" not in tiny_vit().no_weight_decay()


@pytest.mark.parametrize("images, match", [
    (torch.randn(2, 3, 40, 32), "32x32"),
    (torch.randn(2, 1, 32, 32), "channels"),
    (torch.randn(3, 32, 32), r"\(B, C, H, W\)"),
])
def test_bad_images_raise(images, match):
    with pytest.raises(ValueError, match=match):
        tiny_vit(num_frames=2)(images)


def test_clip_into_a_model_without_temporal_embedding_raises():
    with pytest.raises(ValueError, match="temporal embedding"):
        tiny_vit()(torch.randn(2, 3, 3, 32, 32))


@pytest.mark.parametrize("keep_ids, error, match", [
    (torch.tensor([[0, 16], [1, 2]]), RuntimeError, "out of range"),
    (torch.tensor([[0, -1], [1, 2]]), RuntimeError, "out of range"),
    (torch.tensor([0, 1]), ValueError, r"\(B=2, K\)"),
    (torch.tensor([[0, 1]]), ValueError, r"\(B=2, K\)"),
    (torch.zeros(2, 2), ValueError, "integer"),
    (torch.zeros(2, 17, dtype=torch.long), ValueError, "only 16"),
])
def test_bad_keep_ids_raise(keep_ids, error, match):
    with pytest.raises(error, match=match):
        tiny_vit()(torch.randn(2, 3, 32, 32), keep_ids)


def test_bad_construction_raises():
    with pytest.raises(ValueError, match="divisible"):
        tiny_vit(heads=5)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tiny_vit(img_size=36)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tiny_vit().resize_pos_embed(30)
    with pytest.raises(ValueError, match="attention backend"):
        tiny_vit(attn_backend="fast")


def test_from_timm_refuses_what_it_cannot_copy():
    with pytest.raises(ValueError, match="register tokens"):
        VisionTransformer.from_timm(timm_tiny(reg_tokens=4, depth=1))
    with pytest.raises(ValueError, match="layer scale"):
        VisionTransformer.from_timm(timm_tiny(init_values=1e-5, depth=1))
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        VisionTransformer.from_timm(torch.nn.Linear(2, 2))


def test_image_only_timm_weights_load_into_the_video_encoder():
    """timm (image-only) weights load with a zero temporal embedding: a clip of T copies of an image
    then gives timm's features for every frame and for the clip [CLS]."""
    timm_model = timm_tiny(depth=2)
    model = VisionTransformer.from_timm(timm_model, num_frames=8).eval()
    assert torch.equal(model.temporal_embed, torch.zeros(8, 192))
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        theirs = timm_model.forward_features(image)
        frames = model.forward_frames(image[:, None].expand(-1, 4, -1, -1, -1))
    for t in range(4):
        assert (frames[:, t] - theirs).abs().max().item() <= TOL
