"""SemVLP fusion against hand-written float64 references built from the same weights.

Legend: B batch, I image tokens, T text tokens, N = I + T, W fusion width, H heads.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megavl.models.fusion import FusionOutput, SemVLPFusion

B, I, T, W, HEADS, VW, TW = 3, 5, 7, 32, 4, 24, 40


def make_model(seed: int = 0, **overrides) -> SemVLPFusion:
    torch.manual_seed(seed)
    kwargs = dict(width=W, depth=2, heads=HEADS, mlp_ratio=2.0, vision_width=VW, text_width=TW)
    kwargs.update(overrides)
    model = SemVLPFusion(**kwargs)
    # Non-trivial norms and modality rows, so the reference checks they are applied where they should be.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "modality" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def make_inputs(seed: int = 1, vw: int = VW, tw: int = TW):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(B, I, vw, generator=gen)
    text = torch.randn(B, T, tw, generator=gen)
    lengths = torch.tensor([T, 4, 1])  # full, padded, only [CLS]
    text_mask = torch.arange(T)[None, :] < lengths[:, None]
    return image, text, text_mask


# ----------------------------------------------------------------------------- the reference
def lin(x, layer):
    return x @ layer.weight.double().T + layer.bias.double()


def ln(x, norm):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()


def ref_mha(mha, x, context, key_mask=None):
    """Plain masked softmax attention in float64 -> (out (B, L, W), probs (B, H, L, S))."""
    def heads(t):
        return t.view(t.shape[0], t.shape[1], mha.heads, mha.head_dim).transpose(1, 2)
    q, k, v = heads(lin(x, mha.q)), heads(lin(context, mha.k)), heads(lin(context, mha.v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(mha.head_dim)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1)
    return lin((probs @ v).transpose(1, 2).flatten(2), mha.out), probs


def ref_ffn(mlp, x):
    return lin(F.gelu(lin(x, mlp.fc1)), mlp.fc2)


def ref_inputs(model, image, text):
    proj = lambda p, x: x.double() if isinstance(p, torch.nn.Identity) else lin(x.double(), p)
    emb = model.modality_embed.double()
    return proj(model.image_proj, image) + emb[0], proj(model.text_proj, text) + emb[1]


def ref_single(model, image, text, text_mask):
    img, txt = ref_inputs(model, image, text)
    x = torch.cat([img, txt], 1)
    mask = torch.cat([torch.ones(B, I, dtype=torch.bool), text_mask], 1)
    for layer in model.layers:
        attn_out, probs = ref_mha(layer.self_attn, ln(x, layer.norm1), ln(x, layer.norm1), mask)
        x = x + attn_out
        x = x + ref_ffn(layer.mlp, ln(x, layer.norm2))
    x = ln(x, model.norm)
    relevance = torch.zeros(B, I, dtype=torch.float64)
    for b in range(B):  # text query rows, image columns, renormalised; mean over heads, valid text
        rows = [probs[b, h, I + t, :I] / probs[b, h, I + t, :I].sum()
                for t in range(T) if text_mask[b, t] for h in range(HEADS)]
        relevance[b] = torch.stack(rows).mean(0)
    return x[:, :I], x[:, I:], relevance


def ref_two(model, image, text, text_mask):
    img, txt = ref_inputs(model, image, text)
    for layer in model.layers:
        img = img + ref_mha(layer.self_attn, ln(img, layer.norm1), ln(img, layer.norm1))[0]
        txt = txt + ref_mha(layer.self_attn, ln(txt, layer.norm1), ln(txt, layer.norm1), text_mask)[0]
        c = layer.cross
        img_c = img + ref_mha(c.attn, ln(img, c.norm_q), ln(txt, c.norm_kv), text_mask)[0]
        txt_c_out, probs = ref_mha(c.attn, ln(txt, c.norm_q), ln(img, c.norm_kv))
        txt_c = txt + txt_c_out
        img = img_c + ref_ffn(layer.mlp, ln(img_c, layer.norm2))
        txt = txt_c + ref_ffn(layer.mlp, ln(txt_c, layer.norm2))
    relevance = torch.stack([probs[b, :, text_mask[b]].mean((0, 1)) for b in range(B)])
    return ln(img, model.norm), ln(txt, model.norm), relevance


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("mode", ["single", "two"])
def test_shapes_and_globals(mode):
    model = make_model()
    out = model(*make_inputs(), mode=mode)
    assert isinstance(out, FusionOutput)
    assert out.image_states.shape == (B, I, W) and out.text_states.shape == (B, T, W)
    assert out.image_global.shape == (B, W) and out.text_global.shape == (B, W)
    assert torch.equal(out.image_global, out.image_states[:, 0])
    assert torch.equal(out.text_global, out.text_states[:, 0])
    assert out.text_to_image_attn is None


@pytest.mark.parametrize("backend", ["auto", "math"])
@pytest.mark.parametrize("mode, reference", [("single", ref_single), ("two", ref_two)])
def test_matches_hand_written_reference(mode, reference, backend):
    model = make_model(attn_backend=backend)
    image, text, text_mask = make_inputs()
    out = model(image, text, text_mask, mode=mode, return_text_to_image_attn=True)
    with torch.no_grad():
        ref_image, ref_text, ref_relevance = reference(model, image, text, text_mask)
    torch.testing.assert_close(out.image_states.double(), ref_image, atol=1e-5, rtol=1e-4)
    valid = text_mask  # padded text positions carry no meaning
    torch.testing.assert_close(out.text_states[valid].double(), ref_text[valid], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.text_to_image_attn.double(), ref_relevance, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["single", "two"])
def test_relevance_is_a_distribution_over_image_tokens(mode):
    model = make_model()
    image, text, text_mask = make_inputs()
    text_mask[2] = False  # a sample with no valid text at all
    out = model(image, text, text_mask, mode=mode, return_text_to_image_attn=True)
    rel = out.text_to_image_attn
    assert rel.shape == (B, I) and (rel >= 0).all()
    torch.testing.assert_close(rel[:2].sum(-1), torch.ones(2))
    assert torch.equal(rel[2], torch.zeros(I))
    assert torch.isfinite(out.image_states).all() and torch.isfinite(out.text_states).all()


@pytest.mark.parametrize("mode", ["single", "two"])
def test_padded_text_values_do_not_change_valid_outputs(mode):
    model = make_model()
    image, text, text_mask = make_inputs()
    other_text = torch.where(text_mask[:, :, None], text, 100.0 * torch.randn_like(text))
    a = model(image, text, text_mask, mode=mode, return_text_to_image_attn=True)
    b = model(image, other_text, text_mask, mode=mode, return_text_to_image_attn=True)
    torch.testing.assert_close(a.image_states, b.image_states, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.text_states[text_mask], b.text_states[text_mask], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.text_to_image_attn, b.text_to_image_attn, atol=1e-7, rtol=1e-6)


def grads_after_backward(model, mode):
    model.zero_grad(set_to_none=True)
    out = model(*make_inputs(), mode=mode, return_text_to_image_attn=True)
    (out.image_states.sum() + out.text_states.pow(2).sum() + out.text_to_image_attn.pow(2).sum()).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def test_same_weights_serve_both_modes_and_cross_attention_is_unplugged_in_single():
    model = make_model()
    cross = {name for name, _ in model.named_parameters() if ".cross." in name}
    assert cross, "the cross-attention sublayer should own parameters"
    two = grads_after_backward(model, "two")
    assert all(g is not None and g.abs().sum() > 0 for g in two.values()), \
        [n for n, g in two.items() if g is None or g.abs().sum() == 0]
    single = grads_after_backward(model, "single")
    assert set(single) == set(two)  # one parameter set for both modes
    for name, grad in single.items():
        if name in cross:
            assert grad is None, name
        else:
            assert grad is not None and grad.abs().sum() > 0, name


def test_identity_projections_when_widths_match_and_cross_can_be_left_out():
    model = make_model(vision_width=W, text_width=W, cross_attention=False)
    assert isinstance(model.image_proj, torch.nn.Identity) and isinstance(model.text_proj, torch.nn.Identity)
    assert not any(".cross." in name for name, _ in model.named_parameters())
    image, text, text_mask = make_inputs(vw=W, tw=W)
    out = model(image, text, text_mask, mode="single", return_text_to_image_attn=True)
    with torch.no_grad():
        ref_image, ref_text, _ = ref_single(model, image, text, text_mask)
    torch.testing.assert_close(out.image_states.double(), ref_image, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="cross_attention=False"):
        model(image, text, text_mask, mode="two")


@pytest.mark.parametrize("mode", ["single", "two"])
def test_deterministic_under_a_seed(mode):
    a, b = make_model(seed=5), make_model(seed=5)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na
    assert not torch.equal(make_model(seed=6).modality_embed, a.modality_embed)
    inputs = make_inputs()
    out_a, out_b = a(*inputs, mode=mode), b(*inputs, mode=mode)
    assert torch.equal(out_a.image_states, out_b.image_states)
    assert torch.equal(out_a.text_states, out_b.text_states)


@pytest.mark.parametrize("mode", ["single", "two"])
def test_grad_checkpointing_changes_nothing_numerically(mode):
    model = make_model()
    plain = grads_after_backward(model, mode)
    model.set_grad_checkpointing()
    assert model.grad_checkpointing
    ckpt = grads_after_backward(model, mode)
    for name in plain:
        if plain[name] is None:
            assert ckpt[name] is None, name
        else:
            torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5)


def test_integer_mask_is_read_as_hugging_face_attention_mask():
    model = make_model()
    image, text, text_mask = make_inputs()
    a = model(image, text, text_mask, mode="two")
    b = model(image, text, text_mask.long(), mode="two")
    assert torch.equal(a.image_states, b.image_states)


def test_no_weight_decay_names_embeddings_biases_and_norms_only():
    model = make_model()
    names = model.no_weight_decay()
    assert "modality_embed" in names
    assert "layers.0.norm1.weight" in names and "layers.0.self_attn.q.bias" in names
    assert "layers.0.self_attn.q.weight" not in names and "image_proj.weight" not in names
    assert names <= {name for name, _ in model.named_parameters()}


@pytest.mark.parametrize("change, match", [
    (dict(mode="three"), "unknown fusion mode"),
    (dict(image=torch.randn(B + 1, I, VW)), "batch mismatch"),
    (dict(image=torch.randn(B, I, VW + 1)), r"image must be \(B, I>=1, 24\)"),
    (dict(text=torch.randn(B, T, W)), r"text must be \(B, T>=1, 40\)"),
    (dict(image=torch.randn(B, VW)), "image must be"),
    (dict(text_mask=torch.ones(B, T + 1, dtype=torch.bool)), r"text_mask must be \(B, T\)"),
    (dict(text_mask=torch.ones(B, T)), "bool or 0/1 integers"),
])
def test_bad_inputs_are_clear_errors(change, match):
    model = make_model()
    image, text, text_mask = make_inputs()
    args = dict(image=image, text=text, text_mask=text_mask, mode="two")
    args.update(change)
    with pytest.raises(ValueError, match=match):
        model(args["image"], args["text"], args["text_mask"], mode=args["mode"])
