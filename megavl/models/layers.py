"""Small building blocks shared by the towers: head merge, MLP, stochastic depth, activations.

Legend: B batch, L sequence length, H heads, D head dim, E width (= H * D).
Attention itself lives in attention.py; this file holds only what surrounds it.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP towers were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


# One explicit table for activation names (the Hugging Face `hidden_act` spellings we support).
# "gelu" is the exact erf GELU (BERT, ViT); the tanh approximation goes by several HF names.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "quick_gelu": QuickGELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
}


def make_activation(name: str) -> nn.Module:
    """Activation module for a name in ACTIVATIONS; unknown names are an error, not a fallback."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def merge_heads(x_BHLD: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) -> (B, L, H*D)."""
    B, H, L, D = x_BHLD.shape
    return x_BHLD.transpose(1, 2).reshape(B, L, H * D)


class Mlp(nn.Module):
    """fc1 -> activation -> fc2 -> dropout; (B, L, E) -> (B, L, E). Names follow timm.

    Dropout only on the output, as BERT's feed-forward (timm's ViT runs with no dropout at all).
    """

    def __init__(self, width: int, hidden: int, act: str = "gelu", dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = make_activation(act)
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x_BLE: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x_BLE))))


class DropPath(nn.Module):
    """Stochastic depth: zero a whole residual branch per sample with probability p while training.

    Kept samples are scaled by 1 / (1 - p) so the expectation is unchanged (Huang et al. 2016).
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def no_decay_names(module: nn.Module, extra: set[str]) -> set[str]:
    """Names of parameters exempt from weight decay: every 1-D one (biases, norm scales) plus `extra`.

    Returning the 1-D names explicitly lets an optimizer builder use this set alone.
    """
    names = {name for name, p in module.named_parameters() if p.ndim <= 1}
    present = {name for name, _ in module.named_parameters()}
    return names | (extra & present)
