"""Tokeniser loading and the MLM / SCL text masks, against a per-element reference."""
from __future__ import annotations

import os

import pytest
import torch

from megavl.data import build_tokenizer
from megavl.data.text import IGNORE_INDEX, default_tokenizer_dir, mlm_mask, scl_mask
from megavl.data.text import special_tokens_mask

MASK_ID, VOCAB = 103, 30522
SPECIAL = [0, 100, 101, 102, 103]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("")


def batch_ids(rows: int = 64, length: int = 30) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, VOCAB, (rows, length), generator=g)
    lengths = torch.randint(3, length + 1, (rows,), generator=g)
    for r, n in enumerate(lengths.tolist()):
        ids[r, 0], ids[r, n - 1], ids[r, n:] = 101, 102, 0
    return ids


def reference_mlm(ids: torch.Tensor, prob: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking written per element from the definition, drawing the same random numbers."""
    g = torch.Generator().manual_seed(seed)
    choose, action = torch.rand(ids.shape, generator=g), torch.rand(ids.shape, generator=g)
    random_ids = torch.randint(VOCAB, ids.shape, generator=g)
    out, labels = ids.clone(), torch.full_like(ids, IGNORE_INDEX)
    for r in range(ids.shape[0]):
        for c in range(ids.shape[1]):
            token = int(ids[r, c])
            if token in SPECIAL or choose[r, c] >= prob:
                continue
            labels[r, c] = token
            if action[r, c] < 0.8:
                out[r, c] = MASK_ID
            elif action[r, c] < 0.9:
                out[r, c] = random_ids[r, c]
    return out, labels


def test_default_tokenizer_is_bert_uncased_offline(tokenizer):
    assert os.path.isfile(os.path.join(default_tokenizer_dir(), "vocab.txt"))
    assert (tokenizer.mask_token_id, tokenizer.pad_token_id, len(tokenizer)) == (MASK_ID, 0, VOCAB)
    assert tokenizer("A Red Circle")["input_ids"] == [101, 1037, 2417, 4418, 102]


def test_tokenizer_from_vocab_file_and_missing_path(tokenizer):
    from_vocab = build_tokenizer(os.path.join(default_tokenizer_dir(), "vocab.txt"))
    assert from_vocab("a small blue square")["input_ids"] == tokenizer("a small blue square")["input_ids"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_tokenizer("/nonexistent/tokenizer")


def test_mlm_matches_reference_and_statistics():
    ids = batch_ids(rows=400)
    special = special_tokens_mask(ids, SPECIAL)
    got_ids, got_labels = mlm_mask(ids, special, 0.15, MASK_ID, VOCAB, torch.Generator().manual_seed(7))
    want_ids, want_labels = reference_mlm(ids, 0.15, 7)
    assert torch.equal(got_ids, want_ids) and torch.equal(got_labels, want_labels)
    chosen = got_labels != IGNORE_INDEX
    assert not chosen[special].any(), "special tokens or padding were masked"
    rate = chosen.sum() / (~special).sum()
    assert 0.13 < rate < 0.17
    to_mask = (got_ids[chosen] == MASK_ID).float().mean()
    kept = (got_ids[chosen] == ids[chosen]).float().mean()
    assert 0.76 < to_mask < 0.84 and 0.07 < kept < 0.13


def test_masks_are_reproducible_from_seed():
    ids = batch_ids()
    special = special_tokens_mask(ids, SPECIAL)
    a = mlm_mask(ids, special, 0.15, MASK_ID, VOCAB, torch.Generator().manual_seed(1))
    b = mlm_mask(ids, special, 0.15, MASK_ID, VOCAB, torch.Generator().manual_seed(1))
    c = mlm_mask(ids, special, 0.15, MASK_ID, VOCAB, torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


def test_scl_masks_only_with_mask_token_at_rate():
    ids = batch_ids(rows=400)
    special = special_tokens_mask(ids, SPECIAL)
    out = scl_mask(ids, special, 0.4, MASK_ID, torch.Generator().manual_seed(3))
    changed = out != ids
    assert (out[changed] == MASK_ID).all() and not changed[special].any()
    assert 0.37 < changed.sum() / (~special).sum() < 0.43
