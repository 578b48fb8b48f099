"""Attention backends against a slow per-row reference; varlen packing; backend choice; the module.

Legend: B batch, H heads, L query length, S key length, D head dim, T packed tokens.
"""
from __future__ import annotations

import logging
import math

import pytest
import torch

import megavl.models.attention as attn_mod
from flash_standin import StandinFlash, SyncCounter, install
from megavl.models.attention import (MultiHeadAttention, attention, attention_probs, pack_rows, packing,
                                     resolve_backend, unpack_rows, varlen_attention)

# dtype -> (forward atol, forward rtol, grad atol, grad rtol), against a float64 reference.
TOLERANCES = {
    torch.float32: (2e-5, 1e-4, 1e-4, 1e-4),
    torch.bfloat16: (2e-2, 2e-2, 6e-2, 3e-2),
    torch.float16: (3e-3, 3e-3, 1e-2, 1e-2),
}


def reference_attention(q_BHLD, k_BHSD, v_BHSD, key_mask_BS=None, query_mask_BL=None):
    """Row by row in float64 over the valid keys only; no valid keys or a masked query -> zeros."""
    q, k, v = q_BHLD.double(), k_BHSD.double(), v_BHSD.double()
    (b, h, l, d), s = q.shape, k.shape[2]
    rows = []
    for bi in range(b):
        keys = torch.arange(s) if key_mask_BS is None else key_mask_BS[bi].cpu().nonzero().flatten()
        heads = []
        for hi in range(h):
            if len(keys) == 0:
                heads.append(q.new_zeros(l, d))
                continue
            scores = q[bi, hi] @ k[bi, hi, keys].T / math.sqrt(d)
            out = torch.softmax(scores, dim=-1) @ v[bi, hi, keys]
            if query_mask_BL is not None:
                out = out * query_mask_BL[bi, :, None]
            heads.append(out)
        rows.append(torch.stack(heads))
    return torch.stack(rows)


def reference_varlen(*args, **kwargs):
    """flash_attn_varlen_func's contract in plain torch; rows past cu_seqlens[-1] come out NaN."""
    return StandinFlash().varlen(*args, **kwargs)


def random_mask(b, n, gen, min_valid=1):
    """Each row: a random number of valid tokens (>= min_valid) at random positions."""
    rows = []
    for _ in range(b):
        n_valid = int(torch.randint(min_valid, n + 1, (1,), generator=gen))
        row = torch.zeros(n, dtype=torch.bool)
        row[torch.randperm(n, generator=gen)[:n_valid]] = True
        rows.append(row)
    return torch.stack(rows)


# (name, B, H, L, S, D, key mask?, query mask?, fully masked row?)
CASES = [
    ("self_padded", 3, 2, 9, 9, 16, True, True, False),
    ("cross_odd", 2, 3, 7, 13, 8, True, False, False),
    ("no_mask", 2, 2, 5, 11, 32, False, False, False),
    ("fully_masked_row", 3, 2, 6, 10, 16, True, True, True),
    ("single_token", 1, 1, 1, 1, 8, True, False, False),
]


def make_case(case, dtype, seed=0):
    _, b, h, l, s, d, use_key, use_query, fully_masked = case
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(dtype) for n in (l, s, s))
    key_mask = random_mask(b, s, gen) if use_key else None
    if fully_masked:
        key_mask[1] = False
    query_mask = random_mask(b, l, gen) if use_query else None
    return q, k, v, key_mask, query_mask


