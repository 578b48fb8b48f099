"""Text tower: a post-norm BERT encoder that loads Hugging Face BERT weights.

Legend: B batch, L tokens, E width, H heads, D head dim (E = H * D), F feed-forward width.

Separate query/key/value Linears (the BERT layout, via attention.MultiHeadAttention) so Hugging
Face checkpoints copy by a name table (`_HF_LAYER_NAMES`); `word_embeddings` is public so an MLM head can tie its decoder to it.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from megavl.models.attention import BACKENDS, MultiHeadAttention
from megavl.models.layers import Mlp, no_decay_names

# Hugging Face BertModel name -> ours, inside encoder.layer.{i}. / layers.{i}.
_HF_LAYER_NAMES = {
    "attention.self.query": "attn.q",
    "attention.self.key": "attn.k",
    "attention.self.value": "attn.v",
    "attention.output.dense": "attn.out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "output.LayerNorm": "mlp_norm",
}
_HF_EMBED_NAMES = {
    "embeddings.word_embeddings": "word_embeddings",
    "embeddings.position_embeddings": "position_embeddings",
    "embeddings.token_type_embeddings": "token_type_embeddings",
    "embeddings.LayerNorm": "embed_norm",
}
# BertForMaskedLM's prediction head (cls.predictions.*) -> MLMHead names (models/heads.py); its decoder
# weight is the word embeddings (tied) and its bias is cls.predictions.bias.
_HF_MLM_HEAD_NAMES = {
    "cls.predictions.transform.dense": "dense",
    "cls.predictions.transform.LayerNorm": "norm",
}
# Hugging Face state that forward never reads: buffers of default ids and the [CLS] pooler.
_HF_IGNORED_PREFIXES = ("embeddings.position_ids", "embeddings.token_type_ids", "pooler.")


class TextLayer(nn.Module):
    """Post-norm BERT layer: x = norm(x + attn(x)); x = norm(x + mlp(x)); (B, L, E) -> (B, L, E)."""

    def __init__(self, width: int, heads: int, intermediate: int, eps: float, hidden_act: str,
                 dropout: float, attn_dropout: float, backend: str) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(width, heads, backend=backend, attn_dropout=attn_dropout)
        self.attn_drop = nn.Dropout(dropout)
        self.attn_norm = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, intermediate, act=hidden_act, dropout=dropout)
        self.mlp_norm = nn.LayerNorm(width, eps=eps)

    def forward(self, x_BLE: torch.Tensor, key_mask_BL: torch.Tensor | None) -> torch.Tensor:
        """key_mask_BL: bool, True = a real token that may be attended to; None = all real.

        Padded positions still get outputs (they attend to the real tokens), as in BERT.
        """
        x_BLE = self.attn_norm(x_BLE + self.attn_drop(self.attn(x_BLE, key_mask_BS=key_mask_BL)))
        return self.mlp_norm(x_BLE + self.mlp(x_BLE))


class TextEncoder(nn.Module):
    """BERT encoder: token + position + segment embeddings, LayerNorm, then `depth` post-norm layers.

    Dropout defaults to 0 (plain construction); `from_hf_config`/`from_hf` take BERT's rates from
    the config. Outputs are the final hidden states, as `BertModel(...).last_hidden_state`.
    """

    def __init__(self, vocab_size: int = 30522, width: int = 768, depth: int = 12, heads: int = 12,
                 intermediate: int = 3072, max_position: int = 512, type_vocab_size: int = 2,
                 layer_norm_eps: float = 1e-12, pad_token_id: int = 0, hidden_act: str = "gelu",
                 attn_backend: str = "auto", dropout: float = 0.0, attn_dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        if attn_backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {attn_backend!r}; choose one of {BACKENDS}")
        self.max_position = max_position
        self.type_vocab_size = type_vocab_size
        self.grad_checkpointing = False
        self.word_embeddings = nn.Embedding(vocab_size, width, padding_idx=pad_token_id)
        self.position_embeddings = nn.Embedding(max_position, width)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, width)
        self.embed_norm = nn.LayerNorm(width, eps=layer_norm_eps)
        self.embed_drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            TextLayer(width, heads, intermediate, layer_norm_eps, hidden_act, dropout, attn_dropout, attn_backend)
            for _ in range(depth))
        self._init_weights()

    def _init_weights(self) -> None:
        """BERT's init: N(0, 0.02) weights, zero biases, zero padding embedding."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.word_embeddings.weight[self.word_embeddings.padding_idx].zero_()

    @property
    def width(self) -> int:
        return self.word_embeddings.embedding_dim

    def no_weight_decay(self) -> set[str]:
        """Every 1-D parameter (biases, LayerNorm scales), as the BERT recipe exempts them."""
        return no_decay_names(self, set())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer in backward instead of storing its activations."""
        self.grad_checkpointing = enable

    def _check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      token_type_ids: torch.Tensor | None) -> None:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.shape[1] > self.max_position:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position {self.max_position}")
        for name, extra in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if extra is not None and extra.shape != input_ids.shape:
                raise ValueError(f"{name} shape {tuple(extra.shape)} != input_ids shape {tuple(input_ids.shape)}")

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids -> (B, L, E): LayerNorm(word + segment + position), then dropout."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions_L = torch.arange(input_ids.shape[1], device=input_ids.device)
        x_BLE = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x_BLE = x_BLE + self.position_embeddings(positions_L)
        return self.embed_drop(self.embed_norm(x_BLE))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, L) int; attention_mask (B, L) 0/1 or bool, 1 = real token (None = all real);
        token_type_ids (B, L) segment ids (None = all 0). Returns (B, L, E) final hidden states.

        A fully padded row gets zero attention output (no NaN), unlike BERT's uniform attention.
        """
        self._check_inputs(input_ids, attention_mask, token_type_ids)
        key_mask_BL = None if attention_mask is None else attention_mask.bool()
        x_BLE = self.embed(input_ids, token_type_ids)
        for layer in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x_BLE = checkpoint(layer, x_BLE, key_mask_BL, use_reentrant=False)
            else:
                x_BLE = layer(x_BLE, key_mask_BL)
        return x_BLE

    @classmethod
    def from_hf_config(cls, config: Any, attn_backend: str = "auto") -> "TextEncoder":
        """A randomly initialised encoder shaped like a Hugging Face `BertConfig` (dropout rates included)."""
        if getattr(config, "model_type", "bert") != "bert":
            raise ValueError(f"expected a BERT config, got model_type={config.model_type!r}")
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"only absolute position embeddings are supported, got {config.position_embedding_type!r}")
        if config.is_decoder or config.add_cross_attention:
            raise ValueError("decoder / cross-attention BERT configs are not an encoder; not supported")
        return cls(vocab_size=config.vocab_size, width=config.hidden_size, depth=config.num_hidden_layers,
                   heads=config.num_attention_heads, intermediate=config.intermediate_size,
                   max_position=config.max_position_embeddings, type_vocab_size=config.type_vocab_size,
                   layer_norm_eps=config.layer_norm_eps, pad_token_id=config.pad_token_id,
                   hidden_act=config.hidden_act, attn_backend=attn_backend,
                   dropout=config.hidden_dropout_prob, attn_dropout=config.attention_probs_dropout_prob)

    @classmethod
    def from_hf(cls, model_or_path: nn.Module | str | os.PathLike, attn_backend: str = "auto") -> "TextEncoder":
        """An encoder with the weights of a Hugging Face BERT.

        model_or_path: a transformers BertModel, a model holding one as `.bert` (BertForMaskedLM,
        BertForPreTraining, ...), or a local checkpoint directory (never the hub).
        """
        bert = _hf_bert(model_or_path)
        model = cls.from_hf_config(bert.config, attn_backend)
        model.load_state_dict(convert_hf_state_dict(bert.state_dict()), strict=True)
        return model


