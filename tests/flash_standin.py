"""A CPU stand-in for flash-attn's two kernels and a counter of host-synchronising ops.

`StandinFlash` follows flash_attn_func / flash_attn_varlen_func's contracts strictly: cu_seqlens int32
on the inputs' device, max_seqlen a Python int no smaller than any sequence, and rows past
cu_seqlens[-1] left undefined in the output and in dq/dk/dv (filled with NaN here, so a caller that
reads them fails). It records each call. `SyncCounter` is a TorchDispatchMode that counts the ATen ops
which make a CUDA host wait for the device (reading a value, or an output size that depends on data),
so a CPU run shows what the same step would do on a GPU.
"""
from __future__ import annotations

import contextlib
import traceback
from collections import Counter

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import megavl.models.attention as attn_mod

aten = torch.ops.aten
# Ops whose CUDA implementation copies a data-dependent value or size to the host.
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
            aten.equal.default, aten.is_nonzero.default, aten._unique2.default, aten.unique_dim.default,
            aten.unique_consecutive.default, aten.repeat_interleave.Tensor, aten.allclose.default}
BOOL_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}


def _caller() -> str:
    """The innermost megavl function on the stack: where a sync comes from."""
    for frame in reversed(traceback.extract_stack()):
        if "/megavl/" in frame.filename or "/megavl_kernels/" in frame.filename:
            return frame.name
    return "?"


class SyncCounter(TorchDispatchMode):
    """Counts host-synchronising ops while active and not `paused`: `counts` by op name, `where` by
    the megavl function that ran them."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.where: Counter[str] = Counter()
        self.paused = False

    def _record(self, name: str) -> None:
        self.counts[name] += 1
        self.where[_caller()] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            if func in SYNC_OPS and not (func is aten.repeat_interleave.Tensor and kwargs.get("output_size")):
                self._record(str(func.overloadpacket.__name__))
            elif func in BOOL_INDEXED and any(
                    isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                    for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else [])):
                self._record(f"{func.overloadpacket.__name__}[bool]")
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def pause(self):
        paused, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = paused

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _per_sequence(q_NHD, k_NHD, v_NHD, cu_q, cu_k, scale):
    """flash_attn_varlen_func's result, one sequence at a time; rows past cu_q[-1] are NaN."""
    out = torch.full_like(q_NHD, float("nan"))
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    pieces = []
    for i in range(len(bounds_q) - 1):
        q = q_NHD[bounds_q[i]:bounds_q[i + 1]].transpose(0, 1)
        k = k_NHD[bounds_k[i]:bounds_k[i + 1]].transpose(0, 1)
        v = v_NHD[bounds_k[i]:bounds_k[i + 1]].transpose(0, 1)
        pieces.append(F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(0, 1))
    return torch.cat([torch.cat(pieces), out[bounds_q[-1]:]])


class _Varlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, scale, paused):
        ctx.save_for_backward(q, k, v, cu_q, cu_k)
        ctx.scale, ctx.paused = scale, paused
        return _per_sequence(q, k, v, cu_q, cu_k, scale)

    @staticmethod
    def backward(ctx, grad_out):
        with ctx.paused():
            return _Varlen._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        q, k, v, cu_q, cu_k = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]
            out = _per_sequence(*inputs, cu_q, cu_k, ctx.scale)
            valid = int(cu_q[-1])
            grads = torch.autograd.grad(out[:valid], inputs, grad_out[:valid], allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g.clone() for g, t in zip(grads, inputs)]
        grads[0][int(cu_q[-1]):] = float("nan")  # undefined in flash-attn: dq/dk/dv are torch.empty
        for g in grads[1:]:
            g[int(cu_k[-1]):] = float("nan")
        return (*grads, None, None, None, None)


class StandinFlash:
    """`attn_mod.FlashKernels`-shaped pair of kernels that record every call in `calls`."""

    def __init__(self, counter: SyncCounter | None = None) -> None:
        self.calls: list[tuple[str, tuple[int, ...]]] = []
        self.counter = counter

    def _paused(self):
        return self.counter.pause() if self.counter is not None else contextlib.nullcontext()

    def dense(self, q_BLHD, k_BSHD, v_BSHD, dropout_p=0.0, softmax_scale=None):
        assert dropout_p == 0.0
        self.calls.append(("dense", tuple(q_BLHD.shape)))
        with self._paused():
            out = F.scaled_dot_product_attention(q_BLHD.transpose(1, 2), k_BSHD.transpose(1, 2),
                                                 v_BSHD.transpose(1, 2), scale=softmax_scale)
            return out.transpose(1, 2)

    def varlen(self, q_NHD, k_NHD, v_NHD, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
               dropout_p=0.0, softmax_scale=None):
        self.calls.append(("varlen", tuple(q_NHD.shape)))
        with self._paused():
            for cu, max_len, rows in ((cu_seqlens_q, max_seqlen_q, q_NHD), (cu_seqlens_k, max_seqlen_k, k_NHD)):
                assert cu.dtype == torch.int32 and cu.device == rows.device
                assert isinstance(max_len, int) and max_len >= int((cu[1:] - cu[:-1]).max())
                assert int(cu[-1]) <= rows.shape[0]
            assert dropout_p == 0.0
            return _Varlen.apply(q_NHD, k_NHD, v_NHD, cu_seqlens_q, cu_seqlens_k, softmax_scale, self._paused)

    def kernels(self) -> attn_mod.FlashKernels:
        return attn_mod.FlashKernels(self.dense, self.varlen)


def install(monkeypatch, standin: StandinFlash) -> None:
    """Make `attention(backend="auto" | "flash")` run `standin` on any device and dtype."""
    monkeypatch.setattr(attn_mod, "_flash_kernels", standin.kernels)
    monkeypatch.setattr(attn_mod, "flash_unavailable_reasons", lambda q: [])
