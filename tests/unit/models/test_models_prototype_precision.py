"""SemMIM's prototype logits are float32 cosines under bf16 weights or bf16 autocast: the last
normalise + matmul of PrototypeHead against a float64 reference from the same hidden states."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from megavl.models.heads import PrototypeHead


@pytest.mark.parametrize("how", ["bf16 weights", "bf16 autocast"])
def test_prototype_logits_are_fp32_cosines_under_bf16(how):
    torch.manual_seed(0)
    head = PrototypeHead(64, 512)
    tokens = torch.randn(4, 9, 64)
    hidden = {}
    head.mlp.register_forward_hook(lambda module, args, out: hidden.setdefault("out", out))
    if how == "bf16 weights":
        head, tokens, context = head.to(torch.bfloat16), tokens.bfloat16(), contextlib.nullcontext()
    else:
        context = torch.autocast("cpu", dtype=torch.bfloat16)
    with context:
        logits = head(tokens)
    assert hidden["out"].dtype == torch.bfloat16  # the MLP itself runs in the compute dtype
    ref = F.normalize(hidden["out"].double(), dim=-1) @ F.normalize(head.prototypes.double(), dim=-1).t()
    assert logits.dtype == torch.float32 and logits.shape == (4, 9, 512)
    # bf16 quantises cosines near 1 at 2^-8 (~4e-3); fp32 is exact to ~1e-7
    torch.testing.assert_close(logits.double(), ref, atol=1e-6, rtol=0)
    logits.sum().backward()
    assert head.prototypes.grad is not None and head.prototypes.grad.dtype == head.prototypes.dtype
