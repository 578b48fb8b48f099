"""optim.skip_unused on one flat tensor, as DeepSpeed's ZeRO partitions hand it to AdamW, against torch
AdamW on the separate parameters with `grad=None` where a step did not use one (the reference loop of
ALBEF/BLIP). The 2-rank ZeRO-1/2/3 runs are in tests/distributed/test_sharded_equals_unsharded.py."""
from __future__ import annotations

import torch

from megavl.engine.optim import AdamW
from megavl.engine.unused import UnusedParameters

HYPER = {"lr": 0.05, "betas": (0.9, 0.98), "eps": 1e-8, "weight_decay": 0.1}
USES = [("a",), ("a",), ("a", "b"), ("a",), ("a", "b"), ("a", "b")]  # "b" sits out steps 0, 1 and 3


def test_flat_partition_skips_like_torch_adamw_with_grad_none():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, 2))
    ref_a, ref_b = (torch.nn.Parameter(t.detach().clone()) for t in (a, b))
    reference = torch.optim.AdamW([ref_a, ref_b], **HYPER)

    flat = torch.nn.Parameter(torch.cat([a.detach().flatten(), b.detach().flatten()]))  # ZeRO's fp32 partition
    optimizer = AdamW([flat], **HYPER)
    plan = UnusedParameters([("a", a), ("b", b)], optimizer, {id(flat): [("a", 0, 5), ("b", 5, 6)]}, {id(flat): flat})

    for step, used in enumerate(USES):
        x = torch.randn(5)
        def loss_of(pa, pb):
            return (pa * x).sum() ** 2 + ((pb ** 3).sum() if "b" in used else 0.0)

        reference.zero_grad(set_to_none=True)
        loss = loss_of(ref_a, ref_b)
        loss.backward()
        if "b" not in used:
            assert ref_b.grad is None
        # The flat side: autograd on the working parameters marks what was used; the flat gradient
        # holds zeros for the rest, as DeepSpeed's buffers do.
        with torch.no_grad():
            a.copy_(flat[:5]), b.copy_(flat[5:].view(3, 2))
        a.grad = b.grad = None
        loss_of(a, b).backward()
        flat.grad = torch.cat([a.grad.flatten(), (b.grad if b.grad is not None else torch.zeros_like(b)).flatten()])
        plan.before_step(step)
        optimizer.step()
        plan.after_step()
        reference.step()
        torch.testing.assert_close(flat.detach()[:5], ref_a.detach(), rtol=1e-6, atol=1e-7, msg=f"a, step {step}")
        torch.testing.assert_close(flat.detach()[5:], ref_b.detach().flatten(), rtol=1e-6, atol=1e-7,
                                   msg=f"b, step {step}")
        state = optimizer.state[flat]
        for key in ("exp_avg", "exp_avg_sq"):
            ref = reference.state[ref_b].get(key, torch.zeros_like(ref_b)).flatten()
            torch.testing.assert_close(state[key][5:], ref, rtol=1e-6, atol=1e-9, msg=f"{key} of b, step {step}")
    assert plan.state_dict() == {"b": 3}


def test_without_a_plan_the_flat_step_moves_unused_segments():
    """What skip_unused prevents: plain AdamW on the flat partition decays and moves a zero-gradient
    segment (the behaviour with optim.skip_unused=false)."""
    flat = torch.nn.Parameter(torch.ones(4))
    optimizer = AdamW([flat], **HYPER)
    flat.grad = torch.tensor([1.0, 1.0, 0.0, 0.0])
    optimizer.step()
    assert torch.all(flat.detach()[2:] < 1.0)  # weight decay applied to the unused half