def run_with_grads(fn, q, k, v):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    upstream = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view(out.shape)
    (out.double() * upstream).sum().backward()
    return out, (q.grad, k.grad, v.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_backend_matches_reference_outputs_and_gradients(backend, case, dtype):
    q, k, v, key_mask, query_mask = make_case(case, dtype)
    atol, rtol, gatol, grtol = TOLERANCES[dtype]
    out, grads = run_with_grads(
        lambda q, k, v: attention(q, k, v, key_mask, backend=backend, query_mask_BL=query_mask), q, k, v)
    ref, ref_grads = run_with_grads(
        lambda q, k, v: reference_attention(q, k, v, key_mask, query_mask), q, k, v)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double(), rg.double(), atol=gatol, rtol=grtol,
                                   msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sdpa_equals_math_directly(dtype):
    q, k, v, key_mask, query_mask = make_case(CASES[1], dtype, seed=3)
    atol, rtol, _, _ = TOLERANCES[dtype]
    torch.testing.assert_close(attention(q, k, v, key_mask, backend="sdpa").double(),
                               attention(q, k, v, key_mask, backend="math").double(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", ["math", "sdpa", "varlen"])
def test_fully_masked_keys_give_zeros_and_finite_gradients(backend):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 4, 8, generator=gen) for _ in range(3))
    key_mask = torch.tensor([[False] * 4, [True, True, False, True]])
    if backend == "varlen":
        fn = lambda q, k, v: varlen_attention(q, k, v, key_mask | ~key_mask.any(1, keepdim=True), None,
                                              varlen_fn=reference_varlen) * key_mask.any(1)[:, None, None, None]
    else:
        fn = lambda q, k, v: attention(q, k, v, key_mask, backend=backend)
    out, grads = run_with_grads(fn, q, k, v)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert out[1].abs().sum() > 0
    for g in grads:
        assert torch.isfinite(g).all()
        assert torch.equal(g[0], torch.zeros_like(g[0]))


# ----------------------------------------------------------------------------- varlen
def test_packing_puts_valid_tokens_first_in_order_and_unpack_inverts_it():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 7, 3, 5, generator=gen)
    mask = random_mask(4, 7, gen)
    mask[2] = False  # an empty sequence must still get its cu_seqlens slot
    plan = packing(mask)
    packed = pack_rows(x, plan)
    lengths = [int(m.sum()) for m in mask]
    total = sum(lengths)
    assert packed.shape == (4 * 7, 3, 5)  # fixed size: the count of valid tokens stays on the device
    assert torch.equal(packed[:total], torch.cat([x[b][mask[b]] for b in range(4)]))
    assert plan.row_valid.tolist() == [True] * total + [False] * (28 - total)
    assert plan.cu_seqlens.dtype == torch.int32
    assert plan.cu_seqlens.tolist() == [0] + list(torch.tensor(lengths).cumsum(0).tolist())
    garbage = torch.cat([packed[:total], torch.full_like(packed[total:], float("nan"))])
    assert torch.equal(unpack_rows(garbage, plan), x * mask[:, :, None, None])


def test_pack_and_unpack_pass_gradients_to_valid_tokens_only_whatever_the_spare_rows_hold():
    x = torch.randn(2, 5, 4, requires_grad=True)
    mask = torch.tensor([[True, False, True, True, False], [False, True, False, False, False]])
    plan = packing(mask)
    packed = pack_rows(x, plan)
    spare = (~plan.row_valid)[:, None]
    # A varlen kernel leaves spare rows (and their gradient) undefined: NaN must not reach x.grad.
    packed.register_hook(lambda grad: torch.where(spare, float("nan"), grad))
    unpack_rows(torch.where(spare, float("nan"), packed * 2), plan).sum().backward()
    torch.testing.assert_close(x.grad, 2.0 * mask[:, :, None].float().expand(2, 5, 4))


def test_varlen_call_reads_no_device_value_on_the_host():
    q, k, v, key_mask, query_mask = make_case(CASES[0], torch.float32, seed=9)
    counter = SyncCounter()
    kernel = StandinFlash(counter)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    with counter:
        out = varlen_attention(q, k, v, key_mask, query_mask, varlen_fn=kernel.varlen)
        out.sum().backward()
    assert counter.total == 0, dict(counter.counts)