def convert_hf_state_dict(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face BertModel state dict to TextEncoder names; unknown keys are an error."""
    ours: dict[str, torch.Tensor] = {}
    unknown = []
    for name, tensor in hf_state.items():
        if name.startswith(_HF_IGNORED_PREFIXES):
            continue
        module, _, leaf = name.rpartition(".")
        if module in _HF_EMBED_NAMES:
            ours[f"{_HF_EMBED_NAMES[module]}.{leaf}"] = tensor
            continue
        parts = module.split(".", 3)  # encoder, layer, i, rest
        if len(parts) == 4 and parts[:2] == ["encoder", "layer"] and parts[3] in _HF_LAYER_NAMES:
            ours[f"layers.{parts[2]}.{_HF_LAYER_NAMES[parts[3]]}.{leaf}"] = tensor
            continue
        unknown.append(name)
    if unknown:
        raise ValueError(f"Hugging Face BERT weights with no place in TextEncoder: {unknown}")
    return ours


def _hf_bert(model_or_path: nn.Module | str | os.PathLike) -> nn.Module:
    """The transformers BertModel inside `model_or_path`, loading a local directory offline."""
    from transformers import BertModel

    if isinstance(model_or_path, (str, os.PathLike)):
        if not os.path.isdir(model_or_path):
            raise FileNotFoundError(f"{model_or_path} is not a local checkpoint directory")
        return BertModel.from_pretrained(model_or_path, local_files_only=True, add_pooling_layer=False)
    if isinstance(model_or_path, BertModel):
        return model_or_path
    inner = getattr(model_or_path, "bert", None)
    if isinstance(inner, BertModel):
        return inner
    raise TypeError(f"expected a transformers BertModel, a model with a .bert BertModel, or a directory; "
                    f"got {type(model_or_path).__name__}")


def read_hf_masked_lm(path: str | os.PathLike) -> tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(BertConfig, BertModel state dict, MLM head state in MLMHead names) of a local Hugging Face
    BERT checkpoint that holds a masked-LM head (BertForMaskedLM, BertForPreTraining: bert-base-uncased
    does). A checkpoint without `cls.predictions` is a ValueError naming the directory."""
    from transformers import BertForMaskedLM

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a local checkpoint directory")
    model, info = BertForMaskedLM.from_pretrained(path, local_files_only=True, output_loading_info=True)
    absent = [k for k in info["missing_keys"]
              if k.startswith("cls.predictions.transform.") or k == "cls.predictions.bias"]
    if absent:
        raise ValueError(f"{path} holds no masked-LM head ({', '.join(sorted(absent)[:3])} missing): save "
                         f"a BertForMaskedLM or BertForPreTraining checkpoint (bert-base-uncased has one)")
    state = model.state_dict()
    bert = {k[len("bert."):]: v for k, v in state.items() if k.startswith("bert.")}
    head = {"decoder.bias": state["cls.predictions.bias"]}
    for name, tensor in state.items():
        module, _, leaf = name.rpartition(".")
        if module in _HF_MLM_HEAD_NAMES:
            head[f"{_HF_MLM_HEAD_NAMES[module]}.{leaf}"] = tensor
    return model.config, bert, head


def split_layers(state: dict[str, torch.Tensor], first: int
                 ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A TextEncoder state dict split at layer `first`: (embeddings + layers 0..first-1, one state per
    layer from `first` on, in TextLayer names, bottom first)."""
    lower: dict[str, torch.Tensor] = {}
    upper: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        if name.startswith("layers."):
            _, index, rest = name.split(".", 2)
            if int(index) >= first:
                upper.setdefault(int(index) - first, {})[rest] = tensor
                continue
        lower[name] = tensor
    return lower, [upper[i] for i in sorted(upper)]
