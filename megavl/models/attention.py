"""One attention entry point for the whole model, with its backend chosen in one place.

Legend: B batch, H heads, L query length, S key length, D head dim, E model width,
N = B*L rows of a fixed-size packed buffer (its first T rows are the valid tokens), R trailing dims.

Backends:
  "flash"  flash-attn 2 (CUDA, fp16/bf16, D <= 256 and D % 8 == 0, sm80+). Calls without masks run the
           dense kernel (flash_attn_func); masked calls run the varlen kernel on tokens packed by
           `pack_rows` into a fixed-size buffer, so no call waits on the device for a token count.
  "sdpa"   torch.nn.functional.scaled_dot_product_attention.
  "math"   explicit softmax(q k^T / sqrt(D)) v in float32: the reference the others are tested against.
  "auto"   flash when it can run on these inputs, else sdpa; `resolve_backend` decides (and logs once).
An explicit "flash" that cannot run is an error, never a silent fallback.

Masks are bool, True = attend / valid. Behaviour shared by all backends:
  * a batch row whose keys are ALL masked yields zeros (no NaN, zero gradient);
  * a query row masked by `query_mask_BL` yields zeros.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "flash", "sdpa", "math")
FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256

# flash_attn.flash_attn_func: (q_BLHD, k_BSHD, v_BSHD, dropout_p, softmax_scale) -> out_BLHD.
DenseFn = Callable[..., torch.Tensor]
# flash_attn.flash_attn_varlen_func: (q_NHD, k_NHD, v_NHD, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
# max_seqlen_k, dropout_p, softmax_scale) -> out_NHD. Rows past cu_seqlens[-1] are neither read into
# any sequence nor written: their output and gradient are undefined.
VarlenFn = Callable[..., torch.Tensor]


class FlashKernels(NamedTuple):
    dense: DenseFn
    varlen: VarlenFn


@functools.lru_cache(maxsize=1)
def _flash_kernels() -> FlashKernels | None:
    """flash-attn's dense and varlen functions, or None when flash-attn is not installed (checked once)."""
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError:
        return None
    return FlashKernels(flash_attn_func, flash_attn_varlen_func)


def flash_unavailable_reasons(q_BHLD: torch.Tensor) -> list[str]:
    """Why the flash backend cannot run on tensors like `q_BHLD`; an empty list means it can."""
    reasons = []
    if _flash_kernels() is None:
        reasons.append("flash_attn is not installed (pip install 'megavl[flash]')")
    if q_BHLD.device.type != "cuda":
        reasons.append(f"inputs are on {q_BHLD.device.type}, flash needs CUDA")
    elif torch.cuda.get_device_capability(q_BHLD.device)[0] < 8:
        reasons.append("flash-attn 2 needs an sm80+ (Ampere or newer) GPU")
    if q_BHLD.dtype not in FLASH_DTYPES:
        reasons.append(f"dtype {q_BHLD.dtype} is not fp16/bf16")
    head_dim = q_BHLD.shape[-1]
    if head_dim > FLASH_MAX_HEAD_DIM or head_dim % 8 != 0:
        reasons.append(f"head dim {head_dim} is not a multiple of 8 <= {FLASH_MAX_HEAD_DIM}")
    return reasons


@functools.lru_cache(maxsize=None)
def _log_fallback_once(reasons: str) -> None:
    logger.info("attention backend 'auto' uses sdpa, not flash: %s", reasons)


def resolve_backend(requested: str, q_BHLD: torch.Tensor) -> str:
    """The one place a backend is chosen: returns "flash", "sdpa" or "math".

    "auto" picks flash when `flash_unavailable_reasons` is empty, else sdpa (logged once per reason).
    An explicit "flash" that cannot run raises RuntimeError listing why.
    """
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; choose one of {BACKENDS}")
    if requested in ("sdpa", "math"):
        return requested
    reasons = flash_unavailable_reasons(q_BHLD)
    if requested == "flash":
        if reasons:
            raise RuntimeError("attention backend 'flash' was requested but cannot run: " + "; ".join(reasons))
        return "flash"
    if reasons:
        _log_fallback_once("; ".join(reasons))
        return "sdpa"
    return "flash"