@pytest.mark.parametrize("case", CASES[:3] + CASES[4:], ids=[c[0] for c in CASES[:3] + CASES[4:]])
def test_varlen_path_with_reference_kernel_matches_padded_reference(case):
    q, k, v, key_mask, query_mask = make_case(case, torch.float32, seed=5)
    out, grads = run_with_grads(lambda q, k, v: varlen_attention(q, k, v, key_mask, query_mask,
                                                                 varlen_fn=reference_varlen), q, k, v)
    ref, ref_grads = run_with_grads(lambda q, k, v: reference_attention(q, k, v, key_mask, query_mask), q, k, v)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), rg.double(), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- backend choice
def test_resolve_backend_explicit_and_unknown():
    q = torch.randn(1, 1, 2, 8)
    assert resolve_backend("math", q) == "math"
    assert resolve_backend("sdpa", q) == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("xformers", q)
    with pytest.raises(ValueError, match="unknown attention backend"):
        MultiHeadAttention(8, 2, backend="fast")


def test_explicit_flash_that_cannot_run_is_an_error_naming_why(monkeypatch):
    q = torch.randn(1, 1, 2, 12)
    with pytest.raises(RuntimeError, match="'flash' was requested but cannot run.*cpu"):
        attention(q, q, q, backend="flash")
    monkeypatch.setattr(attn_mod, "_flash_kernels", lambda: None)
    with pytest.raises(RuntimeError, match="flash_attn is not installed"):
        resolve_backend("flash", q)
    with pytest.raises(RuntimeError, match=r"float32 is not fp16/bf16.*head dim 12"):
        resolve_backend("flash", q)


def test_auto_falls_back_to_sdpa_and_logs_once(caplog):
    attn_mod._log_fallback_once.cache_clear()
    q = torch.randn(1, 1, 2, 8)
    with caplog.at_level(logging.INFO, logger=attn_mod.__name__):
        assert resolve_backend("auto", q) == "sdpa"
        assert resolve_backend("auto", q) == "sdpa"
    records = [r for r in caplog.records if "uses sdpa, not flash" in r.getMessage()]
    assert len(records) == 1


def test_auto_picks_flash_when_every_condition_holds(monkeypatch):
    monkeypatch.setattr(attn_mod, "flash_unavailable_reasons", lambda q: [])
    assert resolve_backend("auto", torch.randn(1, 1, 2, 8)) == "flash"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_flash_dispatch_uses_dense_kernel_unless_masked_and_matches_reference(monkeypatch, case):
    flash = StandinFlash()
    install(monkeypatch, flash)
    q, k, v, key_mask, query_mask = make_case(case, torch.float32, seed=10)
    out, grads = run_with_grads(
        lambda q, k, v: attention(q, k, v, key_mask, backend="flash", query_mask_BL=query_mask), q, k, v)
    ref, ref_grads = run_with_grads(lambda q, k, v: reference_attention(q, k, v, key_mask, query_mask), q, k, v)
    masked = key_mask is not None or query_mask is not None
    assert [kind for kind, _ in flash.calls] == ["varlen" if masked else "dense"]
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    for g, rg in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), rg.double(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bad, match", [
    (dict(key_mask_BS=torch.ones(2, 5, dtype=torch.long)), "key_mask_BS must be bool"),
    (dict(key_mask_BS=torch.ones(2, 4, dtype=torch.bool)), r"key_mask_BS must be bool of shape \(2, 5\)"),
    (dict(query_mask_BL=torch.ones(3, 3, dtype=torch.bool)), "query_mask_BL"),
    (dict(k_BHSD=torch.randn(2, 2, 5, 4)), "head dim must agree"),
    (dict(v_BHSD=torch.randn(2, 2, 6, 8)), "same length"),
    (dict(q_BHLD=torch.randn(2, 3, 8)), "must be 4-D"),
    (dict(dropout_p=1.0), "dropout_p"),
])
def test_attention_rejects_bad_inputs(bad, match):
    args = dict(q_BHLD=torch.randn(2, 2, 3, 8), k_BHSD=torch.randn(2, 2, 5, 8), v_BHSD=torch.randn(2, 2, 5, 8))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        attention(**args)