# ----------------------------------------------------------------------------- varlen packing
class Packing(NamedTuple):
    """Where the valid tokens of a padded (B, L) batch go in a packed buffer of N = B*L rows.

    gather_ids (N,) int64: padded flat position of packed row n (the padding positions past T);
    row_valid (N,) bool: packed row n holds a token (n < T);
    unpack_ids (B, L) int64: packed row of each valid padded position (0 at padding);
    cu_seqlens (B+1,) int32: cumulative sequence lengths from 0, flash-attn's varlen convention;
    mask_BL (B, L) bool: the mask it was made from.
    Every piece is computed on the device: T is never read on the host.
    """
    gather_ids: torch.Tensor
    row_valid: torch.Tensor
    unpack_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    mask_BL: torch.Tensor


def packing(mask_BL: torch.Tensor) -> Packing:
    """The `Packing` of bool `mask_BL` (B, L), True = valid; tokens keep their row-major order."""
    if mask_BL.dtype != torch.bool or mask_BL.dim() != 2:
        raise ValueError(f"mask must be a bool (B, L) tensor, got {mask_BL.dtype} {tuple(mask_BL.shape)}")
    flat_N = mask_BL.flatten()
    n = flat_N.numel()
    packed_row_N = torch.cumsum(flat_N, dim=0) - 1  # int64; the packed row of each valid token
    # A stable sort puts the valid positions first in their order: a gather list of fixed length n.
    gather_ids = torch.argsort((~flat_N).to(torch.uint8), stable=True)
    row_valid = torch.arange(n, device=mask_BL.device) < flat_N.sum()
    unpack_ids = packed_row_N.clamp(min=0).view_as(mask_BL)
    cu_seqlens = F.pad(torch.cumsum(mask_BL.sum(dim=1, dtype=torch.int32), dim=0, dtype=torch.int32), (1, 0))
    return Packing(gather_ids, row_valid, unpack_ids, cu_seqlens, mask_BL)


class _GatherRows(torch.autograd.Function):
    """x_NR[row_valid] = x_flat[gather_ids]; the gradient of rows past T is dropped, not scattered
    back, because a varlen kernel leaves it undefined (flash-attn allocates dq/dk/dv uninitialised)."""

    @staticmethod
    def forward(ctx, x_MR: torch.Tensor, gather_ids: torch.Tensor, row_valid: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gather_ids, row_valid)
        ctx.rows = x_MR.shape[0]
        return x_MR.index_select(0, gather_ids)

    @staticmethod
    def backward(ctx, grad_NR: torch.Tensor):
        gather_ids, row_valid = ctx.saved_tensors
        keep = row_valid.view(-1, *([1] * (grad_NR.dim() - 1)))
        grad_NR = torch.where(keep, grad_NR, 0)
        grad_MR = grad_NR.new_zeros(ctx.rows, *grad_NR.shape[1:]).index_add_(0, gather_ids, grad_NR)
        return grad_MR, None, None


def pack_rows(x_BLR: torch.Tensor, plan: Packing) -> torch.Tensor:
    """x_BLR (B, L, *R) -> x_NR (B*L, *R): the valid tokens first, in order; the rows past T hold
    padding and pass no gradient back."""
    return _GatherRows.apply(x_BLR.reshape(-1, *x_BLR.shape[2:]), plan.gather_ids, plan.row_valid)


def unpack_rows(x_NR: torch.Tensor, plan: Packing) -> torch.Tensor:
    """Inverse of `pack_rows`: x_NR (B*L, *R) -> (B, L, *R), zeros at padding whatever rows past T hold."""
    batch, seqlen = plan.unpack_ids.shape
    x_BLR = x_NR.index_select(0, plan.unpack_ids.flatten()).view(batch, seqlen, *x_NR.shape[1:])
    keep = plan.mask_BL.view(batch, seqlen, *([1] * (x_NR.dim() - 1)))
    return torch.where(keep, x_BLR, 0)  # a select, so NaN/garbage in unread rows cannot leak


# ----------------------------------------------------------------------------- backends
def _check_inputs(q_BHLD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor,
                  key_mask_BS: torch.Tensor | None, query_mask_BL: torch.Tensor | None) -> None:
    if q_BHLD.dim() != 4 or k_BHSD.dim() != 4 or v_BHSD.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, len, D); got {tuple(q_BHLD.shape)}, "
                         f"{tuple(k_BHSD.shape)}, {tuple(v_BHSD.shape)}")
    (b, h, l, d), (bk, hk, s, dk) = q_BHLD.shape, k_BHSD.shape
    if (bk, hk, dk) != (b, h, d) or v_BHSD.shape[:3] != k_BHSD.shape[:3]:
        raise ValueError(f"q {tuple(q_BHLD.shape)}, k {tuple(k_BHSD.shape)}, v {tuple(v_BHSD.shape)}: "
                         "batch, heads and head dim must agree and k, v must have the same length")
    for name, mask, shape in (("key_mask_BS", key_mask_BS, (b, s)), ("query_mask_BL", query_mask_BL, (b, l))):
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != shape):
            raise ValueError(f"{name} must be bool of shape {shape} (True = attend), "
                             f"got {mask.dtype} {tuple(mask.shape)}")


def _math(q_BHLD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor,
          key_mask_BS: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    probs_BHLS = attention_probs(q_BHLD, k_BHSD, key_mask_BS)
    probs_BHLS = F.dropout(probs_BHLS, p=dropout_p) if dropout_p > 0 else probs_BHLS
    return (probs_BHLS @ v_BHSD.to(probs_BHLS.dtype)).to(q_BHLD.dtype)


def _sdpa(q_BHLD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor,
          key_mask_BS: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    attn_mask = None if key_mask_BS is None else key_mask_BS[:, None, None, :]
    return F.scaled_dot_product_attention(q_BHLD, k_BHSD, v_BHSD, attn_mask=attn_mask, dropout_p=dropout_p)


def _varlen_side(x_BHLD: torch.Tensor, plan: Packing | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One side (queries, keys or values) of a varlen call -> (rows (B*L, H, D), cu_seqlens).

    No plan (unmasked): the padded rows as they are, every sequence L long. A plan: packed rows."""
    b, _, length, _ = x_BHLD.shape
    x_BLHD = x_BHLD.transpose(1, 2)
    if plan is None:
        cu_seqlens = torch.arange(0, (b + 1) * length, length, dtype=torch.int32, device=x_BHLD.device)
        return x_BLHD.reshape(b * length, *x_BLHD.shape[2:]), cu_seqlens
    return pack_rows(x_BLHD, plan), plan.cu_seqlens


def varlen_attention(q_BHLD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor,
                     key_mask_BS: torch.Tensor | None, query_mask_BL: torch.Tensor | None,
                     dropout_p: float = 0.0, varlen_fn: VarlenFn | None = None) -> torch.Tensor:
    """Padded attention through a varlen kernel: pack q by query mask and k/v by key mask, run
    `varlen_fn` (default flash_attn_varlen_func), unpack. Masked query rows come out zero.

    Nothing here reads a device value on the host: the packed buffers keep all B*L rows (the valid
    tokens first, cu_seqlens on the device says how many), and max_seqlen is the padded length, an
    upper bound the kernel accepts. `varlen_fn` is injectable so the packing is tested on CPU.
    Every batch row must have at least one valid key (`attention` guarantees this).
    """
    if varlen_fn is None:
        kernels = _flash_kernels()
        if kernels is None:
            raise RuntimeError("flash_attn is not installed (pip install 'megavl[flash]')")
        varlen_fn = kernels.varlen
    (b, _, l, d), s = q_BHLD.shape, k_BHSD.shape[2]
    q_plan = None if query_mask_BL is None else packing(query_mask_BL)
    k_plan = None if key_mask_BS is None else packing(key_mask_BS)
    q_NHD, cu_q = _varlen_side(q_BHLD, q_plan)
    k_NHD, cu_k = _varlen_side(k_BHSD, k_plan)
    v_NHD, _ = _varlen_side(v_BHSD, k_plan)
    out_NHD = varlen_fn(q_NHD, k_NHD, v_NHD, cu_q, cu_k, l, s,
                        dropout_p=dropout_p, softmax_scale=1.0 / math.sqrt(d))
    if q_plan is None:
        return out_NHD.view(b, l, *out_NHD.shape[1:]).transpose(1, 2)
    return unpack_rows(out_NHD, q_plan).transpose(1, 2)


def flash_attention(q_BHLD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor,
                    key_mask_BS: torch.Tensor | None, query_mask_BL: torch.Tensor | None,
                    dropout_p: float = 0.0) -> torch.Tensor:
    """The flash backend: the dense kernel when nothing is masked (ViT self-attention, cross-attention
    to image tokens), the varlen kernel only where padding exists."""
    kernels = _flash_kernels()
    if kernels is None:
        raise RuntimeError("flash_attn is not installed (pip install 'megavl[flash]')")
    if key_mask_BS is None and query_mask_BL is None:
        out_BLHD = kernels.dense(q_BHLD.transpose(1, 2), k_BHSD.transpose(1, 2), v_BHSD.transpose(1, 2),
                                 dropout_p=dropout_p, softmax_scale=1.0 / math.sqrt(q_BHLD.shape[-1]))
        return out_BLHD.transpose(1, 2)
    return varlen_attention(q_BHLD, k_BHSD, v_BHSD, key_mask_BS, query_mask_BL, dropout_p, kernels.varlen)


def attention_probs(q_BHLD: torch.Tensor, k_BHSD: torch.Tensor,
                    key_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
    """Attention probabilities softmax(q k^T / sqrt(D)) over valid keys -> (B, H, L, S) in float32
    (float64 for float64 inputs).

    The `need_weights` path (e.g. text-to-patch relevance for text-guided masking). Masked keys get
    probability 0; a batch row whose keys are all masked gets an all-zero row.
    """
    acc_dtype = torch.promote_types(q_BHLD.dtype, torch.float32)  # half inputs accumulate in fp32
    scores_BHLS = (q_BHLD.to(acc_dtype) @ k_BHSD.to(acc_dtype).transpose(-1, -2)) / math.sqrt(q_BHLD.shape[-1])
    if key_mask_BS is None:
        return scores_BHLS.softmax(dim=-1)
    has_key_B = key_mask_BS.any(dim=1)
    safe_mask_BS = key_mask_BS | ~has_key_B[:, None]  # all-masked rows attend everywhere, then zeroed
    scores_BHLS = scores_BHLS.masked_fill(~safe_mask_BS[:, None, None, :], float("-inf"))
    return scores_BHLS.softmax(dim=-1) * has_key_B[:, None, None, None]


def attention(q_BHLD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor,
              key_mask_BS: torch.Tensor | None = None, backend: str = "auto",
              dropout_p: float = 0.0, *, query_mask_BL: torch.Tensor | None = None,
              ) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over valid keys -> (B, H, L, D) in q's dtype.

    key_mask_BS, query_mask_BL: bool, True = attend/valid. Rows whose keys are all masked and
    masked query rows are zero in every backend. dropout_p applies to the attention probabilities
    (pass 0.0 at eval). backend: "auto" | "flash" | "sdpa" | "math" (see `resolve_backend`).
    """
    _check_inputs(q_BHLD, k_BHSD, v_BHSD, key_mask_BS, query_mask_BL)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    chosen = resolve_backend(backend, q_BHLD)
    keep_B = None
    if key_mask_BS is not None:
        # Softmax over zero keys is 0/0: such rows attend to all keys (finite) and are zeroed after.
        # Done unconditionally: testing for the case first would cost a host-device sync per call.
        keep_B = key_mask_BS.any(dim=1)
        key_mask_BS = key_mask_BS | ~keep_B[:, None]
    if chosen == "flash":
        out_BHLD = flash_attention(q_BHLD, k_BHSD, v_BHSD, key_mask_BS, query_mask_BL, dropout_p)
    elif chosen == "sdpa":
        out_BHLD = _sdpa(q_BHLD, k_BHSD, v_BHSD, key_mask_BS, dropout_p)
    else:
        out_BHLD = _math(q_BHLD, k_BHSD, v_BHSD, key_mask_BS, dropout_p)
    if keep_B is not None:
        out_BHLD = out_BHLD * keep_B[:, None, None, None].to(out_BHLD.dtype)
    if query_mask_BL is not None and chosen != "flash":  # flash already leaves padded queries at 0
        out_BHLD = out_BHLD * query_mask_BL[:, None, :, None].to(out_BHLD.dtype)
    return out_BHLD


# ----------------------------------------------------------------------------- module
class MultiHeadAttention(nn.Module):
    """Multi-head self- or cross-attention with separate q/k/v/out projections.

    dim: query width E (also the output width); kv_dim: context width (default dim).
    The backend switch changes only the kernel, never the weights.
    """

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, qkv_bias: bool = True,
                 backend: str = "auto", attn_dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
        kv_dim = dim if kv_dim is None else kv_dim
        self.dim, self.kv_dim, self.heads, self.head_dim = dim, kv_dim, heads, dim // heads
        self.backend, self.attn_dropout = backend, attn_dropout
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.v = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.out = nn.Linear(dim, dim)

    def _split_heads(self, x_BLE: torch.Tensor) -> torch.Tensor:
        b, n, _ = x_BLE.shape
        return x_BLE.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x_BLD: torch.Tensor, context_BSD: torch.Tensor | None = None,
                key_mask_BS: torch.Tensor | None = None, return_attn: bool = False, *,
                query_mask_BL: torch.Tensor | None = None,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x_BLD (B, L, dim) queries; context_BSD (B, S, kv_dim) keys/values, or None for
        self-attention (then key_mask_BS masks x itself) -> (B, L, dim).

        return_attn=True also returns probabilities (B, H, L, S) (see `attention_probs`) via the math path:
        no fused kernel materialises them (like nn.MultiheadAttention's need_weights).
        """
        context_BSD = x_BLD if context_BSD is None else context_BSD
        if x_BLD.dim() != 3 or x_BLD.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, L, {self.dim}), got {tuple(x_BLD.shape)}")
        if context_BSD.dim() != 3 or context_BSD.shape[-1] != self.kv_dim:
            raise ValueError(f"context must be (B, S, {self.kv_dim}), got {tuple(context_BSD.shape)}")
        if context_BSD.shape[0] != x_BLD.shape[0]:
            raise ValueError(f"batch mismatch: x {x_BLD.shape[0]} vs context {context_BSD.shape[0]}")
        q_BHLD = self._split_heads(self.q(x_BLD))
        k_BHSD = self._split_heads(self.k(context_BSD))
        v_BHSD = self._split_heads(self.v(context_BSD))
        dropout_p = self.attn_dropout if self.training else 0.0
        if not return_attn:
            out_BHLD = attention(q_BHLD, k_BHSD, v_BHSD, key_mask_BS, self.backend, dropout_p,
                                 query_mask_BL=query_mask_BL)
            return self.out(out_BHLD.transpose(1, 2).flatten(2))
        _check_inputs(q_BHLD, k_BHSD, v_BHSD, key_mask_BS, query_mask_BL)
        probs_BHLS = attention_probs(q_BHLD, k_BHSD, key_mask_BS)
        if query_mask_BL is not None:
            probs_BHLS = probs_BHLS * query_mask_BL[:, None, :, None]
        dropped_BHLS = F.dropout(probs_BHLS, p=dropout_p) if dropout_p > 0 else probs_BHLS
        out_BHLD = (dropped_BHLS @ v_BHSD.to(dropped_BHLS.dtype)).to(q_BHLD.dtype)
        return self.out(out_BHLD.transpose(1, 2).flatten(2)), probs_BHLS