def test_attention_probs_are_masked_normalised_and_consistent_with_attention():
    q, k, v, key_mask, _ = make_case(CASES[3], torch.float32, seed=6)
    probs = attention_probs(q, k, key_mask)
    assert probs.shape == (q.shape[0], q.shape[1], q.shape[2], k.shape[2]) and probs.dtype == torch.float32
    assert torch.equal(probs * ~key_mask[:, None, None, :], torch.zeros_like(probs))
    row_sums = probs.sum(-1)
    has_key = key_mask.any(1)
    torch.testing.assert_close(row_sums[has_key], torch.ones_like(row_sums[has_key]))
    assert torch.equal(row_sums[~has_key], torch.zeros_like(row_sums[~has_key]))
    torch.testing.assert_close((probs @ v).double(), reference_attention(q, k, v, key_mask), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- module
def reference_mha(mod: MultiHeadAttention, x, context, key_mask):
    def heads(t):
        return t.view(t.shape[0], t.shape[1], mod.heads, mod.head_dim).transpose(1, 2)
    q = heads(x @ mod.q.weight.T + mod.q.bias)
    k = heads(context @ mod.k.weight.T + mod.k.bias)
    v = heads(context @ mod.v.weight.T + mod.v.bias)
    out = reference_attention(q, k, v, key_mask).float().transpose(1, 2).flatten(2)
    return out @ mod.out.weight.T + mod.out.bias


@pytest.mark.parametrize("kv_dim", [None, 20])
def test_multi_head_attention_matches_reference_for_every_backend_over_the_same_weights(kv_dim):
    torch.manual_seed(7)
    mod = MultiHeadAttention(24, 3, kv_dim=kv_dim)
    x = torch.randn(2, 5, 24)
    context = x if kv_dim is None else torch.randn(2, 9, kv_dim)
    key_mask = random_mask(2, context.shape[1], torch.Generator().manual_seed(0))
    ref = reference_mha(mod, x, context, key_mask)
    for backend in ("math", "sdpa", "auto"):
        mod.backend = backend
        out = mod(x, None if kv_dim is None else context, key_mask)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=lambda m, b=backend: f"{b}: {m}")
    out, probs = mod(x, None if kv_dim is None else context, key_mask, return_attn=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert probs.shape == (2, 3, 5, context.shape[1])


def test_multi_head_attention_rejects_bad_shapes():
    mod = MultiHeadAttention(16, 4, kv_dim=8)
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(10, 4)
    with pytest.raises(ValueError, match=r"x must be \(B, L, 16\)"):
        mod(torch.randn(2, 3, 8), torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match=r"context must be \(B, S, 8\)"):
        mod(torch.randn(2, 3, 16), torch.randn(2, 4, 16))
    with pytest.raises(ValueError, match="batch mismatch"):
        mod(torch.randn(2, 3, 16), torch.randn(3, 4, 8))


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_flash_matches_reference_on_cuda(case, dtype):
    pytest.importorskip("flash_attn", reason="flash-attn not installed (pip install 'megavl[flash]')")
    q, k, v, key_mask, query_mask = make_case(case, dtype, seed=8)
    q, k, v = (t.cuda() for t in (q, k, v))
    key_mask = None if key_mask is None else key_mask.cuda()
    query_mask = None if query_mask is None else query_mask.cuda()
    assert resolve_backend("auto", q) == "flash"
    atol, rtol, gatol, grtol = TOLERANCES[dtype]
    out, grads = run_with_grads(
        lambda q, k, v: attention(q, k, v, key_mask, backend="flash", query_mask_BL=query_mask), q, k, v)
    ref, ref_grads = run_with_grads(
        lambda q, k, v: reference_attention(q, k, v, key_mask, query_mask), q, k, v)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), rg.double(), atol=gatol, rtol=grtol)
